"""The training loop behind every recipe, in phases: set-up -> data -> model -> prepare -> (step -> log -> stage ->
checkpoint)* -> finish. What the phases share is one :class:`Run`; ``Run.progress`` is what a checkpoint saves.

Outputs in ``output_dir``: ``config.yaml`` (resolved config), ``metrics.jsonl``, ``summary.json``, ``eval_samples.jsonl``
(with generation or candidates: see ``task_eval.py``),
``rank_heatmap.png``, ``adapter/`` (PEFT LoRA export; ``adapter_uniform/``, ``adapter_vllm/`` with ``export_formats``),
``base_model/`` (when the base was built from a config),
``merged/`` (with ``save_merged: true``), ``checkpoints/`` (with ``save_every``). Nothing is written before every
check has passed (see the README's "Safety and recovery").
"""

from __future__ import annotations

import functools
import json
import math
import os
import sys
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..adapters.compact import adapter_tensors, rank_report
from ..adapters.errors import ConfigError
from ..adapters.export import save_merged
from ..adapters.inject import TargetError, adapter_layers, inject
from ..adapters.optim import adalora_budget, build_optimizer, gate_l1_penalty, set_sparse_lambda
from ..adapters.orthogonal import orth_loss
from ..adapters.schedule import StageRecorder
from ..adapters.serving import export_format, serving_cost
from ..data.batches import EpochSampler, micro_batches, supervised_tokens
from ..data.chat import build_datasets, collate
from ..data.fingerprint import dataset_fingerprint
from ..data.records import DataError
from ..engine import (check_deepspeed_internals, launch_deepspeed_config, local_numel, local_shard,
                      return_freed_memory, sharding_report, zero_stage)
from ..engine.deepspeed import UnsupportedDeepSpeed
from ..engine.heartbeat import Heartbeat, is_timeout
from . import run_dir
from .checkpoint import keep_trainable_only, load_checkpoint, read_state, resolve_checkpoint, save_checkpoint
from .config import TrainConfig, load_config, save_config, steps_for_epochs
from .evaluate import evaluate
from .fsdp2 import fsdp_version, shard_model
from .interrupt import StopRequest
from .kernels import check_kernel_environment, flatten_packed, use_fused_adamw
from .manifest import CheckpointError
from .model import base_model, build_accelerator, check_quantization, check_targets, dist_timeout, load_tokenizer
from .outputs import OutputError, check_writable
from .precision import consistent_precision
from .resume import check_resume, identity
from .summary import adapter_params, plot_rank_heatmap, rank_table, retained_fraction, serving_lines
from .task_eval import Evaluator, as_record, build_task, trim_samples
from .throughput import Throughput
from .usage import recipe_usage


class TrainingStopped(Exception):
    """The run ended before ``max_steps`` on purpose; ``exit_code`` is what the recipe script exits with."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class RankTimeout(RuntimeError):
    """A collective waited ``dist_timeout`` seconds for a rank that stopped responding."""


# Mistakes in what the user gave (config, data, paths, checkpoints) and faults with a clear cause: one line, exit 2
# (1 for a fault during training). The traceback only helps a developer: --debug (or SORA_DS_DEBUG=1) shows it.
USER_ERRORS = (ConfigError, DataError, TargetError, CheckpointError, OutputError, UnsupportedDeepSpeed)


def main(argv: list[str] | None = None, default_config: str | Path | None = None) -> dict:
    """Entry point of the recipe scripts: ``--config``/overrides (or ``default_config``) -> train -> the summary.
    ``--help`` lists every key; errors are one line (``--debug`` for the traceback)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--help" in argv or "-h" in argv:
        method = argv[argv.index("--method") + 1] if "--method" in argv[:-1] else None
        script = os.path.relpath(sys.argv[0]) if sys.argv[0].endswith(".py") else "RECIPE.py"
        print(recipe_usage(script, default_config, method))
        raise SystemExit(0)
    debug = "--debug" in argv or os.environ.get("SORA_DS_DEBUG") == "1"
    if "--verbose" not in argv and os.environ.get("SORA_DS_VERBOSE") != "1":
        quiet_third_party()
    argv = [a for a in argv if a not in ("--debug", "--verbose")]
    try:
        return train(load_config(argv, default_config))[1]
    except TrainingStopped as e:
        _say(str(e))
        raise SystemExit(e.exit_code) from None
    except (*USER_ERRORS, RankTimeout) as e:
        if debug:
            raise
        _say(f"error: {e}" + ("" if isinstance(e, RankTimeout) else " (--debug shows the traceback)"))
        raise SystemExit(1 if isinstance(e, RankTimeout) else 2) from None


def quiet_third_party() -> None:
    """Known noise of the libraries underneath, which buries the run's own lines: DeepSpeed's accelerator guess on a
    machine without a GPU (said once per process) and the deprecation warnings of transformers, torch, accelerate
    and DeepSpeed (about their APIs, not the user's run). ``--verbose`` keeps them."""
    import warnings

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # what DeepSpeed would pick, without its warning
    for module in ("transformers", "torch", "accelerate", "deepspeed", "peft"):
        for category in (FutureWarning, DeprecationWarning):
            warnings.filterwarnings("ignore", category=category, module=module)


def _say(message: str) -> None:
    """One line on stderr, with the rank when there are several (each rank says its own)."""
    rank = f"[rank {os.environ['RANK']}] " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
    print(f"sora-ds: {rank}{message}", file=sys.stderr, flush=True)


@dataclass
class Window:
    """The steps since the last metrics record: summed loss and tokens (all ranks), the last gradient norm."""

    loss: float = 0.0
    steps: int = 0
    tokens: float = 0.0
    grad_norm: float = math.nan  # before clipping; NaN where the engine does not report it
    started: float = field(default_factory=time.perf_counter)


@dataclass
class Run:
    """The state the phases share."""

    cfg: TrainConfig
    accelerator: Any
    out: Path
    plain: nn.Module  # the model with its adapter layers, as the user would hold it
    model: nn.Module  # the same, as accelerate prepared it (a DeepSpeed engine under ZeRO)
    optimizer: Any
    lr_scheduler: Any
    batches: Any  # the training micro-batches, resumed where the last checkpoint left off
    eval_dl: DataLoader | None
    mem_dl: DataLoader  # a slice of the training data: the memorization score of each sparsity stage
    shapes: dict[str, tuple[int, int]]  # (in, out) features of every adapted layer
    progress: dict  # step, micro_batches, stages, lambda (keep_fraction's controller): saved in checkpoints
    stages: StageRecorder
    started: float
    trainable: list  # the prepared model's trainable parameters (what is clipped)
    identity: dict  # the settings a checkpoint records so that a resume can be checked (recipe/resume.py)
    tokenizer: Any  # saved beside every exported adapter
    data_counts: dict  # records read; examples, truncated and dropped of each split (build_datasets)
    evaluator: Evaluator | None = None  # every eval of the run: loss, accuracies, task metrics (recipe/task_eval.py)
    stop: StopRequest = field(default_factory=StopRequest)
    heartbeat: Heartbeat | None = None
    stop_requested: bool = False  # on any rank, after the last step (shared in the step's reduction)
    all_pruned: bool = False  # SoRA: no gate is non-zero on any rank after the last step
    step_lambda: float | None = None  # SoRA: the lambda of the last step
    kept_fraction: float | None = None  # SoRA: non-zero gate entries over all of them, on all ranks, after the last step
    started_training: float = 0.0  # set when the first step is about to run
    window: Window = field(default_factory=lambda: Window())  # what the next metrics record averages
    meter: Any = None  # tokens/s per device, MFU, peak memory (recipe/throughput.py)
    bar: Any = None

    @property
    def metrics_path(self) -> Path:
        return self.out / "metrics.jsonl"


def train(cfg: TrainConfig, on_step=None):
    """Train and write the outputs; returns ``(model with its adapter layers, summary)``.

    ``on_step(step, model, optimizer)``, if given, runs on every rank after each optimizer step (``model`` and
    ``optimizer`` as accelerate prepared them); tests use it to look into the ZeRO state mid-run.
    """
    run = start(cfg)
    cfg = run.cfg  # with num_train_epochs, max_steps is known only once the data is
    try:
        with run.stop:
            for step in range(run.progress["step"], cfg.max_steps):
                run.heartbeat.beat(step)
                optimizer_step(run, step)
                done = step + 1
                if on_step is not None:
                    on_step(done, run.model, run.optimizer)
                halt = run.stop_requested or run.all_pruned
                # an eval step gets its own line: evals ride on log lines, and eval_every need not be a multiple
                # of log_every
                evals = cfg.eval_every and done % cfg.eval_every == 0
                if done % cfg.log_every == 0 or evals or done == cfg.max_steps or halt:
                    log(run, done)
                lambdas = cfg.sparsity
                if lambdas is not None and (lambdas.is_stage_end(step) or (lambdas.sparsify_stages and done == cfg.max_steps)):
                    record_stage(run, step)
                if halt:
                    return run.plain, stop_early(run, done)
                if cfg.save_every and (done % cfg.save_every == 0 or done == cfg.max_steps):
                    checkpoint(run, done)  # the last step too: a finished run can be continued with more steps
    except RuntimeError as e:
        if is_timeout(e):
            raise timeout_error(run, e) from e
        raise
    finally:
        run.heartbeat.stop()
        run.bar.close()  # ends the bar's line, so an error message starts on its own
    return run.plain, finish(run)


def checkpoint(run: Run, done: int) -> Path:
    run.progress["stages"] = run.stages.as_dicts()
    return save_checkpoint(run.accelerator, run.plain, run.out, done, {**run.progress, **run.identity},
                           keep=run.cfg.save_total_limit, lineage=run.progress["checkpoints"])


def stop_early(run: Run, done: int):
    """After a Ctrl-C/SIGTERM (checkpoint, exit code 130) or once every SoRA rank is pruned (summary, exit code 1)."""
    if run.all_pruned:
        finish(run, stopped=f"every adapter rank was pruned at step {done}")
        raise TrainingStopped(
            f"every adapter rank was pruned at step {done} of {run.cfg.max_steps}: there is no adapter to export "
            f"(summary.json is in {run.out}). Lower sparse_lambda or learning_rate (or use threshold_mode: absolute "
            "with a smaller sparse_lambda)", exit_code=1)
    saved = f"checkpoint {checkpoint(run, done)}; continue with --resume_from latest" if run.cfg.save_every else \
        "no checkpoint saved (save_every is 0)"
    run.bar.close()
    run.accelerator.end_training()
    raise TrainingStopped(f"{run.stop.signal_name or 'a signal on another rank'}: stopped after step {done}; {saved}",
                          exit_code=130)


def timeout_error(run: Run, error: RuntimeError) -> RankTimeout:
    def describe(rank: int, seen: dict) -> str:
        silent = "never seen" if seen["silent_s"] is None else f"silent for {seen['silent_s']:.0f} s"
        step = "none" if seen["step"] is None else seen["step"] + 1
        return f"rank {rank} ({silent}, last started step {step})"

    who = ", ".join(describe(r, seen) for r, seen in run.heartbeat.silent().items()) or "another rank"
    return RankTimeout(
        f"rank {run.accelerator.process_index}: at step {run.progress['step'] + 1} a collective waited dist_timeout="
        f"{dist_timeout(run.cfg, run.accelerator.device.type == 'cuda')} s and {who} did not respond (hung, stopped "
        "or dead; check its log). Checkpoints already written are intact: --resume_from latest continues")


def start(cfg: TrainConfig) -> Run:
    """Set-up, data, model, optimizer, accelerate's prepare and the resume: everything before the first step."""
    started = time.perf_counter()
    # Before the accelerator: DeepSpeed's precision mode is fixed when it is built (sora_ds/recipe/precision.py).
    ds_config = launch_deepspeed_config(cfg.deepspeed_config)
    cfg, precision_note = consistent_precision(cfg, ds_config)
    if (ds_config or {}).get("zero_optimization", {}).get("stage") == 3:
        return_freed_memory()  # before the first gather (sora_ds/engine/host_memory.py)
    accelerator = build_accelerator(cfg)
    if precision_note:
        accelerator.print(f"sora-ds: {precision_note}")
    out = Path(cfg.output_dir)
    # Every check before the first byte of output: the checkpoint to resume and its settings, the output folder,
    # the data and the targets. A bad combination or malformed data fails before any model is loaded.
    fingerprint = dataset_fingerprint(cfg.dataset, cfg.dataset_split)
    layout = {"num_processes": accelerator.num_processes, "zero_stage": zero_stage(accelerator),
              "fsdp_version": fsdp_version(accelerator)}  # what the sharded state of a checkpoint needs again
    resume, saved = None, {}
    if cfg.resume_from:
        resume = resolve_checkpoint(cfg.resume_from, out)
        saved = read_state(resume)  # verifies the manifest: nothing of a modified checkpoint is unpickled
        if cfg.num_train_epochs is None:  # else the run length, a compared setting, is known after the data
            check_resume(saved, identity(cfg, fingerprint, **layout),
                         cfg.resume_allow_changes, f"checkpoint {resume}")
    remove = run_dir.conflicting_files(out, resume, saved.get("checkpoints", []), cfg.overwrite_output_dir)
    check_writable(out)
    check_quantization(cfg, accelerator)
    check_kernel_environment(cfg)
    tokenizer = load_tokenizer(cfg)
    train_ds, eval_ds, data_counts = build_datasets(cfg.dataset, tokenizer, cfg.max_length, cfg.eval_size, cfg.seed,
                                                    cfg.packing, cfg.truncation, cfg.dataset_split, cfg.eval_dataset)
    task = build_task(eval_ds, tokenizer, cfg)  # prompts and candidates, checked before the model is loaded
    if cfg.num_train_epochs is not None:
        cfg = cfg.with_max_steps(steps_for_epochs(cfg, len(train_ds), accelerator.num_processes))
        accelerator.print(f"num_train_epochs={cfg.num_train_epochs:g}: {cfg.max_steps} optimizer steps")
    ident = identity(cfg, fingerprint, **layout)
    if resume is not None and cfg.num_train_epochs is not None:
        check_resume(saved, ident, cfg.resume_allow_changes, f"checkpoint {resume}")
    check_targets(cfg, tokenizer, accelerator)
    accelerator.wait_for_everyone()  # every rank has checked the folder before the main process changes it
    if accelerator.is_main_process:
        run_dir.prepare(out, remove, resume)
        save_config(cfg, out / "config.yaml")
    accelerator.wait_for_everyone()
    plain = base_model(cfg, tokenizer, out, accelerator)
    inject(plain, cfg.adapter)
    shard_model(accelerator.fsdp2, cfg, plain)  # FSDP2: the optimizer must see the sharded (DTensor) parameters
    optimizer, lr_scheduler = build_optimizer_and_schedule(cfg, plain, use_fused_adamw(cfg, accelerator.device))
    train_dl, eval_dl, mem_dl = loaders(cfg, tokenizer, train_ds, eval_ds)
    keep_trainable_only(accelerator, plain)
    if accelerator.fsdp2 is None:
        model, optimizer, train_dl, lr_scheduler = accelerator.prepare(plain, optimizer, train_dl, lr_scheduler)
    else:  # already sharded: accelerate must not wrap it (in DDP) again
        model, (optimizer, train_dl, lr_scheduler) = plain, accelerator.prepare(optimizer, train_dl, lr_scheduler)
    trainable = [p for p in model.parameters() if p.requires_grad]
    check_deepspeed_internals(trainable, zero_stage(accelerator))
    eval_dl = accelerator.prepare(eval_dl) if eval_dl is not None else None
    mem_dl = accelerator.prepare(mem_dl)
    progress = {"step": 0, "micro_batches": 0, "stages": [], "run_id": uuid.uuid4().hex, "checkpoints": [],
                "lambda": first_lambda(cfg) if steered(cfg) else None}
    if resume is not None:
        load_checkpoint(accelerator, resume, plain)
        # A 0.3 checkpoint has no "lambda"; it cannot be of a keep_fraction run (the key is newer), so None is right.
        progress = {k: saved.get(k, v) if k == "lambda" else saved[k] for k, v in progress.items()}
        accelerator.print(f"resumed from {resume} at step {progress['step']}")
    run = Run(cfg=cfg, accelerator=accelerator, out=out, plain=plain, model=model, optimizer=optimizer,
              lr_scheduler=lr_scheduler, batches=micro_batches(train_dl, progress["micro_batches"]), eval_dl=eval_dl,
              mem_dl=mem_dl, shapes={n: (m.in_features, m.out_features) for n, m in adapter_layers(plain)},
              progress=progress, stages=StageRecorder.from_dicts(progress["stages"]), started=started, trainable=trainable,
              identity=ident, tokenizer=tokenizer, data_counts=data_counts, heartbeat=Heartbeat().start(),
              evaluator=Evaluator(eval_dl, task, accelerator, tokenizer, out))
    run.meter = Throughput.for_run(plain.config, adapter_params(rank_report(plain), run.shapes, "initial"),
                                   cfg.max_length, accelerator, cfg.peak_flops_per_device)
    open_logs(run, resumed=resume is not None)
    model.train()
    run.started_training = time.perf_counter()
    run.window = Window()  # tokens/s counts training time only
    return run


def steered(cfg: TrainConfig) -> bool:
    """SoRA with keep_fraction: lambda comes from the controller, whose state (``progress["lambda"]``) is saved."""
    return cfg.sparsity is not None and cfg.sparsity.keep_fraction is not None


def first_lambda(cfg: TrainConfig) -> float | None:
    """SoRA's lambda at step 0: the schedule's, or keep_fraction's starting point (None for AdaLoRA)."""
    lambdas = cfg.sparsity
    if lambdas is None:
        return None
    return lambdas.sparse_lambda if steered(cfg) else lambdas(0)


def build_optimizer_and_schedule(cfg: TrainConfig, model: nn.Module, fused: bool = False):
    optimizer = build_optimizer(
        model,
        learning_rate=cfg.learning_rate,
        weight_decay=cfg.weight_decay,
        sparse_lambda=first_lambda(cfg) or 0.0,
        threshold_mode=cfg.threshold_mode,
        gate_learning_rate=cfg.gate_learning_rate,
        fused=fused,
    )
    from transformers import get_scheduler

    return optimizer, get_scheduler(cfg.lr_scheduler_type, optimizer, cfg.warmup_steps, cfg.max_steps)


def loaders(cfg: TrainConfig, tokenizer, train_ds, eval_ds) -> tuple[DataLoader, DataLoader | None, DataLoader]:
    """Training (seeded, resumable order), held-out, and memorization (a training slice the size of the eval set)."""
    collate_fn = functools.partial(collate, pad_token_id=tokenizer.pad_token_id)
    bs = cfg.per_device_train_batch_size
    flat = flatten_packed(cfg)  # packed rows as one row for FlashAttention (kernels.py); the scores one row a batch
    train_dl = DataLoader(train_ds, bs, sampler=EpochSampler(len(train_ds), cfg.seed), drop_last=True,
                          collate_fn=functools.partial(collate_fn, flatten=flat))
    eval_dl = DataLoader(eval_ds, bs, collate_fn=collate_fn) if eval_ds else None
    mem_ds = train_ds.select(range(min(len(train_ds), len(eval_ds) if eval_ds else 64)))
    return train_dl, eval_dl, DataLoader(mem_ds, 1 if flat else bs, collate_fn=collate_fn)


def open_logs(run: Run, resumed: bool) -> None:
    """Trackers, ``metrics.jsonl`` (cut back to the resumed step) and the progress bar."""
    cfg, accelerator = run.cfg, run.accelerator
    if cfg.report_to:
        from .trackers import RunTensorBoard

        # Trackers take scalars (TensorBoard's hparams): lists and mappings go in as their text.
        hparams = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in cfg.to_dict().items()}
        for tracker in accelerator.log_with:
            if isinstance(tracker, RunTensorBoard):
                tracker.resume_at(run.progress["step"] if resumed else 0)
        accelerator.init_trackers(run.out.resolve().name, config=hparams)
    if accelerator.is_main_process:
        lines = run.metrics_path.read_text().splitlines(keepends=True) if resumed and run.metrics_path.is_file() else []
        run.metrics_path.write_text("".join(line for line in lines if json.loads(line)["step"] <= run.progress["step"]))
        if resumed:
            trim_samples(run.out, run.progress["step"])
    from tqdm.auto import tqdm

    run.bar = tqdm(total=cfg.max_steps, initial=run.progress["step"], disable=not accelerator.is_local_main_process,
                   desc=cfg.method)


def optimizer_step(run: Run, step: int) -> None:
    """One optimizer step over ``gradient_accumulation_steps`` micro-batches."""
    cfg, accelerator, model = run.cfg, run.accelerator, run.model
    lambdas = cfg.sparsity
    if lambdas is not None:
        run.step_lambda = run.progress["lambda"] if steered(cfg) else lambdas(step)
        set_sparse_lambda(run.optimizer, run.step_lambda)
    micro = [next(run.batches) for _ in range(cfg.gradient_accumulation_steps)]
    # Normalise by the supervised tokens of the whole optimizer step on all ranks, so the gradient is the same
    # token mean whatever the process count or accumulation (DDP/ZeRO average over ranks, backward over micro).
    n_items = accelerator.reduce(sum(supervised_tokens(b) for b in micro).to(accelerator.device), reduction="sum")
    undo_means = accelerator.num_processes * cfg.gradient_accumulation_steps
    orth_weight = cfg.adapter.orth_reg_weight if cfg.method == "adalora" else 0.0
    step_loss = torch.zeros((), device=accelerator.device)
    for batch in micro:
        with accelerator.accumulate(model):
            loss = model(**batch, num_items_in_batch=n_items).loss
            # The penalties are per optimizer step: backward's 1/accumulation and the ranks' mean undo each other.
            accelerator.backward(loss * undo_means + gate_l1_penalty(run.plain, cfg.gate_l1) + orth_loss(run.plain, orth_weight))
            if accelerator.sync_gradients:  # max_grad_norm 0: measured, not clipped (scaling by 1 changes nothing)
                norm = accelerator.clip_grad_norm_(run.trainable, cfg.max_grad_norm or math.inf)
                run.window.grad_norm = float(norm) if norm is not None else math.nan
            run.optimizer.step()
            run.lr_scheduler.step()
            run.optimizer.zero_grad(set_to_none=True)
        step_loss += loss.detach().float()
    # One reduction for everything the ranks must agree on after the step: the loss, the tokens seen, whether any
    # rank was asked to stop, and (SoRA) how many gate entries are non-zero on the ranks' shards out of how many they
    # hold, so that every rank takes the same decision (and keep_fraction's controller the same lambda).
    tokens = sum(_tokens(b) for b in micro)
    own = torch.tensor([float(tokens), float(run.stop.requested)], device=accelerator.device)
    shared = torch.cat([step_loss.reshape(1), own, _gate_counts(run).to(accelerator.device)])
    loss_sum, tokens, stops, live, held = accelerator.reduce(shared, reduction="sum").tolist()
    run.stop_requested, run.all_pruned = stops > 0, lambdas is not None and live == 0
    if lambdas is not None:
        run.kept_fraction = live / held
        if steered(cfg):
            run.progress["lambda"] = lambdas.next_lambda(run.step_lambda, step + 1, run.kept_fraction)
    run.window.loss += loss_sum
    run.window.tokens += tokens
    run.window.steps += 1
    run.progress["step"], run.progress["micro_batches"] = step + 1, run.progress["micro_batches"] + len(micro)
    run.bar.update(1)


def _tokens(batch: dict) -> int:
    """Real (non-padding) tokens of a batch: its attention mask, or every position of a packed row."""
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else batch["input_ids"].numel()


def _gate_counts(run: Run) -> torch.Tensor:
    """``[non-zero, held]`` SoRA gate entries on this rank (its ZeRO-3 shards: no gather; the padding of a shard is
    not held); ``[-1, -1]`` for AdaLoRA, which cannot prune every rank (its budget keeps target_r per matrix on
    average). Summed over the ranks, non-zero / held is the kept fraction with or without ZeRO-3."""
    if run.cfg.sparsity is None:
        return torch.tensor([-1.0, -1.0])
    gates = [m.gate for _, m in adapter_layers(run.plain) if m.gate is not None]
    live = sum(int((local_shard(g) != 0).sum()) for g in gates)
    return torch.tensor([float(live), float(sum(local_numel(g) for g in gates))])


def log(run: Run, done: int) -> None:
    """One line of ``metrics.jsonl`` and the trackers: mean loss since the last line, lr, gradient norm, tokens/s
    (all ranks), lambda or budget, ranks, and the wall-clock time."""
    cfg, accelerator, w = run.cfg, run.accelerator, run.window
    elapsed = time.perf_counter() - w.started
    norm = None if math.isnan(w.grad_norm) else w.grad_norm  # JSON has no NaN
    record = {"step": done, "loss": w.loss / w.steps, "lr": run.lr_scheduler.get_last_lr()[0], "grad_norm": norm,
              "tokens_per_s": w.tokens / elapsed if elapsed > 0 else math.nan,
              **run.meter.record(w.tokens, elapsed, accelerator),
              "time": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    if cfg.sparsity is None:
        record["budget"] = adalora_budget(run.optimizer)
    else:
        record["lambda"] = run.step_lambda
        record["kept_fraction"] = run.kept_fraction
        if steered(cfg):
            record["target_keep"] = cfg.sparsity.target_keep(done)
    record["active_ranks"] = sum(r["kept"] for r in rank_report(run.plain).values())
    run.window = Window()
    if cfg.eval_every and run.eval_dl is not None and done % cfg.eval_every == 0:
        record.update(as_record(run.evaluator(run.model, done), "eval_"))
    run.bar.set_postfix(loss=f"{record['loss']:.3f}", ranks=record["active_ranks"])
    if accelerator.is_main_process:
        with run.metrics_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
    accelerator.log({k: v for k, v in record.items() if k != "step" and not isinstance(v, list)}, step=done)


def record_stage(run: Run, step: int) -> None:
    """At the end of a sparsity stage: non-zero adapter parameters, memorization and generalization scores."""
    accelerator = run.accelerator
    mem = evaluate(run.model, run.mem_dl, accelerator)["token_accuracy"]
    gen = evaluate(run.model, run.eval_dl, accelerator)["token_accuracy"] if run.eval_dl is not None else math.nan
    run.stages.record(
        stage=run.cfg.sparsity.stage(step),
        step=step + 1,
        sparse_lambda=run.cfg.sparsity(step),
        nonzero_params=adapter_params(rank_report(run.plain), run.shapes),
        memorization_score=mem,
        generalization_score=gen,
    )


def export_adapters(run: Run) -> dict[str, dict]:
    """The adapter in every format of ``export_formats`` (``peft`` -> ``adapter/``, others -> ``adapter_<format>/``);
    returns ``{folder: serving record}`` on the main process (a collective: every rank calls it)."""
    cfg, out = run.cfg, run.out
    base = cfg.model_name_or_path or str((out / "base_model").resolve())
    records = {}
    for fmt in cfg.export_formats:
        folder = "adapter" if fmt == "peft" else f"adapter_{fmt}"
        try:
            record = export_format(run.plain, fmt, out / folder, base_model_name_or_path=base, tokenizer=run.tokenizer)
        except ValueError as e:  # a rank above vLLM's largest bucket: the other formats are still written
            run.accelerator.print(f"export_formats: {fmt} not written: {e}")
            record = {"format": fmt, "error": str(e)}
        if record is not None:
            records[folder] = record
    return records


def _bytes_per_param(model: nn.Module) -> int:
    """Bytes per adapter parameter (the dtype, not the tensor: under ZeRO-3 a partitioned one is empty here)."""
    _, module = next(iter(adapter_layers(model)))
    return torch.empty(0, dtype=module.lora_A.dtype).element_size()


def finish(run: Run, stopped: str | None = None) -> dict:
    """Final eval, the PEFT export, ``summary.json``, the rank heatmap and table; ``merged/`` if asked.
    ``stopped``: why the run ended early with nothing to export (the summary is still written)."""
    cfg, accelerator, out, plain = run.cfg, run.accelerator, run.out, run.plain
    run.bar.close()
    train_time = time.perf_counter() - run.started_training
    final = run.evaluator(run.model, run.progress["step"])
    accelerator.log(as_record(final, "final_eval_"), step=run.progress["step"])
    report = rank_report(plain)
    kept, initial = (sum(r[k] for r in report.values()) for k in ("kept", "initial"))
    formats = export_adapters(run) if stopped is None else {}
    summary = {
        "method": cfg.method,
        "initial_ranks": {n: r["initial"] for n, r in report.items()},
        "kept_ranks": {n: r["kept"] for n, r in report.items()},
        "total_initial_ranks": initial,
        "total_kept_ranks": kept,
        "keep_fraction": cfg.sparsity.keep_fraction if cfg.sparsity is not None else None,
        "kept_fraction": kept / initial,
        "retained_adapter_param_fraction": retained_fraction(report, run.shapes),
        **{f"final_eval_{k}": v for k, v in final.items()},  # loss, token_accuracy, answer_accuracy (+ task metrics)
        "steps": run.progress["step"],
        "stopped_early": stopped,
        "data": run.data_counts,
        "num_processes": accelerator.num_processes,
        "zero_stage": zero_stage(accelerator),
        "fsdp_version": fsdp_version(accelerator),
        **sharding_report(plain, adapter_tensors([m for _, m in adapter_layers(plain)])),
        "train_time_s": train_time,
        "throughput": run.meter.summary(),  # run averages of the metrics records' tokens/s and mfu
        "wall_time_s": time.perf_counter() - run.started,
        "stages": run.stages.as_dicts(),
        "serving": {**serving_cost(report, run.shapes, _bytes_per_param(plain)), "formats": formats},
    }
    if accelerator.is_main_process:
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        plot_rank_heatmap(report, out / "rank_heatmap.png")
        accelerator.print(rank_table(report))
        accelerator.print(serving_lines(summary["serving"]))
        accelerator.print(
            f"retained adapter params: {summary['retained_adapter_param_fraction']:.1%}  "
            f"final eval loss: {final['loss']:.4f}  wall time: {summary['wall_time_s']:.1f}s  -> {out}"
        )
    if cfg.save_merged and stopped is None:
        if accelerator.state.deepspeed_plugin is not None or accelerator.fsdp2:
            accelerator.print("save_merged is skipped under DeepSpeed and FSDP2; merge the exported adapter afterwards")
        elif accelerator.is_main_process:
            save_merged(plain, out / "merged")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary
