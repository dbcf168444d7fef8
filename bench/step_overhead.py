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
import json
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from _common import cpu_pressure, device_name, percentile

warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*is deprecated", category=FutureWarning)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import sora_ds  # noqa: E402
from sora_ds import SoRAConfig  # noqa: E402

DEFAULT_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
LEARNING_RATE = 1e-4
TARGET_RATIO = 1.05


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--hidden-size", type=int, default=256)
    g.add_argument("--layers", type=int, default=4)
    g.add_argument("--intermediate-size", type=int, default=688)
    g.add_argument("--heads", type=int, default=8)
    g.add_argument("--kv-heads", type=int, default=8)
    g.add_argument("--vocab-size", type=int, default=4096)
    g.add_argument("--seq-len", type=int, default=128)
    g.add_argument("--batch-size", type=int, default=4)
    g = p.add_argument_group("adapters")
    g.add_argument("--rank", type=int, default=8, help="start rank of both arms (lora_alpha = 2 * rank)")
    g.add_argument("--targets", default=DEFAULT_TARGETS, help="comma-separated module-name suffixes")
    g.add_argument(
        "--sparse-lambda",
        type=float,
        default=1e-3,
        help="SoRA gate L1 strength (lr_scaled: shrink lr*lambda per step); small so no gate dies",
    )
    g = p.add_argument_group("timing")
    g.add_argument("--steps", type=int, default=30, help="timed steps per arm per repeat")
    g.add_argument("--warmup", type=int, default=5, help="untimed steps per arm before the first repeat")
    g.add_argument("--repeats", type=int, default=3)
    g.add_argument("--phases", action="store_true", help="also time forward / backward / optimizer separately")
    g = p.add_argument_group("run")
    g.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    g.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's default)")
    g.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the figures as JSON")
    args = p.parse_args(argv)
    args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    if args.steps < 1 or args.repeats < 1 or args.warmup < 0:
        p.error("--steps and --repeats must be >= 1, --warmup >= 0")
    return args


# ----------------------------------------------------------------------------------------------------------------
# setup






def build_base_model(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=args.vocab_size,
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=max(args.seq_len, 128),
        use_cache=False,
        tie_word_embeddings=False,
    )
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(config)
    return model.to(device=device, dtype=dtype).train()


def build_sora_arm(base: torch.nn.Module, args: argparse.Namespace):
    model = copy.deepcopy(base)
    cfg = SoRAConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=list(args.targets), init_seed=args.seed)
    adapted = sora_ds.inject(model, cfg)
    opt = sora_ds.build_optimizer(
        model, learning_rate=LEARNING_RATE, sparse_lambda=args.sparse_lambda, threshold_mode="lr_scaled"
    )
    return model, opt, len(adapted)


def build_lora_arm(base: torch.nn.Module, args: argparse.Namespace):
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    model = copy.deepcopy(base)
    cfg = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=list(args.targets), lora_dropout=0.0)
    # autocast_adapter_dtype=False: keep bf16 adapters in bf16 (as SoRA does) instead of PEFT's fp32 upcast.
    model = get_peft_model(model, cfg, autocast_adapter_dtype=False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LEARNING_RATE, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    n_adapted = sum(1 for m in model.modules() if isinstance(m, LoraLayer))
    return model, opt, n_adapted


def trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ----------------------------------------------------------------------------------------------------------------
# timing


class Arm:
    def __init__(self, name: str, model, opt, n_modules: int) -> None:
        self.name, self.model, self.opt, self.n_modules = name, model, opt, n_modules
        self.times: list[list[float]] = []  # per repeat, seconds per step
        self.phase_times: dict[str, list[float]] = {"forward": [], "backward": [], "optimizer": []}
        self.first_loss: float | None = None
        self.peak_bytes: int | None = None
        self.transient_bytes: int | None = None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step(arm: Arm, batch: dict, device: torch.device, phases: bool) -> tuple[float, float]:
    """One step; returns (seconds, loss). Loss is read only after the step's clock has stopped."""
    sync(device)
    t0 = time.perf_counter()
    loss = arm.model(**batch).loss
    if phases:
        sync(device)
        t1 = time.perf_counter()
    loss.backward()
    if phases:
        sync(device)
        t2 = time.perf_counter()
    arm.opt.step()
    arm.opt.zero_grad(set_to_none=True)
    sync(device)
    t3 = time.perf_counter()
    if phases:
        arm.phase_times["forward"].append(t1 - t0)
        arm.phase_times["backward"].append(t2 - t1)
        arm.phase_times["optimizer"].append(t3 - t2)
    return t3 - t0, loss




def measure_peak_memory(arm: Arm, batch: dict, device: torch.device) -> None:
    """One extra (untimed) step with the peak counter reset: peak during the step, and peak minus resident."""
    if device.type != "cuda":
        return
    gc.collect()
    torch.cuda.empty_cache()
    sync(device)
    resident = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    train_step(arm, batch, device, phases=False)
    arm.peak_bytes = torch.cuda.max_memory_allocated(device)
    arm.transient_bytes = arm.peak_bytes - resident


# ----------------------------------------------------------------------------------------------------------------
# main


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda given but torch.cuda.is_available() is False")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]

    import peft
    import transformers

    t_setup = time.perf_counter()
    base = build_base_model(args, device, dtype)
    n_base = sum(p.numel() for p in base.parameters())
    sora = Arm("sora", *build_sora_arm(base, args))
    lora = Arm("lora", *build_lora_arm(base, args))
    del base
    gc.collect()

    gen = torch.Generator().manual_seed(args.seed + 1)
    ids = torch.randint(0, args.vocab_size, (args.batch_size, args.seq_len), generator=gen).to(device)
    batch = {"input_ids": ids, "labels": ids}
    setup_s = time.perf_counter() - t_setup

    dev_name = device_name(device.type == "cuda")
    print("SoRA vs PEFT LoRA train-step overhead")
    print(f"  device   : {device} ({dev_name}), dtype {args.dtype}, torch threads {torch.get_num_threads()}")
    print(f"  versions : torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}")
    print(
        f"  model    : Llama hidden {args.hidden_size}, layers {args.layers}, intermediate {args.intermediate_size}, "
        f"heads {args.heads}/{args.kv_heads} kv, vocab {args.vocab_size}; {n_base / 1e6:.2f} M base params"
    )
    print(f"  batch    : {args.batch_size} x {args.seq_len} tokens")
    print(
        f"  adapters : rank {args.rank}, alpha {2 * args.rank}, targets {','.join(args.targets)}; "
        f"SoRA sparse_lambda {args.sparse_lambda:g} (lr_scaled), lr {LEARNING_RATE:g}"
    )
    print(
        f"  timing   : {args.warmup} warm-up + {args.repeats} x {args.steps} timed steps per arm, "
        f"interleaved step by step; setup {setup_s:.1f} s"
    )

    # Warm-up, interleaved; the first step's loss of each arm doubles as the identical-start check.
    for i in range(max(args.warmup, 1)):
        for arm in (sora, lora):
            _, loss = train_step(arm, batch, device, phases=False)
            if i == 0:
                arm.first_loss = float(loss.detach())
    for arm in (sora, lora):
        arm.phase_times = {k: [] for k in arm.phase_times}

    pressure_before = cpu_pressure()
    t_bench = time.perf_counter()
    for rep in range(args.repeats):
        order = (sora, lora) if rep % 2 == 0 else (lora, sora)
        for arm in order:
            arm.times.append([])
        for _ in range(args.steps):
            for arm in order:
                dt, _ = train_step(arm, batch, device, phases=args.phases)
                arm.times[-1].append(dt)
    bench_s = time.perf_counter() - t_bench
    pressure_after = cpu_pressure()

    for arm in (sora, lora):
        measure_peak_memory(arm, batch, device)

    # ---- figures
    def stats(arm: Arm) -> dict:
        flat = [t for rep in arm.times for t in rep]
        return {
            "median_ms": statistics.median(flat) * 1e3,
            "p10_ms": percentile(flat, 10) * 1e3,
            "p90_ms": percentile(flat, 90) * 1e3,
            "min_ms": min(flat) * 1e3,
            "mean_ms": statistics.fmean(flat) * 1e3,
            "per_repeat_median_ms": [statistics.median(rep) * 1e3 for rep in arm.times],
            "n_steps": len(flat),
        }

    s, l_ = stats(sora), stats(lora)
    ratio = s["median_ms"] / l_["median_ms"]
    ratio_p10 = s["p10_ms"] / l_["p10_ms"]
    ratio_min = s["min_ms"] / l_["min_ms"]
    rep_ratios = [a / b for a, b in zip(s["per_repeat_median_ms"], l_["per_repeat_median_ms"])]
    n_sora, n_lora = trainable(sora.model), trainable(lora.model)
    gates = sora_ds.gate_parameters(sora.model)
    n_gate_entries = sum(g.numel() for g in gates)
    dead_gates = sum(int((g == 0).sum()) for g in gates)

    print()
    print(f"  {'arm':<6}{'median ms':>11}{'p10 ms':>10}{'p90 ms':>10}{'min ms':>10}{'per-repeat medians (ms)':>32}")
    for name, st in (("SoRA", s), ("LoRA", l_)):
        reps = " ".join(f"{x:.2f}" for x in st["per_repeat_median_ms"])
        print(
            f"  {name:<6}{st['median_ms']:>11.2f}{st['p10_ms']:>10.2f}{st['p90_ms']:>10.2f}{st['min_ms']:>10.2f}"
            f"{reps:>32}"
        )
    print(
        f"  per-repeat ratio sora/lora: {' '.join(f'{r:.3f}' for r in rep_ratios)}  "
        f"(min {min(rep_ratios):.3f}, max {max(rep_ratios):.3f})"
    )
    print(f"  ratio of p10s {ratio_p10:.3f}, ratio of minima {ratio_min:.3f}  (less sensitive to CPU contention)")
    noisy = max(rep_ratios) - min(rep_ratios) > 0.05 or s["p90_ms"] > 1.5 * s["p10_ms"]
    if pressure_after:
        psi = ", ".join(f"{k} {v:g}" for k, v in pressure_after.items())
        print(f"  host CPU pressure at end of timing (PSI some %, load): {psi}")
    if noisy:
        print(
            "  NOTE: timings are noisy (per-repeat ratios spread > 0.05 or p90 > 1.5 x p10): other work is probably "
            "competing for the CPU/GPU; rerun on a quiet machine, with more --repeats, or compare the p10 ratio."
        )
    phase_ratios = {}
    if args.phases:
        print()
        print(f"  {'phase (median ms)':<20}{'SoRA':>10}{'LoRA':>10}{'ratio':>9}")
        for ph in ("forward", "backward", "optimizer"):
            a = statistics.median(sora.phase_times[ph]) * 1e3
            b = statistics.median(lora.phase_times[ph]) * 1e3
            phase_ratios[ph] = {"sora_ms": a, "lora_ms": b, "ratio": a / b}
            print(f"  {ph:<20}{a:>10.3f}{b:>10.3f}{a / b:>9.3f}")
    print()
    print(f"  {'':<34}{'SoRA':>14}{'LoRA':>14}")
    print(f"  {'adapted modules':<34}{sora.n_modules:>14}{lora.n_modules:>14}")
    print(f"  {'trainable params':<34}{n_sora:>14,}{n_lora:>14,}")
    print(
        f"  {'difference (SoRA - LoRA)':<34}{n_sora - n_lora:>14,}"
        f"   expected {args.rank} x {sora.n_modules} gates = {args.rank * sora.n_modules:,}"
    )
    print(f"  {'first loss (must agree)':<34}{sora.first_loss:>14.6f}{lora.first_loss:>14.6f}")
    print(f"  {'dead gate entries after bench':<34}{f'{dead_gates} / {n_gate_entries}':>14}")
    if device.type == "cuda":
        mib = 1024**2
        print(f"  {'peak memory during a step (MiB)':<34}{sora.peak_bytes / mib:>14.1f}{lora.peak_bytes / mib:>14.1f}")
        print(f"  {'  of which above resident (MiB)':<34}{sora.transient_bytes / mib:>14.1f}"
              f"{lora.transient_bytes / mib:>14.1f}")
        print("  (resident = both arms' weights + optimizer states, since both arms live on the device together)")
    print(f"  timed section: {bench_s:.1f} s")
    print()
    verdict = "PASS" if ratio <= TARGET_RATIO else "ABOVE TARGET"
    print(f"device: {dev_name}")
    print(f"ratio sora/lora (median step time): {ratio:.3f}  target <= {TARGET_RATIO}  [{verdict}]")

    result = {
        "device": str(device),
        "device_name": dev_name,
        "dtype": args.dtype,
        "torch_threads": torch.get_num_threads(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__},
        "python": platform.python_version(),
        "host": platform.node(),
        "pid": os.getpid(),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "base_params": n_base,
        "sora": {**s, "trainable_params": n_sora, "adapted_modules": sora.n_modules, "first_loss": sora.first_loss,
                 "dead_gate_entries": dead_gates, "gate_entries": n_gate_entries,
                 "peak_bytes": sora.peak_bytes, "transient_bytes": sora.transient_bytes},
        "lora": {**l_, "trainable_params": n_lora, "adapted_modules": lora.n_modules, "first_loss": lora.first_loss,
                 "peak_bytes": lora.peak_bytes, "transient_bytes": lora.transient_bytes},
        "ratio_median": ratio,
        "ratio_p10": ratio_p10,
        "ratio_min": ratio_min,
        "noisy": noisy,
        "cpu_pressure_before": pressure_before,
        "cpu_pressure_after": pressure_after,
        "ratio_per_repeat": rep_ratios,
        "ratio_per_repeat_min": min(rep_ratios),
        "ratio_per_repeat_max": max(rep_ratios),
        "phases": phase_ratios or None,
        "target_ratio": TARGET_RATIO,
        "verdict": verdict,
        "timed_section_s": bench_s,
    }
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
