"""The ``sora-ds`` command: work after training.

    sora-ds export outputs/run/checkpoints/step-0000500 my_adapter/   # a checkpoint (ZeRO-3 too) -> PEFT adapter
    sora-ds export outputs/run my_adapter/                            # the run's final adapter, or its latest ckpt
    sora-ds merge --base outputs/run/base_model --adapter my_adapter/ merged/
    sora-ds report outputs/run                                        # kept-rank table, heatmap, sparsity figures

Checkpoints store the pruned adapter already gathered from every rank (see :mod:`sora_ds.recipe.checkpoint`), so export
needs no GPU, no DeepSpeed and not the base model.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from ..engine.atomic import atomic_dir
from .checkpoint import STATE_FILE

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


class CLIError(Exception):
    pass


def find_adapter(source: Path) -> Path:
    """The adapter folder of a checkpoint, of a run's output dir (final adapter, else latest checkpoint), or itself."""
    candidates = [source, source / "adapter"]
    if (source / STATE_FILE).is_file():
        candidates = [source / "adapter"]
    latest = source / "checkpoints" / "latest"
    if latest.is_file():
        candidates.append(latest.parent / latest.read_text().strip() / "adapter")
    for c in candidates:
        if all((c / f).is_file() for f in ADAPTER_FILES):
            return c
    raise CLIError(
        f"{source}: no PEFT adapter found; expected a checkpoint folder (with {STATE_FILE} and adapter/), a run's "
        f"output_dir (with adapter/ or checkpoints/latest), or an adapter folder with {list(ADAPTER_FILES)}"
    )


def export(source: Path, out: Path) -> Path:
    adapter = find_adapter(source)
    with atomic_dir(out) as tmp:
        for f in adapter.iterdir():
            shutil.copy2(f, tmp / f.name)
    return adapter


def merge(base: Path, adapter_source: Path, out: Path, dtype: str) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = find_adapter(adapter_source)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=getattr(torch, dtype))
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    with atomic_dir(out) as tmp:
        merged.save_pretrained(tmp)
        try:
            AutoTokenizer.from_pretrained(base).save_pretrained(tmp)
        except (OSError, ValueError):
            pass  # a base folder without a tokenizer: the merged weights are still complete


def report(run_dir: Path) -> str:
    from .summary import plot_rank_heatmap, rank_table

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
    lines.append(f"heatmap: {run_dir / 'rank_heatmap.png'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sora-ds", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("export", help="copy the pruned PEFT adapter out of a checkpoint or run folder")
    p.add_argument("source", type=Path)
    p.add_argument("out", type=Path)
    p = sub.add_parser("merge", help="merge an adapter into full weights of its base model")
    p.add_argument("--base", type=Path, required=True)
    p.add_argument("--adapter", type=Path, required=True)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("out", type=Path)
    p = sub.add_parser("report", help="kept-rank table and heatmap of a finished run")
    p.add_argument("run_dir", type=Path)
    args = parser.parse_args(argv)
    try:
        if args.command == "export":
            print(f"exported {export(args.source, args.out)} -> {args.out}")
        elif args.command == "merge":
            merge(args.base, args.adapter, args.out, args.dtype)
            print(f"merged -> {args.out}")
        else:
            print(report(args.run_dir))
    except CLIError as e:
        print(f"sora-ds {args.command}: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
