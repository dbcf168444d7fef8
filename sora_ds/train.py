"""The shared training entry behind every recipe script: config -> data -> model -> SoRA or AdaLoRA -> accelerate
loop -> outputs (the same outputs for both methods).

Outputs in ``output_dir``: ``config.yaml`` (resolved config), ``metrics.jsonl``, ``summary.json``,
``rank_heatmap.png``, ``adapter/`` (PEFT LoRA export), ``base_model/`` (when the base was built from a config),
``merged/`` (with ``save_merged: true``).
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from .atomic import atomic_dir
from .batches import IGNORE_INDEX, EpochSampler, micro_batches, supervised_tokens
from .chat_data import build_datasets, collate
from .checkpoint import keep_trainable_only, load_checkpoint, resolve_checkpoint, save_checkpoint
from .compact import adapter_tensors, rank_report
from .export import export_peft, save_merged
from .inject import inject, sora_modules
from .optim import adalora_budget, build_optimizer, gate_l1_penalty, set_sparse_lambda
from .orthogonal import orth_loss
from .report import adapter_params, plot_rank_heatmap, rank_table, retained_fraction
from .quantized import check_4bit_layout
from .schedule import StageRecorder
from .train_config import ConfigError, TrainConfig, load_config, save_config
from .zero import (
    check_deepspeed_internals,
    check_deepspeed_version,
    sharding_report,
    without_zero_init,
    zero_stage,
)


def main(defaults: dict | None = None, argv: list[str] | None = None) -> dict:
    """Entry point of the recipe scripts: parse ``--config``/overrides over ``defaults`` and train."""
    return run(load_config(argv, defaults))


def build_accelerator(cfg: TrainConfig):
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin, GradientAccumulationPlugin, InitProcessGroupKwargs

    # Launched on several processes without a GPU, accelerate would pick no backend (and DeepSpeed would then see
    # one process): ask for gloo. A plain single process must not ask, or accelerate expects a process group.
    multi = int(os.environ.get("WORLD_SIZE", "1")) > 1
    handlers = [InitProcessGroupKwargs(backend="gloo", timeout=timedelta(minutes=10))] if multi and not torch.cuda.is_available() else []
    plugin = GradientAccumulationPlugin(num_steps=cfg.gradient_accumulation_steps, sync_with_dataloader=False)
    ds_plugin = None
    if cfg.deepspeed_config and os.environ.get("ACCELERATE_USE_DEEPSPEED", "false") != "true":
        # Started by `deepspeed` or torchrun rather than `accelerate launch`: build the plugin from the JSON.
        stage = json.loads(Path(cfg.deepspeed_config).read_text()).get("zero_optimization", {}).get("stage", 0)
        ds_plugin = DeepSpeedPlugin(hf_ds_config=cfg.deepspeed_config, zero3_init_flag=stage == 3)
    accelerator = Accelerator(
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_plugin=plugin,
        kwargs_handlers=handlers,
        deepspeed_plugin=ds_plugin,
        log_with=cfg.report_to or None,
        project_dir=cfg.output_dir,
    )
    ds = accelerator.state.deepspeed_plugin
    if ds is not None:
        check_deepspeed_version()
        if ds.deepspeed_config.get("gradient_clipping", "auto") == "auto":
            ds.deepspeed_config["gradient_clipping"] = cfg.max_grad_norm  # the recipe YAML owns clipping
    return accelerator


def load_tokenizer(cfg: TrainConfig):
    from transformers import AutoTokenizer

    name = cfg.tokenizer_name_or_path or cfg.model_name_or_path
    if name:
        tok = AutoTokenizer.from_pretrained(name)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        return tok
    from .tokenizer import build_byte_tokenizer

    return build_byte_tokenizer()


def load_model(cfg: TrainConfig, path: str, quantization=None, device=None):
    """The base model from ``path`` (a folder or a hub id).

    Under ZeRO-3 (accelerate's DeepSpeed plugin with ``zero3_init_flag``) transformers loads it inside
    ``deepspeed.zero.Init``: every rank only ever holds its own slice of the base weights. With ``quantization``
    (a ``BitsAndBytesConfig``) the weights are quantized while loading, on ``device`` (None under ZeRO-3).
    """
    from transformers import AutoModelForCausalLM

    extra = {"quantization_config": quantization} if quantization else {}
    if quantization and device is not None:
        extra["device_map"] = {"": device}
    return AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, cfg.torch_dtype), **extra)


def build_base_model(cfg: TrainConfig, tokenizer, path: Path, accelerator):
    """Build the ``model_config`` base once, seeded, on the main process, and save it to ``path``.

    Why once and outside ``zero.Init``: under ZeRO-3 transformers would initialise each rank's slice with its own
    random draws, so the same seed gave another base at another process count or stage. Here the base depends on
    the seed only; every other process (and every ZeRO-3 process) loads the saved copy. Returns the built model on
    the main process, ``None`` elsewhere. Collective (a barrier).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    model = None
    if accelerator.is_main_process:
        kwargs = dict(cfg.model_config)
        config = AutoConfig.for_model(
            kwargs.pop("model_type", "llama"),
            vocab_size=len(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            **kwargs,
        )
        # Saving inside too: with ZeRO-3 on, save_pretrained would gather (a collective) on this process alone.
        with without_zero_init(accelerator.state.deepspeed_plugin), atomic_dir(path) as tmp:
            torch.manual_seed(cfg.seed)
            model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, cfg.torch_dtype))
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    accelerator.wait_for_everyone()
    return model


def check_quantization(cfg: TrainConfig, accelerator) -> None:
    """Refuse quantization + DeepSpeed combinations that cannot work, before anything is loaded."""
    ds = accelerator.state.deepspeed_plugin
    q = cfg.quantization
    if not q or ds is None:
        return
    zero = ds.deepspeed_config.get("zero_optimization", {})
    offloaded = [k for k in ("offload_param", "offload_optimizer") if zero.get(k, {}).get("device", "none") not in ("none", None)]
    if offloaded:
        raise ConfigError(
            f"quantization with DeepSpeed {offloaded} is not supported (CPU offload with a quantized base uses more "
            "GPU memory, not less); use launch/accelerate/zero3.yaml or zero2.yaml"
        )
    if zero.get("stage") == 3:
        if q.get("load_in_8bit"):
            raise ConfigError(
                "quantization.load_in_8bit cannot be sharded by ZeRO-3 (int8 weights cannot be flattened); use "
                f"load_in_4bit with bnb_4bit_quant_storage: {cfg.torch_dtype}, or ZeRO-2"
            )
        if q.get("bnb_4bit_quant_storage") != cfg.torch_dtype:
            raise ConfigError(
                f"4-bit under ZeRO-3 needs quantization.bnb_4bit_quant_storage: {cfg.torch_dtype} (the model's "
                f"torch_dtype) so the packed weights can be flattened and sharded; got "
                f"{q.get('bnb_4bit_quant_storage')!r}"
            )


@torch.no_grad()
def evaluate(model, loader, accelerator) -> dict[str, float]:
    """Token-weighted loss and next-token accuracy over supervised tokens, summed across processes.

    Per-example sums go through ``gather_for_metrics``: with several processes accelerate pads the last batches
    by repeating examples, which a plain sum would count twice (and the eval would depend on the process count).
    """
    was_training = model.training
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=accelerator.device)
    for batch in loader:
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
        logits = model(**inputs).logits[:, :-1]
        labels = batch["labels"][:, 1:]
        mask = labels != IGNORE_INDEX
        picked, target = logits[mask].float(), labels[mask]  # fp32 only for the supervised positions
        per_token = torch.stack([F.cross_entropy(picked, target, reduction="none").double(),
                                 torch.ones_like(target, dtype=torch.float64),
                                 (picked.argmax(-1) == target).double()], dim=1)
        per_example = torch.zeros(labels.shape[0], 3, dtype=torch.float64, device=per_token.device)
        per_example.index_add_(0, mask.nonzero()[:, 0], per_token)
        totals += accelerator.gather_for_metrics(per_example).sum(0)
    check_4bit_layout(model)
    model.train(was_training)
    n = max(totals[1].item(), 1.0)
    return {"loss": totals[0].item() / n, "token_accuracy": totals[2].item() / n}


def run(cfg: TrainConfig) -> dict:
    """Train, write the outputs, return the summary."""
    return train(cfg)[1]


def train(cfg: TrainConfig, on_step=None):
    """Train and write the outputs; returns ``(model with its adapter layers, summary)``.

    ``on_step(step, model, optimizer)``, if given, runs on every rank after each optimizer step (``model`` and
    ``optimizer`` as accelerate prepared them); tests use it to look into the ZeRO state mid-run.
    """
    started = time.perf_counter()
    accelerator = build_accelerator(cfg)
    out = Path(cfg.output_dir)
    resume = resolve_checkpoint(cfg.resume_from, out) if cfg.resume_from else None
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")

    # Cheap checks and the data first: a bad combination or a malformed dataset fails before any model is loaded.
    check_quantization(cfg, accelerator)
    tokenizer = load_tokenizer(cfg)
    train_ds, eval_ds = build_datasets(cfg.dataset, tokenizer, cfg.max_length, cfg.eval_size, cfg.seed, cfg.packing)
    quantization = cfg.bnb_config()
    zero3 = zero_stage(accelerator) == 3
    source, model = cfg.model_name_or_path, None
    if not source:
        source = str(out / "base_model")
        model = build_base_model(cfg, tokenizer, out / "base_model", accelerator)
    if model is None or quantization is not None or zero3:
        # Quantize while loading (bitsandbytes quantizes on placement); under ZeRO-3 load partitioned.
        del model
        model = load_model(cfg, source, quantization, device=None if zero3 else accelerator.device)
    if quantization is not None and not zero3:
        from peft import prepare_model_for_kbit_training

        # Norms and other small float params go to fp32 for stable training on a quantized base.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    # Training never reads a KV cache; without one, packed rows (position_ids, no attention mask) also get their
    # block-diagonal mask (transformers only looks for packed sequences when there is no cache).
    model.config.use_cache = False
    if cfg.gradient_checkpointing:
        # Non-reentrant: correct with a frozen base (no inputs needing grad) and under ZeRO-3.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    inject(model, cfg.adapter_config())
    shapes = {n: (m.in_features, m.out_features) for n, m in sora_modules(model)}
    lambdas = cfg.lambda_schedule_obj()
    optimizer = build_optimizer(
        model,
        learning_rate=cfg.learning_rate,
        weight_decay=cfg.weight_decay,
        sparse_lambda=lambdas(0),
        threshold_mode=cfg.threshold_mode,
        gate_learning_rate=cfg.gate_learning_rate,
    )
    from transformers import get_scheduler

    lr_scheduler = get_scheduler(cfg.lr_scheduler_type, optimizer, cfg.warmup_steps, cfg.max_steps)

    collate_fn = functools.partial(collate, pad_token_id=tokenizer.pad_token_id)
    bs = cfg.per_device_train_batch_size
    train_dl = DataLoader(train_ds, bs, sampler=EpochSampler(len(train_ds), cfg.seed), collate_fn=collate_fn, drop_last=True)
    eval_dl = DataLoader(eval_ds, bs, collate_fn=collate_fn) if eval_ds else None
    mem_ds = train_ds.select(range(min(len(train_ds), len(eval_ds) if eval_ds else 64)))
    mem_dl = DataLoader(mem_ds, bs, collate_fn=collate_fn)
    plain = model
    keep_trainable_only(accelerator, plain)
    model, optimizer, train_dl, lr_scheduler = accelerator.prepare(model, optimizer, train_dl, lr_scheduler)
    trainable = [p for p in model.parameters() if p.requires_grad]
    check_deepspeed_internals(trainable, zero_stage(accelerator))
    eval_dl = accelerator.prepare(eval_dl) if eval_dl is not None else None
    mem_dl = accelerator.prepare(mem_dl)

    loop = {"step": 0, "micro_batches": 0, "stages": []}
    if resume is not None:
        loop = load_checkpoint(accelerator, resume)
        accelerator.print(f"resumed from {resume} at step {loop['step']}")
    stages = StageRecorder.from_dicts(loop["stages"])
    if cfg.report_to:
        # Trackers take scalars (TensorBoard's hparams): lists and mappings go in as their text.
        hparams = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in cfg.to_dict().items()}
        accelerator.init_trackers(out.resolve().name, config=hparams)
    metrics_path = out / "metrics.jsonl"
    if accelerator.is_main_process:
        kept = [line for line in _read_lines(metrics_path) if json.loads(line)["step"] <= loop["step"]] if resume else []
        metrics_path.write_text("".join(kept))
    batches = micro_batches(train_dl, loop["micro_batches"])
    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.max_steps, initial=loop["step"], disable=not accelerator.is_local_main_process, desc=cfg.method)
    orth_weight = cfg.orth_reg_weight if cfg.method == "adalora" else 0.0
    model.train()
    train_started = time.perf_counter()
    window_loss, window_n = 0.0, 0
    for step in range(loop["step"], cfg.max_steps):
        lam = lambdas(step)
        set_sparse_lambda(optimizer, lam)
        micro = [next(batches) for _ in range(cfg.gradient_accumulation_steps)]
        # Normalise by the supervised tokens of the whole optimizer step on all ranks, so the gradient is the same
        # token mean whatever the process count or accumulation (DDP/ZeRO average over ranks, backward over micro).
        n_items = accelerator.reduce(sum(supervised_tokens(b) for b in micro).to(accelerator.device), reduction="sum")
        undo_means = accelerator.num_processes * cfg.gradient_accumulation_steps
        step_loss = torch.zeros((), device=accelerator.device)
        for batch in micro:
            with accelerator.accumulate(model):
                loss = model(**batch, num_items_in_batch=n_items).loss
                # The penalties are per optimizer step: backward's 1/accumulation and the ranks' mean undo each other.
                accelerator.backward(loss * undo_means + gate_l1_penalty(plain, cfg.gate_l1) + orth_loss(plain, orth_weight))
                if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(trainable, cfg.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            step_loss += loss.detach().float()
        window_loss += accelerator.reduce(step_loss, reduction="sum").item()
        window_n += 1
        loop["step"], loop["micro_batches"] = step + 1, loop["micro_batches"] + len(micro)
        bar.update(1)
        done = step + 1
        if on_step is not None:
            on_step(done, model, optimizer)
        if done % cfg.log_every == 0 or done == cfg.max_steps:
            record = {"step": done, "loss": window_loss / window_n, "lr": lr_scheduler.get_last_lr()[0]}
            record.update({"budget": adalora_budget(optimizer)} if cfg.method == "adalora" else {"lambda": lam})
            record["active_ranks"] = sum(r["kept"] for r in rank_report(plain).values())
            window_loss, window_n = 0.0, 0
            if cfg.eval_every and eval_dl is not None and done % cfg.eval_every == 0:
                record["eval_loss"] = evaluate(model, eval_dl, accelerator)["loss"]
            bar.set_postfix(loss=f"{record['loss']:.3f}", ranks=record["active_ranks"])
            if accelerator.is_main_process:
                with metrics_path.open("a") as f:
                    f.write(json.dumps(record) + "\n")
            accelerator.log({k: v for k, v in record.items() if k != "step"}, step=done)
        if lambdas.is_stage_end(step) or (lambdas.sparsify_stages and done == cfg.max_steps):
            _record_stage(stages, lambdas, step, lam, plain, shapes, model, mem_dl, eval_dl, accelerator)
        if cfg.save_every and done % cfg.save_every == 0 and done < cfg.max_steps:
            loop["stages"] = stages.as_dicts()
            save_checkpoint(accelerator, plain, out, done, loop, keep=cfg.save_total_limit)
    bar.close()
    train_time = time.perf_counter() - train_started

    final = evaluate(model, eval_dl, accelerator) if eval_dl is not None else {"loss": math.nan, "token_accuracy": math.nan}
    report = rank_report(plain)
    export_peft(plain, out / "adapter", base_model_name_or_path=cfg.model_name_or_path or str((out / "base_model").resolve()))
    summary = {
        "method": cfg.method,
        "initial_ranks": {n: r["initial"] for n, r in report.items()},
        "kept_ranks": {n: r["kept"] for n, r in report.items()},
        "total_initial_ranks": sum(r["initial"] for r in report.values()),
        "total_kept_ranks": sum(r["kept"] for r in report.values()),
        "retained_adapter_param_fraction": retained_fraction(report, shapes),
        "final_eval_loss": final["loss"],
        "final_eval_token_accuracy": final["token_accuracy"],
        "steps": cfg.max_steps,
        "num_processes": accelerator.num_processes,
        "zero_stage": zero_stage(accelerator),
        **sharding_report(plain, adapter_tensors([m for _, m in sora_modules(plain)])),
        "train_time_s": train_time,
        "wall_time_s": time.perf_counter() - started,
        "stages": stages.as_dicts(),
    }
    if accelerator.is_main_process:
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        plot_rank_heatmap(report, out / "rank_heatmap.png")
        accelerator.print(rank_table(report))
        accelerator.print(
            f"retained adapter params: {summary['retained_adapter_param_fraction']:.1%}  "
            f"final eval loss: {final['loss']:.4f}  wall time: {summary['wall_time_s']:.1f}s  -> {out}"
        )
    if cfg.save_merged:
        if accelerator.state.deepspeed_plugin is not None:
            accelerator.print("save_merged is skipped under DeepSpeed; merge the exported adapter afterwards")
        elif accelerator.is_main_process:
            save_merged(plain, out / "merged")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return plain, summary


def _read_lines(path: Path) -> list[str]:
    return path.read_text().splitlines(keepends=True) if path.is_file() else []


def _record_stage(stages, lambdas, step, lam, plain, shapes, model, mem_dl, eval_dl, accelerator) -> None:
    report = rank_report(plain)
    nonzero = adapter_params(report, shapes)
    mem = evaluate(model, mem_dl, accelerator)["token_accuracy"]
    gen = evaluate(model, eval_dl, accelerator)["token_accuracy"] if eval_dl is not None else math.nan
    stages.record(
        stage=lambdas.stage(step),
        step=step + 1,
        sparse_lambda=lam,
        nonzero_params=nonzero,
        memorization_score=mem,
        generalization_score=gen,
    )
