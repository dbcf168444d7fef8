"""Train-step overhead of SoRA against PEFT LoRA on the same model, measured side by side in one run.

What it measures
    The wall-clock time of one full training step (forward with labels, backward, ``optimizer.step()``,
    ``zero_grad(set_to_none=True)``) for two arms that differ only in the adapter:

    * SoRA: ``sora_ds.inject(model, SoRAConfig(r, lora_alpha=2r, target_modules, init_seed=seed))`` and
      ``sora_ds.build_optimizer(model, learning_rate=1e-4, sparse_lambda=...)`` (AdamW plus the proximal
      soft-threshold step on the gates);
    * LoRA: ``peft.get_peft_model(model, LoraConfig(r, lora_alpha=2r, target_modules, lora_dropout=0.0))`` and
      ``torch.optim.AdamW`` over the trainable parameters, same learning rate.

    It prints the median step time of each arm, its p10/p90, the ratio SoRA/LoRA of the medians (target <= 1.05),
    the same ratio computed within each repeat (min/max across repeats, to show the noise), the ratios of the p10s
    and of the minima (less sensitive to other work competing for the CPU), the trainable parameter counts (they
    differ by the gates only: r per adapted module), and on CUDA the peak memory of one step. On Linux it also prints
    the host's CPU pressure (PSI) and load after timing, and a NOTE when the timings look noisy.

How
    * The model is a Llama-architecture ``LlamaForCausalLM`` built from a ``LlamaConfig`` (nothing downloaded),
      initialised once under ``--seed`` and deep-copied for each arm, so both arms have identical base weights.
      Both arms start with B = 0, so their first losses must agree: this is printed as a check.
    * Both arms use the same fixed random batch (``labels = input_ids``), the same dtype and the same optimizer
      hyper-parameters (lr 1e-4, betas (0.9, 0.999), eps 1e-8, weight decay 0; torch's AdamW defaults to 0.01, which
      would add one op per tensor to the LoRA arm only). PEFT is called with ``autocast_adapter_dtype=False`` so that
      under ``--dtype bf16`` its adapters stay bf16 as SoRA's do (PEFT would otherwise upcast them to fp32).
    * ``--sparse-lambda`` (default 1e-3, ``threshold_mode="lr_scaled"``, i.e. a shrink of lr * lambda = 1e-7 per
      step) keeps the proximal step in the measured path while letting (almost) no gate die, so the shapes of both
      arms stay equal; the number of dead gate entries is printed at the end.
    * Timing is interleaved step by step: within a repeat the arms alternate A B A B ..., and the arm that goes first
      alternates between repeats, so drift (frequency scaling, other processes) hits both arms alike. Each step is
      timed with ``time.perf_counter``; on CUDA the device is synchronised before and after each step. The medians
      are taken over all timed steps of all repeats. ``--phases`` also times forward / backward / optimizer
      separately (on CUDA this adds synchronisations inside the step, so the totals then include them).
    * The script only prints (and writes ``--json``); it asserts nothing about timings.

Commands
    CPU (defaults: hidden 256, 4 layers, batch 4 x 128 tokens, ~150 ms a step and under a minute in all on 2 idle
    cores; a busy host stretches both)::

        python bench/step_overhead.py
        python bench/step_overhead.py --threads 2 --json /tmp/step_overhead_cpu.json

    CUDA GPU, bf16, a larger model::

        python bench/step_overhead.py --device cuda --dtype bf16 --hidden-size 2048 --layers 8 \\
            --intermediate-size 5504 --heads 16 --kv-heads 16 --vocab-size 32000 --seq-len 1024 --batch-size 4 \\
            --steps 50 --json /tmp/step_overhead_gpu.json
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import platform
import statistics
import time
import warnings

import harness as h
import torch

import sora_ds

warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*is deprecated", category=FutureWarning)
TARGET_RATIO = 1.05


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    h.model_args(p, "model", hidden_size=256, layers=4, intermediate_size=688, heads=8, kv_heads=8, vocab_size=4096,
                 seq_len=128, batch_size=4)
    g = p.add_argument_group("adapters")
    g.add_argument("--rank", type=int, default=8, help="start rank of both arms (lora_alpha = 2 * rank)")
    h.targets_arg(g)
    g.add_argument("--sparse-lambda", type=float, default=1e-3,
                   help="SoRA gate L1 strength (lr_scaled: shrink lr*lambda per step); small so no gate dies")
    g = p.add_argument_group("timing")
    h.timing_args(g, steps=30, warmup=5)
    g.add_argument("--phases", action="store_true", help="also time forward / backward / optimizer separately")
    h.run_args(p.add_argument_group("run"), "device", "dtype", "seed", "threads", "json")
    args = p.parse_args(argv)
    h.split_targets(args)
    if args.steps < 1 or args.repeats < 1 or args.warmup < 0:
        p.error("--steps and --repeats must be >= 1, --warmup >= 0")
    return args


def build_arms(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> tuple[h.Arm, h.Arm, int]:
    """One base under --seed, deep-copied into each arm (identical base weights); returns SoRA, LoRA, base params."""
    base = h.build_llama(args.hidden_size, args.layers, args.intermediate_size, args.heads, args.vocab_size,
                         args.seq_len, args.seed, kv_heads=args.kv_heads).to(device=device, dtype=dtype)
    n_base = sum(p.numel() for p in base.parameters())
    sora = h.Arm("SoRA", *h.sora_arm(copy.deepcopy(base), args.rank, args.targets, args.seed, args.sparse_lambda))
    # autocast_adapter_dtype=False: keep bf16 adapters in bf16 (as SoRA does) instead of PEFT's fp32 upcast.
    lora = h.Arm("LoRA", *h.lora_arm(copy.deepcopy(base), args.rank, args.targets, autocast_adapter_dtype=False))
    del base
    gc.collect()
    return sora, lora, n_base


def measure_peak_memory(arm: h.Arm, batch: dict, device: torch.device) -> None:
    """One extra (untimed) step with the peak counter reset: peak during the step, and peak minus resident."""
    arm.peak_bytes = arm.transient_bytes = None
    if device.type != "cuda":
        return
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.synchronize(device)
    resident = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    h.train_step(arm, batch, h.device_sync(device))
    arm.peak_bytes = torch.cuda.max_memory_allocated(device)
    arm.transient_bytes = arm.peak_bytes - resident


def print_phases(sora: h.Arm, lora: h.Arm) -> dict:
    out = {}
    print()
    h.row("phase (median ms)", "SoRA", "LoRA", "ratio", width=20, cell=(10, 10, 9))
    for ph in ("forward", "backward", "optimizer"):
        a, b = (statistics.median(arm.phase_times[ph]) * 1e3 for arm in (sora, lora))
        out[ph] = {"sora_ms": a, "lora_ms": b, "ratio": a / b}
        h.row(ph, f"{a:.3f}", f"{b:.3f}", f"{a / b:.3f}", width=20, cell=(10, 10, 9))
    return out


def print_sanity(args, sora: h.Arm, lora: h.Arm, cuda: bool) -> dict:
    """Adapted modules, trainable parameters (they differ by the gates), first losses, dead gates, CUDA peaks."""
    for arm in (sora, lora):
        arm.trainable = h.trainable(arm.model)
    gates = sora_ds.gate_parameters(sora.model)
    dead, n_gates = sum(int((g == 0).sum()) for g in gates), sum(g.numel() for g in gates)
    print()
    h.row("", "SoRA", "LoRA")
    h.row("adapted modules", str(sora.n_modules), str(lora.n_modules))
    h.row("trainable params", f"{sora.trainable:,}", f"{lora.trainable:,}")
    h.row("difference (SoRA - LoRA)", f"{sora.trainable - lora.trainable:,}",
          note=f"   expected {args.rank} x {sora.n_modules} gates = {args.rank * sora.n_modules:,}")
    h.row("first loss (must agree)", f"{sora.first_loss:.6f}", f"{lora.first_loss:.6f}")
    h.row("dead gate entries after bench", f"{dead} / {n_gates}")
    if cuda:
        h.row("peak memory during a step (MiB)", *(f"{a.peak_bytes / 2**20:.1f}" for a in (sora, lora)))
        h.row("  of which above resident (MiB)", *(f"{a.transient_bytes / 2**20:.1f}" for a in (sora, lora)))
        print("  (resident = both arms' weights + optimizer states, since both arms live on the device together)")
    return {"dead_gate_entries": dead, "gate_entries": n_gates}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = h.torch_device(args.device, args.threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    vers = h.versions("torch", "transformers", "peft")
    t_setup = time.perf_counter()
    sora, lora, n_base = build_arms(args, device, dtype)
    batch = h.random_batch(args.vocab_size, args.batch_size, args.seq_len, args.seed + 1, device)
    setup_s = time.perf_counter() - t_setup
    dev_name = h.device_name(device.type == "cuda")
    h.header("SoRA vs PEFT LoRA train-step overhead", [
        ("device", f"{device} ({dev_name}), dtype {args.dtype}, torch threads {torch.get_num_threads()}"),
        ("versions", h.version_text(vers)),
        ("model", f"Llama hidden {args.hidden_size}, layers {args.layers}, intermediate {args.intermediate_size}, "
                  f"heads {args.heads}/{args.kv_heads} kv, vocab {args.vocab_size}; {n_base / 1e6:.2f} M base params"),
        ("batch", f"{args.batch_size} x {args.seq_len} tokens"),
        ("adapters", f"rank {args.rank}, alpha {2 * args.rank}, targets {','.join(args.targets)}; SoRA sparse_lambda "
                     f"{args.sparse_lambda:g} (lr_scaled), lr {h.LEARNING_RATE:g}"),
        ("timing", f"{args.warmup} warm-up + {args.repeats} x {args.steps} timed steps per arm, interleaved step by "
                   f"step; setup {setup_s:.1f} s"),
    ])

    sync = h.device_sync(device)
    timing = h.time_arms((sora, lora), max(args.warmup, 1), args.repeats, args.steps,
                         lambda arm: h.train_step(arm, batch, sync),
                         lambda arm: h.train_step(arm, batch, sync, phases=args.phases))
    for arm in (sora, lora):
        measure_peak_memory(arm, batch, device)
    rep = h.report_times((sora, lora), timing, [("ratio sora/lora", sora, lora)])
    r, is_noisy = rep["ratios"]["ratio sora/lora"], rep["noisy"]
    phase_ratios = print_phases(sora, lora) if args.phases else {}
    gates = print_sanity(args, sora, lora, device.type == "cuda")
    print(f"  timed section: {timing['bench_s']:.1f} s")
    print()
    verdict = h.verdict(r["median"], TARGET_RATIO)
    print(f"device: {dev_name}")
    print(f"ratio sora/lora (median step time): {r['median']:.3f}  target <= {TARGET_RATIO}  [{verdict}]")

    def arm_record(arm: h.Arm) -> dict:
        return {**arm.stats, "trainable_params": arm.trainable, "adapted_modules": arm.n_modules,
                "first_loss": arm.first_loss, "peak_bytes": arm.peak_bytes, "transient_bytes": arm.transient_bytes}

    result = {
        "device": str(device), "device_name": dev_name, "dtype": args.dtype, "torch_threads": torch.get_num_threads(),
        "versions": vers, "python": platform.python_version(), "host": platform.node(), "pid": os.getpid(),
        "args": h.args_record(args), "base_params": n_base,
        "sora": {**arm_record(sora), **gates}, "lora": arm_record(lora),
        "ratio_median": r["median"], "ratio_p10": r["p10"], "ratio_min": r["min"], "noisy": is_noisy,
        "cpu_pressure_before": timing["pressure_before"], "cpu_pressure_after": timing["pressure_after"],
        "ratio_per_repeat": r["per_repeat"], "ratio_per_repeat_min": min(r["per_repeat"]),
        "ratio_per_repeat_max": max(r["per_repeat"]), "phases": phase_ratios or None,
        "target_ratio": TARGET_RATIO, "verdict": verdict, "timed_section_s": timing["bench_s"],
    }
    h.write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
