"""Train-step overhead of sora-ds's AdaLoRA against PEFT LoRA and PEFT's AdaLoRA, on one process and under ZeRO-3.

What it measures (one run, the arms of each part side by side)
    1. One process. The wall-clock time of one full training step (forward with labels, backward,
       ``optimizer.step()``, the AdaLoRA bookkeeping, ``zero_grad(set_to_none=True)``) for three arms on the same
       base model, same targets, same initial rank ``r`` and ``lora_alpha = 2 r``:

       * sora-ds AdaLoRA: ``sora_ds.inject(model, AdaLoRAConfig(r, target_r, lora_alpha, targets, t_init, t_final,
         delta_t=1, total_step, orth_reg_weight=0.5, init_seed=seed))`` and ``sora_ds.build_optimizer(model,
         learning_rate=1e-4)``; loss ``model(x, labels=x).loss + orth_loss(model, 0.5)``; the importance scores,
         the global allocation and the masking run inside ``opt.step()``;
       * PEFT AdaLoRA: ``peft.get_peft_model(model, AdaLoraConfig(init_r=r, target_r, tinit, tfinal, deltaT=1,
         total_step, lora_alpha, targets, orth_reg_weight=0.5, task_type="CAUSAL_LM"))`` (without ``task_type``
         PEFT silently skips its orthogonality penalty) and ``torch.optim.AdamW``; per step ``loss.backward();
         opt.step(); model.base_model.update_and_allocate(t)`` (``t`` = 1-based optimizer step) ``; zero_grad()``;
       * PEFT LoRA: ``peft.get_peft_model(model, LoraConfig(r, lora_alpha, targets, lora_dropout=0))`` and
         ``torch.optim.AdamW``.

       Prints the median step time of each arm, p10/p90, minimum, per-repeat medians, and the ratios of the medians
       sora-ds AdaLoRA / PEFT LoRA (target <= 1.10) and sora-ds AdaLoRA / PEFT AdaLoRA (target < 1, i.e. faster),
       each also per repeat (min/max, to show the noise) and as ratios of the p10s and of the minima (less sensitive
       to other work competing for the CPU). With ``--parts`` (default on CPU) it also prints the time of the
       AdaLoRA bookkeeping of each AdaLoRA arm per step: the importance-score update, the allocation (triplet
       scores, global top-b, masks) and their total (sora-ds: ``RankAllocator.after_update``, including the
       re-masking of pruned E after every update; PEFT: ``update_and_allocate``). ``--phases`` also splits each
       step into forward (with the orthogonality penalty), backward and optimizer (with the AdaLoRA bookkeeping and
       ``zero_grad``); on CUDA this adds synchronisations inside the step, so the totals then include them.
    2. ZeRO-3, 2 ranks. sora-ds AdaLoRA against PEFT LoRA as above, both as DeepSpeed ZeRO-3 engines: a step is
       ``loss = engine(x, labels=x).loss (+ orth_loss(engine.module, 0.5)); engine.backward(loss);
       engine.step()``; sora-ds's ``SoRAAdamW`` (from ``build_optimizer``) and torch's AdamW are the client
       optimizers of ``deepspeed.initialize``. Prints the medians, p10/p90, per-repeat medians, the ratio sora-ds
       AdaLoRA / PEFT LoRA (target <= 1.10), the fraction of adapter elements held by rank 0 (to show the adapters
       really are sharded), the collectives of one timed step per op and arm with the DeepSpeed / sora-ds call site
       of each (expected: one extra all_reduce, the allocation's, for AdaLoRA), the AdaLoRA bookkeeping time on
       rank 0 and the triplet budget reached.

How
    * Worst case for AdaLoRA: ``delta_t = 1``, ``t_init = 1`` (the first, untimed warm-up step has the full budget)
      and ``total_step`` = the optimizer steps the arm will take + ``t_final`` (1) + 1, so every step from the second
      on, all timed steps included, is inside the budget-decreasing phase: the importance scores are updated and a
      global re-allocation (top-b over all triplets) and masking run at every step. The budget goes down the cubic
      schedule from ``r * n`` towards ``target_r * n`` over the run. PEFT's ``mask_to_budget`` calls
      ``torch.kthvalue(k = initial budget - budget)``, which fails for k = 0: before timing, the script checks that
      PEFT's and sora-ds's schedules agree and that the budget is below the initial budget at every allocating step
      (it is: ``t_init = 1`` makes the cubic fraction < 1 from step 2 on).
    * The model is a Llama-architecture ``LlamaForCausalLM`` built from a ``LlamaConfig`` (nothing downloaded),
      initialised under ``--seed``; the one-process arms are deep copies of one base, so their base weights are
      identical; sora-ds's P and Q are then copied from PEFT's AdaLoRA (E = 0 in both), so the two AdaLoRA arms
      start identical: their first losses (orthogonality penalty included) must agree, and the plain language-model
      loss of sora-ds AdaLoRA must agree with PEFT LoRA's (both branches start as no-ops). At the end the kept
      triplets (E != 0) of both AdaLoRA arms are compared with the budget and with each other.
    * All arms use the same fixed random batch (``labels = input_ids``) and AdamW with lr 1e-4, betas (0.9, 0.999),
      eps 1e-8, weight decay 0 (torch's default 0.01 would add work to the PEFT arms only). The PEFT arms use torch's
      default AdamW implementation (as a PEFT user would); sora-ds's optimizer is ``foreach``. Adapters are fp32 in
      all one-process arms (under ``--dtype bf16`` too: sora-ds keeps them fp32 and PEFT upcasts them by default).
    * Timing is interleaved step by step: within a repeat the arms alternate A B C A B C ..., and the arm that goes
      first rotates between repeats, so drift (frequency scaling, other processes) hits all arms alike. Each step is
      timed with ``time.perf_counter`` (on CUDA with a device synchronise on both sides). The bookkeeping parts are
      timed by wrapping the allocators' methods (on CUDA ``--parts`` adds synchronisations inside the step, so it
      is off there by default).
    * ZeRO-3: ``python bench/adalora_overhead.py`` runs part 1 itself, then starts ``torchrun --standalone
      --nproc_per_node 2`` on itself with ``--worker`` (bounded by ``--timeout``; ``DS_ACCELERATOR=cpu`` and gloo when
      there is no CUDA, NCCL otherwise; ``OMP_NUM_THREADS`` = cores / ranks unless set), as ``zero3_overhead.py``
      does, whose helpers it imports (collective counter, ZeRO-3 config, PEFT LoRA arm). The config has
      ``stage3_param_persistence_threshold: 0``; base models are built inside ``deepspeed.zero.Init`` (with
      ``HfDeepSpeedConfig`` alive), adapters added after, and ``deepspeed.initialize`` partitions them. Both engines
      live in one process, are stepped interleaved with the first arm alternating per repeat, and a barrier (outside
      the clock and the counted window) precedes every step; rank 0's clock is reported. Each rank has its own
      micro-batch, as in data parallelism. Collectives are counted by wrapping ``torch.distributed`` before
      DeepSpeed is imported (outermost calls only). Only rank 0 prints.
    * The script only prints (and writes ``--json``, both parts in one file); it asserts nothing about timings.

Commands
    CPU (defaults: one process hidden 256, 4 layers, batch 4 x 128, 3 arms x (3 warm-up + 3 x 20 timed) steps; then
    ZeRO-3 on 2 ranks, hidden 128, batch 4 x 64 per rank, as zero3_overhead.py; 75-80 s on 2 quiet cores, several
    minutes when other work competes for them)::

        python bench/adalora_overhead.py
        python bench/adalora_overhead.py --json /tmp/adalora_overhead_cpu.json

    CUDA, bf16, a larger model (part 2 needs 2 GPUs, one per rank, NCCL; on one GPU add ``--only single``)::

        python bench/adalora_overhead.py --device cuda --dtype bf16 --hidden-size 2048 --layers 8 \\
            --intermediate-size 5504 --heads 16 --kv-heads 16 --vocab-size 32000 --seq-len 1024 --batch-size 4 \\
            --steps 30 --zero3-hidden-size 2048 --zero3-intermediate-size 5504 --zero3-heads 16 \\
            --zero3-vocab-size 32000 --zero3-seq-len 1024 --json /tmp/adalora_overhead_gpu.json
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

from _common import cpu_pressure, device_name, ds_worker, percentile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

DEFAULT_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
LEARNING_RATE = 1e-4
ORTH_WEIGHT = 0.5
T_INIT = 1  # the first optimizer step keeps the full budget (untimed warm-up); every later step allocates
T_FINAL = 1
TARGET_VS_LORA = 1.10  # sora-ds AdaLoRA / PEFT LoRA, one process and ZeRO-3
TARGET_VS_PEFT_ADALORA = 1.0  # sora-ds AdaLoRA / PEFT AdaLoRA: faster

ARM_LABELS = {"sora": "sora-ds AdaLoRA", "peft_adalora": "PEFT AdaLoRA", "lora": "PEFT LoRA"}
PART_NAMES = ("scores", "allocation", "total")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    g = p.add_argument_group("model (one process)")
    g.add_argument("--hidden-size", type=int, default=256)
    g.add_argument("--layers", type=int, default=4)
    g.add_argument("--intermediate-size", type=int, default=688)
    g.add_argument("--heads", type=int, default=8)
    g.add_argument("--kv-heads", type=int, default=8)
    g.add_argument("--vocab-size", type=int, default=4096)
    g.add_argument("--seq-len", type=int, default=128)
    g.add_argument("--batch-size", type=int, default=4)
    g = p.add_argument_group("model (ZeRO-3; layers as --layers; defaults as zero3_overhead.py)")
    g.add_argument("--zero3-hidden-size", type=int, default=128)
    g.add_argument("--zero3-intermediate-size", type=int, default=344)
    g.add_argument("--zero3-heads", type=int, default=4, help="attention heads (= key/value heads)")
    g.add_argument("--zero3-vocab-size", type=int, default=512)
    g.add_argument("--zero3-seq-len", type=int, default=64)
    g.add_argument("--zero3-batch-size", type=int, default=4, help="micro-batch per rank")
    g = p.add_argument_group("adapters")
    g.add_argument("--rank", type=int, default=12, help="initial AdaLoRA rank and LoRA rank (lora_alpha = 2 * rank)")
    g.add_argument("--target-rank", type=int, default=8, help="AdaLoRA target_r (average final rank)")
    g.add_argument("--targets", default=DEFAULT_TARGETS, help="comma-separated module-name suffixes")
    g = p.add_argument_group("timing")
    g.add_argument("--steps", type=int, default=20, help="timed steps per arm per repeat")
    g.add_argument("--warmup", type=int, default=3, help="untimed steps per arm before the first repeat (>= 1)")
    g.add_argument("--repeats", type=int, default=3)
    g.add_argument("--zero3-steps", type=int, default=20, help="timed steps per arm per repeat under ZeRO-3")
    g.add_argument("--phases", action="store_true",
                   help="one process: also time forward (incl. orth penalty) / backward / optimizer (incl. AdaLoRA "
                   "bookkeeping and zero_grad) separately")
    g.add_argument("--parts", action=argparse.BooleanOptionalAction, default=None,
                   help="also time the AdaLoRA bookkeeping (scores / allocation); default: on for CPU, off for CUDA")
    g = p.add_argument_group("run")
    g.add_argument("--only", choices=("single", "zero3"), default=None, help="run one part only")
    g.add_argument("--device", default="cpu", help="one-process part: cpu, cuda, cuda:1, ... (ZeRO-3 uses CUDA "
                   "when available)")
    g.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="bf16: base weights (ZeRO-3: CUDA only)")
    g.add_argument("--nproc", type=int, default=2, help="ZeRO-3 ranks (processes)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--threads", type=int, default=None, help="torch.set_num_threads, one-process part (default: "
                   "torch's default)")
    g.add_argument("--timeout", type=float, default=900, help="seconds before the launched ranks are killed")
    g.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the figures as JSON")
    g.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    g.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    if args.steps < 1 or args.zero3_steps < 1 or args.repeats < 1 or args.warmup < 1 or args.nproc < 1:
        p.error("--steps, --zero3-steps, --repeats, --warmup and --nproc must be >= 1")
    if not 1 <= args.target_rank < args.rank:
        p.error("--target-rank must be in [1, --rank) so that the budget really decreases")
    return args


def total_steps(args: argparse.Namespace, steps: int, extra: int = 0) -> int:
    """Optimizer steps each arm takes: warm-up, timed, and ``extra`` untimed ones after timing."""
    return args.warmup + args.repeats * steps + extra


def schedule_total_step(n_steps: int) -> int:
    """total_step such that steps 2 .. n_steps all lie in the budget-decreasing phase (step < total - t_final)."""
    return n_steps + T_FINAL + 1


def summarize(times: list[list[float]]) -> dict:
    flat = [t for rep in times for t in rep]
    return {
        "median_ms": statistics.median(flat) * 1e3,
        "p10_ms": percentile(flat, 10) * 1e3,
        "p90_ms": percentile(flat, 90) * 1e3,
        "min_ms": min(flat) * 1e3,
        "per_repeat_median_ms": [statistics.median(rep) * 1e3 for rep in times],
        "n_steps": len(flat),
    }


def ratios(a: dict, b: dict) -> dict:
    per_rep = [x / y for x, y in zip(a["per_repeat_median_ms"], b["per_repeat_median_ms"])]
    return {"median": a["median_ms"] / b["median_ms"], "p10": a["p10_ms"] / b["p10_ms"],
            "min": a["min_ms"] / b["min_ms"], "per_repeat": per_rep}


def noisy(rs: list[dict], stats: list[dict]) -> bool:
    spread = any(max(r["per_repeat"]) - min(r["per_repeat"]) > 0.05 for r in rs)
    return spread or any(s["p90_ms"] > 1.5 * s["p10_ms"] for s in stats)


class PartTimer:
    """Wall time of calls to a few methods, installed as instance attributes (so internal ``self.x()`` calls hit
    them); off until ``enabled``; synchronises a CUDA device around each call when ``sync`` is given."""

    def __init__(self, sync=None) -> None:
        self.times: dict[str, list[float]] = {k: [] for k in PART_NAMES}
        self.enabled = False
        self._sync = sync
        self._installed: list[tuple[object, str]] = []

    def wrap(self, obj, method: str, part: str) -> None:
        fn = getattr(obj, method)
        timer = self

        def wrapper(*a, **k):
            if not timer.enabled:
                return fn(*a, **k)
            if timer._sync:
                timer._sync()
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                if timer._sync:
                    timer._sync()
                timer.times[part].append(time.perf_counter() - t0)

        setattr(obj, method, wrapper)
        self._installed.append((obj, method))

    def uninstall(self) -> None:
        """Back to the class's methods (so the wrappers do not show up in traced call sites)."""
        self.enabled = False
        for obj, method in self._installed:
            delattr(obj, method)
        self._installed.clear()

    def medians_ms(self) -> dict | None:
        if not self.times["total"]:
            return None
        return {k: (statistics.median(v) * 1e3 if v else 0.0) for k, v in self.times.items()} | {
            "allocations": len(self.times["allocation"]), "steps": len(self.times["total"])}


# ----------------------------------------------------------------------------------------------------------------
# part 1: one process


def build_llama(args: argparse.Namespace, hidden: int, intermediate: int, heads: int, kv_heads: int, vocab: int,
                seq_len: int, ds_config: dict | None = None):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max(seq_len, 128),
        use_cache=False,
        tie_word_embeddings=False,
    )
    torch.manual_seed(args.seed)
    if ds_config is None:
        return LlamaForCausalLM(config).train()
    import deepspeed

    with deepspeed.zero.Init(config_dict_or_path=ds_config):
        model = LlamaForCausalLM(config)
    return model.train()


def adalora_config(args: argparse.Namespace, total_step: int):
    from sora_ds import AdaLoRAConfig

    return AdaLoRAConfig(r=args.rank, target_r=args.target_rank, lora_alpha=2 * args.rank,
                         target_modules=list(args.targets), t_init=T_INIT, t_final=T_FINAL, delta_t=1,
                         total_step=total_step, orth_reg_weight=ORTH_WEIGHT, init_seed=args.seed)


class Arm:
    def __init__(self, key: str, model, opt, n_modules: int, kind: str) -> None:
        self.key, self.name, self.model, self.opt, self.n_modules = key, ARM_LABELS[key], model, opt, n_modules
        self.kind = kind  # "sora", "peft_adalora", "lora"
        self.times: list[list[float]] = []
        self.t = 0  # optimizer steps taken (1-based in the step that takes it)
        self.first_loss: float | None = None  # as returned / backpropagated, orthogonality penalty included
        self.first_lm_loss: float | None = None  # language-model loss alone
        self.parts: PartTimer | None = None
        self.phase_times: dict[str, list[float]] = {"forward": [], "backward": [], "optimizer": []}


def build_single_arms(args, base, device, sync) -> tuple[Arm, Arm, Arm, int]:
    import torch
    from peft import AdaLoraConfig, LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    import sora_ds

    n_steps = total_steps(args, args.steps)
    total_step = schedule_total_step(n_steps)

    def adamw(model):
        params = [p for p in model.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=LEARNING_RATE, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)

    lora_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=args.rank, lora_alpha=2 * args.rank,
                                                                target_modules=list(args.targets), lora_dropout=0.0))
    lora = Arm("lora", lora_model, adamw(lora_model),
               sum(1 for m in lora_model.modules() if isinstance(m, LoraLayer)), "lora")

    peft_cfg = AdaLoraConfig(init_r=args.rank, target_r=args.target_rank, tinit=T_INIT, tfinal=T_FINAL, deltaT=1,
                             total_step=total_step, lora_alpha=2 * args.rank, target_modules=list(args.targets),
                             lora_dropout=0.0, orth_reg_weight=ORTH_WEIGHT, task_type="CAUSAL_LM")
    peft_model = get_peft_model(copy.deepcopy(base), peft_cfg)
    peft = Arm("peft_adalora", peft_model, adamw(peft_model),
               sum(1 for m in peft_model.modules() if isinstance(m, LoraLayer)), "peft_adalora")

    sora_model = copy.deepcopy(base)
    adapted = sora_ds.inject(sora_model, adalora_config(args, total_step))
    with torch.no_grad():  # twin start: PEFT's P and Q (E = 0 in both)
        for name, m in sora_ds.sora_modules(sora_model):
            pm = peft_model.base_model.model.get_submodule(name)
            m.lora_A.copy_(pm.lora_A["default"])
            m.lora_B.copy_(pm.lora_B["default"])
    sora = Arm("sora", sora_model, sora_ds.build_optimizer(sora_model, learning_rate=LEARNING_RATE), len(adapted),
               "sora")

    # bookkeeping timers
    alloc = sora.opt.rank_allocator
    sora.parts = PartTimer(sync)
    sora.parts.wrap(alloc, "after_update", "total")
    sora.parts.wrap(alloc, "_update_importance", "scores")
    sora.parts.wrap(alloc, "_allocate", "allocation")
    ra = peft_model.base_model.rankallocator
    peft.parts = PartTimer(sync)
    peft.parts.wrap(peft_model.base_model, "update_and_allocate", "total")
    peft.parts.wrap(ra, "update_ipt", "scores")
    peft.parts.wrap(ra, "mask_to_budget", "allocation")
    return sora, peft, lora, n_steps


def check_schedules(sora: Arm, peft: Arm, n_steps: int) -> dict:
    """Both schedules agree, and PEFT's kthvalue gets k >= 1 at every allocating step of the run."""
    schedule = sora.opt.rank_allocator.schedule
    ra = peft.model.base_model.rankallocator
    init = schedule.initial_budget
    budgets = []
    for step in range(1, n_steps + 1):
        ours, mask = schedule(step)
        theirs, peft_mask = ra.budget_schedule(step)
        if (ours, mask) != (theirs, peft_mask) or ra.init_bgt != init:
            raise SystemExit(f"budget schedules differ at step {step}: sora-ds {ours, mask}, PEFT {theirs, peft_mask}")
        if step > T_INIT and (not mask or ours >= init):
            raise SystemExit(f"step {step} would not allocate with k >= 1 (budget {ours}, initial {init}); "
                             "PEFT's kthvalue(k=0) would fail")
        budgets.append(ours)
    return {"initial": init, "target": schedule.target_budget, "per_step": budgets,
            "total_step": schedule.total_step}


def run_single(args: argparse.Namespace) -> dict:
    import torch

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        sys.exit("--device cuda given but torch.cuda.is_available() is False")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    parts_on = (not cuda) if args.parts is None else args.parts

    import peft as peft_pkg
    import transformers

    import sora_ds

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    t_setup = time.perf_counter()
    base = build_llama(args, args.hidden_size, args.intermediate_size, args.heads, args.kv_heads, args.vocab_size,
                       args.seq_len).to(device=device, dtype=dtype)
    n_base = sum(p.numel() for p in base.parameters())
    sora, peft, lora, n_steps = build_single_arms(args, base, device, sync if (cuda and parts_on) else None)
    del base
    gc.collect()
    budget = check_schedules(sora, peft, n_steps)
    gen = torch.Generator().manual_seed(args.seed + 1)
    ids = torch.randint(0, args.vocab_size, (args.batch_size, args.seq_len), generator=gen).to(device)
    setup_s = time.perf_counter() - t_setup
    arms = (sora, peft, lora)

    def step(arm: Arm, phases: bool = False) -> tuple[float, object, object]:
        """One step; returns (seconds, loss backpropagated, language-model loss), read after the clock stopped."""
        sync()
        t0 = time.perf_counter()
        arm.t += 1
        lm = arm.model(input_ids=ids, labels=ids).loss
        loss = lm + sora_ds.orth_loss(arm.model, ORTH_WEIGHT) if arm.kind == "sora" else lm
        if phases:
            sync()
            t1 = time.perf_counter()
        loss.backward()
        if phases:
            sync()
            t2 = time.perf_counter()
        arm.opt.step()
        if arm.kind == "peft_adalora":
            arm.model.base_model.update_and_allocate(arm.t)
        arm.opt.zero_grad(set_to_none=True)
        sync()
        t3 = time.perf_counter()
        if phases:
            arm.phase_times["forward"].append(t1 - t0)
            arm.phase_times["backward"].append(t2 - t1)
            arm.phase_times["optimizer"].append(t3 - t2)
        return t3 - t0, loss, lm

    dev_name = device_name(cuda)
    print("AdaLoRA train-step overhead, part 1: one process (sora-ds AdaLoRA vs PEFT AdaLoRA vs PEFT LoRA)")
    print(f"  device   : {device} ({dev_name}), dtype {args.dtype}, torch threads {torch.get_num_threads()}")
    print(f"  versions : torch {torch.__version__}, transformers {transformers.__version__}, peft "
          f"{peft_pkg.__version__}, sora_ds {sora_ds.__version__}, python {platform.python_version()}")
    print(f"  model    : Llama hidden {args.hidden_size}, layers {args.layers}, intermediate {args.intermediate_size}, "
          f"heads {args.heads}/{args.kv_heads} kv, vocab {args.vocab_size}; {n_base / 1e6:.2f} M base params")
    print(f"  batch    : {args.batch_size} x {args.seq_len} tokens")
    print(f"  adapters : r {args.rank} (AdaLoRA initial, LoRA), AdaLoRA target_r {args.target_rank}, alpha "
          f"{2 * args.rank}, targets {','.join(args.targets)}; lr {LEARNING_RATE:g}, orth_reg_weight {ORTH_WEIGHT}")
    print(f"  schedule : delta_t 1, t_init {T_INIT}, t_final {T_FINAL}, total_step {budget['total_step']} "
          f"(= {n_steps} steps per arm + {budget['total_step'] - n_steps}): scores + global re-allocation at every "
          f"step from step {T_INIT + 1}; budget {budget['initial']} -> {budget['per_step'][args.warmup]} at the first "
          f"timed step -> {budget['per_step'][-1]} at the last (target {budget['target']}); schedules of both "
          "AdaLoRA arms checked equal, PEFT kthvalue k >= 1 at every allocation")
    print(f"  timing   : {args.warmup} warm-up + {args.repeats} x {args.steps} timed steps per arm, interleaved step "
          f"by step, first arm rotating per repeat; bookkeeping parts {'timed' if parts_on else 'not timed'}; "
          f"setup {setup_s:.1f} s", flush=True)

    for i in range(args.warmup):
        for arm in arms:
            _, loss, lm = step(arm)
            if i == 0:
                arm.first_loss, arm.first_lm_loss = float(loss.detach()), float(lm.detach())
    for arm in (sora, peft):
        arm.parts.enabled = parts_on

    pressure_before = cpu_pressure()
    t_bench = time.perf_counter()
    for rep in range(args.repeats):
        order = arms[rep % 3:] + arms[:rep % 3]
        for arm in order:
            arm.times.append([])
        for _ in range(args.steps):
            for arm in order:
                dt, _, _ = step(arm, phases=args.phases)
                arm.times[-1].append(dt)
    bench_s = time.perf_counter() - t_bench
    pressure_after = cpu_pressure()
    for arm in (sora, peft):
        arm.parts.uninstall()

    # ---- figures
    st = {arm.key: summarize(arm.times) for arm in arms}
    r_lora = ratios(st["sora"], st["lora"])
    r_peft = ratios(st["sora"], st["peft_adalora"])
    r_peft_lora = ratios(st["peft_adalora"], st["lora"])
    is_noisy = noisy([r_lora, r_peft], list(st.values()))

    print()
    print(f"  {'arm':<17}{'median ms':>11}{'p10 ms':>10}{'p90 ms':>10}{'min ms':>10}   per-repeat medians (ms)")
    for arm in arms:
        s = st[arm.key]
        print(f"  {arm.name:<17}{s['median_ms']:>11.2f}{s['p10_ms']:>10.2f}{s['p90_ms']:>10.2f}{s['min_ms']:>10.2f}   "
              + " ".join(f"{x:.2f}" for x in s["per_repeat_median_ms"]))
    for label, r in (("sora-ds AdaLoRA / PEFT LoRA", r_lora), ("sora-ds AdaLoRA / PEFT AdaLoRA", r_peft),
                     ("PEFT AdaLoRA / PEFT LoRA", r_peft_lora)):
        print(f"  {label:<31} median {r['median']:.3f}; per repeat "
              f"{' '.join(f'{x:.3f}' for x in r['per_repeat'])} (min {min(r['per_repeat']):.3f}, max "
              f"{max(r['per_repeat']):.3f}); p10s {r['p10']:.3f}, minima {r['min']:.3f}")
    if pressure_after:
        print("  host CPU pressure at end of timing (PSI some %, load): "
              + ", ".join(f"{k} {v:g}" for k, v in pressure_after.items()))
    if is_noisy:
        print("  NOTE: timings are noisy (per-repeat ratios spread > 0.05 or p90 > 1.5 x p10): other work is probably "
              "competing for the CPU/GPU; rerun on a quiet machine, with more --repeats, or compare the p10 ratios.")

    phase_ms = None
    if args.phases:
        phase_ms = {arm.key: {ph: statistics.median(v) * 1e3 for ph, v in arm.phase_times.items()} for arm in arms}
        print()
        print(f"  {'phase (median ms)':<28}{'sora-ds AdaLoRA':>16}{'PEFT AdaLoRA':>14}{'PEFT LoRA':>12}")
        for ph, label in (("forward", "forward (+ orth penalty)"), ("backward", "backward"),
                          ("optimizer", "optimizer + bookkeeping")):
            print(f"  {label:<28}{phase_ms['sora'][ph]:>16.3f}{phase_ms['peft_adalora'][ph]:>14.3f}"
                  f"{phase_ms['lora'][ph]:>12.3f}")

    parts = {arm.key: arm.parts.medians_ms() for arm in (sora, peft)}
    if parts_on:
        print()
        print(f"  AdaLoRA bookkeeping per step (median ms over the timed steps){'sora-ds':>14}{'PEFT':>10}")
        for k, label in (("scores", "importance scores (EMA update)"),
                         ("allocation", "allocation (triplet scores, top-b, masks)"),
                         ("total", "total (sora-ds: after_update; PEFT: update_and_allocate)")):
            print(f"    {label:<60}{parts['sora'][k]:>12.3f}{parts['peft_adalora'][k]:>10.3f}")
        print(f"    {'share of the median step':<60}{parts['sora']['total'] / st['sora']['median_ms']:>12.1%}"
              f"{parts['peft_adalora']['total'] / st['peft_adalora']['median_ms']:>10.1%}")
        print(f"    {'allocations / steps timed':<60}"
              f"{str(parts['sora']['allocations']) + ' / ' + str(parts['sora']['steps']):>12}"
              f"{str(parts['peft_adalora']['allocations']) + ' / ' + str(parts['peft_adalora']['steps']):>10}")

    # sanity: trainable params, identical start, allocation reached the budget in both AdaLoRA arms
    def trainable(model) -> int:
        return sum(p.numel() for p in model.parameters() if p.requires_grad)

    n_tr = {arm.key: trainable(arm.model) for arm in arms}
    sora_kept = {n: (m.gate.detach() != 0).cpu() for n, m in sora_ds.sora_modules(sora.model)}
    peft_kept = {n: (peft.model.base_model.model.get_submodule(n).lora_E["default"].detach().reshape(-1) != 0).cpu()
                 for n in sora_kept}
    n_sora_kept = sum(int(v.sum()) for v in sora_kept.values())
    n_peft_kept = sum(int(v.sum()) for v in peft_kept.values())
    agree = sum(int((sora_kept[n] == peft_kept[n]).sum()) for n in sora_kept)
    n_triplets = sum(v.numel() for v in sora_kept.values())
    final_budget = budget["per_step"][-1]
    print()
    print(f"  {'':<36}{'sora-ds AdaLoRA':>16}{'PEFT AdaLoRA':>14}{'PEFT LoRA':>12}")
    print(f"  {'adapted modules':<36}{sora.n_modules:>16}{peft.n_modules:>14}{lora.n_modules:>12}")
    print(f"  {'trainable params':<36}{n_tr['sora']:>16,}{n_tr['peft_adalora']:>14,}{n_tr['lora']:>12,}"
          f"   (AdaLoRA - LoRA: E, {args.rank} x {sora.n_modules} = {args.rank * sora.n_modules:,})")
    print(f"  {'first loss incl. orth penalty':<36}{sora.first_loss:>16.6f}{peft.first_loss:>14.6f}{'':>12}"
          "   (AdaLoRA arms must agree)")
    print(f"  {'first language-model loss':<36}{sora.first_lm_loss:>16.6f}{'':>14}{lora.first_lm_loss:>12.6f}"
          "   (must agree)")
    print(f"  {'kept triplets after bench (E != 0)':<36}{n_sora_kept:>16}{n_peft_kept:>14}{'':>12}"
          f"   (budget {final_budget} of {n_triplets})")
    print(f"  {'same kept/pruned state, both arms':<36}{f'{agree} / {n_triplets} triplets':>30}")
    print(f"  timed section: {bench_s:.1f} s", flush=True)

    return {
        "device": str(device), "device_name": dev_name, "dtype": args.dtype, "torch_threads": torch.get_num_threads(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "peft": peft_pkg.__version__, "sora_ds": sora_ds.__version__},
        "base_params": n_base, "schedule": budget,
        "arms": {arm.key: {**st[arm.key], "trainable_params": n_tr[arm.key], "adapted_modules": arm.n_modules,
                           "first_loss": arm.first_loss, "first_lm_loss": arm.first_lm_loss,
                           "bookkeeping_ms": parts.get(arm.key)} for arm in arms},
        "ratio_sora_over_lora": r_lora, "ratio_sora_over_peft_adalora": r_peft,
        "ratio_peft_adalora_over_lora": r_peft_lora, "phases_ms": phase_ms,
        "kept_triplets": {"sora": n_sora_kept, "peft_adalora": n_peft_kept, "budget": final_budget,
                          "agree": agree, "triplets": n_triplets},
        "noisy": is_noisy, "cpu_pressure_before": pressure_before, "cpu_pressure_after": pressure_after,
        "timed_section_s": bench_s,
    }


# ----------------------------------------------------------------------------------------------------------------
# part 2: ZeRO-3 (launcher, then worker)


def launch_zero3(argv: list[str], args: argparse.Namespace) -> tuple[int, dict | None]:
    import torch
    from zero3_overhead import stop_tree

    env = dict(os.environ)
    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.nproc)))
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    with tempfile.TemporaryDirectory(prefix="adalora_overhead.") as workdir:
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.nproc),
            str(Path(__file__).resolve()), *argv, "--worker", "--workdir", workdir,
        ]
        proc = subprocess.Popen(cmd, env=env, start_new_session=True)
        try:
            rc = proc.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            print(f"adalora_overhead: ranks still running after {args.timeout:.0f} s; stopping them", file=sys.stderr)
            stop_tree(proc)
            return 124, None
        except KeyboardInterrupt:
            stop_tree(proc)
            return 130, None
        out = Path(workdir) / "zero3.json"
        return rc, (json.loads(out.read_text()) if out.exists() else None)


def worker(args: argparse.Namespace) -> None:
    from zero3_overhead import COUNTER, ds_config_for, full_numel, local_numel, lora_arm

    COUNTER.install()  # before deepspeed binds torch.distributed functions

    import torch

    w = ds_worker(args.dtype == "bf16")
    cuda, bf16, rank, world, shm_skipped, say, sync = w.cuda, w.bf16, w.rank, w.world, w.shm_skipped, w.say, w.sync
    import deepspeed
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    import peft
    import transformers
    from transformers.integrations import HfDeepSpeedConfig

    import sora_ds
    from sora_ds.compact import adapter_tensors
    from sora_ds.optim import unwrap_optimizer

    parts_on = (not cuda) if args.parts is None else args.parts
    # zero3_overhead's helpers read args.batch_size / args.rank: a namespace with the ZeRO-3 batch
    z3args = argparse.Namespace(**{**vars(args), "batch_size": args.zero3_batch_size})
    ds_config = ds_config_for(z3args, bf16, None)
    dschf = HfDeepSpeedConfig(ds_config)  # kept alive to the end: transformers/PEFT stay ZeRO-3 aware (as under Trainer)
    n_steps = total_steps(args, args.zero3_steps, extra=1)  # + one traced step after timing
    total_step = schedule_total_step(n_steps)

    def llama():
        return build_llama(args, args.zero3_hidden_size, args.zero3_intermediate_size, args.zero3_heads,
                           args.zero3_heads, args.zero3_vocab_size, args.zero3_seq_len, ds_config)

    t_setup = time.perf_counter()
    s_model = llama()
    adapted = sora_ds.inject(s_model, adalora_config(args, total_step))
    s_opt = sora_ds.build_optimizer(s_model, learning_rate=LEARNING_RATE)
    l_model, l_opt, n_l = lora_arm(llama(), list(args.targets), z3args, bf16)
    s_engine, *_ = deepspeed.initialize(model=s_model, optimizer=s_opt, config=ds_config)
    l_engine, *_ = deepspeed.initialize(model=l_model, optimizer=l_opt, config=ds_config)
    sora = Arm("sora", s_engine, s_opt, len(adapted), "sora")
    lora = Arm("lora", l_engine, l_opt, n_l, "lora")
    setup_s = time.perf_counter() - t_setup
    allocator = unwrap_optimizer(s_engine.optimizer).rank_allocator
    sora.parts = PartTimer(sync if (cuda and parts_on) else None)
    sora.parts.wrap(allocator, "after_update", "total")
    sora.parts.wrap(allocator, "_update_importance", "scores")
    sora.parts.wrap(allocator, "_allocate", "allocation")
    schedule = allocator.schedule
    for arm in (sora, lora):
        arm.counted, arm.step_totals, arm.sites = None, [], {}

    n_base = sum(full_numel(p) for p in s_engine.module.parameters() if not p.requires_grad)
    sora_adapter = adapter_tensors([m for _, m in sora_ds.sora_modules(s_engine.module)])
    lora_adapter = [p for p in l_engine.module.parameters() if p.requires_grad]

    def frac(params) -> tuple[int, int]:
        return sum(local_numel(p) for p in params), sum(full_numel(p) for p in params)

    shard = {"sora-ds adapter": frac(sora_adapter), "lora adapter": frac(lora_adapter),
             "frozen base": frac([p for p in s_engine.module.parameters() if not p.requires_grad])}

    gen = torch.Generator().manual_seed(args.seed + 1 + rank)  # each rank its own micro-batch, as in DP
    device = get_accelerator().current_device_name()
    ids = torch.randint(0, args.zero3_vocab_size, (args.zero3_batch_size, args.zero3_seq_len), generator=gen).to(device)

    def step(arm: Arm, trace: bool = False) -> tuple[float, float, float, dict, dict]:
        """One step; returns (seconds on this rank, loss, language-model loss, calls per op, bytes per op)."""
        dist.barrier()  # outside the clock and outside the counted window
        sync()
        COUNTER.trace = trace
        COUNTER.reset()
        t0 = time.perf_counter()
        lm = arm.model(input_ids=ids, labels=ids).loss
        loss = lm + sora_ds.orth_loss(arm.model.module, ORTH_WEIGHT) if arm.kind == "sora" else lm
        arm.model.backward(loss)
        arm.model.step()
        sync()
        dt = time.perf_counter() - t0
        counts, nbytes = COUNTER.snapshot()
        if trace:
            arm.sites = dict(COUNTER.sites)
            COUNTER.trace = False
        return dt, float(loss.detach()), float(lm.detach()), counts, nbytes

    say("AdaLoRA train-step overhead, part 2: DeepSpeed ZeRO-3 (sora-ds AdaLoRA vs PEFT LoRA)")
    say(f"  device   : {'cuda' if cuda else 'cpu'} ({device_name(cuda)}), {world} ranks, backend "
        f"{dist.get_backend()}, {'bf16' if bf16 else 'fp32'}, torch threads/rank {torch.get_num_threads()}"
        + (", DeepSpeed shm op build skipped" if shm_skipped else ""))
    say(f"  versions : torch {torch.__version__}, deepspeed {deepspeed.__version__}, transformers "
        f"{transformers.__version__}, peft {peft.__version__}, sora_ds {sora_ds.__version__}")
    say(f"  model    : Llama hidden {args.zero3_hidden_size}, layers {args.layers}, intermediate "
        f"{args.zero3_intermediate_size}, heads {args.zero3_heads}, vocab {args.zero3_vocab_size}; "
        f"{n_base / 1e6:.2f} M base params")
    say(f"  batch    : {args.zero3_batch_size} x {args.zero3_seq_len} tokens per rank")
    say(f"  adapters : r {args.rank}, AdaLoRA target_r {args.target_rank}, alpha {2 * args.rank}, targets "
        f"{','.join(args.targets)}; schedule delta_t 1, t_init {T_INIT}, t_final {T_FINAL}, total_step {total_step} "
        f"(budget {schedule.initial_budget} -> {schedule(n_steps)[0]}, target {schedule.target_budget})")
    say("  ZeRO-3   : stage3_param_persistence_threshold 0; elements held by rank 0 / full:")
    for key, (loc, tot) in shard.items():
        say(f"             {key:<16}{loc:>12,} / {tot:<12,} = {loc / max(tot, 1):.3f}")
    say(f"  timing   : {args.warmup} warm-up + {args.repeats} x {args.zero3_steps} timed steps per arm, interleaved "
        f"step by step, first arm alternating per repeat; setup {setup_s:.1f} s")

    for i in range(args.warmup):
        for arm in (sora, lora):
            _, loss, lm, _, _ = step(arm)
            if i == 0:
                arm.first_loss, arm.first_lm_loss = loss, lm
    sora.parts.enabled = parts_on

    pressure_before = cpu_pressure()
    t_bench = time.perf_counter()
    for rep in range(args.repeats):
        order = (sora, lora) if rep % 2 == 0 else (lora, sora)
        for arm in order:
            arm.times.append([])
        for _ in range(args.zero3_steps):
            for arm in order:
                dt, _, _, counts, nbytes = step(arm)
                arm.times[-1].append(dt)
                arm.step_totals.append(sum(counts.values()))
                if arm.counted is None:
                    arm.counted = (counts, nbytes)  # exactly one timed step per arm
    bench_s = time.perf_counter() - t_bench
    pressure_after = cpu_pressure()
    sora.parts.uninstall()
    for arm in (sora, lora):  # one more, untimed step per arm that records who issued each collective
        step(arm, trace=True)

    all_medians = [None] * world
    dist.all_gather_object(all_medians, {a.key: statistics.median([t for r in a.times for t in r]) * 1e3
                                         for a in (sora, lora)})
    kept = allocator.n_triplets - int(allocator.pruned.sum())
    s, l_ = summarize(sora.times), summarize(lora.times)
    r = ratios(s, l_)
    is_noisy = noisy([r], [s, l_])
    parts = sora.parts.medians_ms()

    say()
    say(f"  {'arm':<17}{'median ms':>11}{'p10 ms':>10}{'p90 ms':>10}{'min ms':>10}   per-repeat medians (ms)")
    for arm, st in ((sora, s), (lora, l_)):
        say(f"  {arm.name:<17}{st['median_ms']:>11.2f}{st['p10_ms']:>10.2f}{st['p90_ms']:>10.2f}{st['min_ms']:>10.2f}   "
            + " ".join(f"{x:.2f}" for x in st["per_repeat_median_ms"]))
    say(f"  sora-ds AdaLoRA / PEFT LoRA     median {r['median']:.3f}; per repeat "
        f"{' '.join(f'{x:.3f}' for x in r['per_repeat'])} (min {min(r['per_repeat']):.3f}, max "
        f"{max(r['per_repeat']):.3f}); p10s {r['p10']:.3f}, minima {r['min']:.3f}")
    say("  median step ms on each rank's clock (sora-ds AdaLoRA / PEFT LoRA): "
        + ", ".join(f"rank {i} {m['sora']:.2f} / {m['lora']:.2f}" for i, m in enumerate(all_medians)))
    if pressure_after:
        say("  host CPU pressure at end of timing (PSI some %, load): "
            + ", ".join(f"{k} {v:g}" for k, v in pressure_after.items()))
    if is_noisy:
        say("  NOTE: timings are noisy (per-repeat ratios spread > 0.05 or p90 > 1.5 x p10): other work is probably "
            "competing for the CPU; rerun on a quiet machine or with more --repeats.")
    if parts:
        say(f"  sora-ds AdaLoRA bookkeeping per step on rank 0 (median ms): scores {parts['scores']:.3f}, allocation "
            f"(incl. its all_reduce) {parts['allocation']:.3f}, total {parts['total']:.3f} "
            f"({parts['total'] / s['median_ms']:.1%} of the median step); {parts['allocations']} allocations in "
            f"{parts['steps']} timed steps")

    (sc, sb), (lc, lb) = sora.counted, lora.counted
    ops = sorted(set(sc) | set(lc))
    say()
    say(f"  {'collectives in the first timed step (rank 0)':<46}{'AdaLoRA':>9}{'LoRA':>9}{'AdaLoRA KiB':>13}"
        f"{'LoRA KiB':>10}")
    for op in ops:
        say(f"    {op:<44}{sc.get(op, 0):>9}{lc.get(op, 0):>9}{sb.get(op, 0) / 1024:>13.1f}{lb.get(op, 0) / 1024:>10.1f}")
    say(f"    {'total':<44}{sum(sc.values()):>9}{sum(lc.values()):>9}{sum(sb.values()) / 1024:>13.1f}"
        f"{sum(lb.values()) / 1024:>10.1f}")
    say("    (KiB: largest tensor buffer of each call, summed over calls)")
    for arm in (sora, lora):
        say(f"    {arm.name} call sites (calls, op, innermost DeepSpeed / sora-ds frames; one untimed step):")
        for (op, site), n in sorted(arm.sites.items()):
            say(f"      {n:>4}  {op:<24}{site}")
    say(f"    per-step totals over all {len(sora.step_totals)} timed steps per arm: AdaLoRA "
        f"{min(sora.step_totals)}..{max(sora.step_totals)}, LoRA {min(lora.step_totals)}..{max(lora.step_totals)}")
    say(f"    optimizer param groups: AdaLoRA {len(s_engine.optimizer.param_groups)}, LoRA "
        f"{len(l_engine.optimizer.param_groups)}")
    say()
    say(f"  {'':<36}{'sora-ds AdaLoRA':>16}{'PEFT LoRA':>12}")
    say(f"  {'adapted modules':<36}{sora.n_modules:>16}{lora.n_modules:>12}")
    say(f"  {'trainable params':<36}{shard['sora-ds adapter'][1]:>16,}{shard['lora adapter'][1]:>12,}")
    say(f"  {'first loss incl. orth penalty':<36}{sora.first_loss:>16.6f}{'':>12}")
    say(f"  {'first language-model loss':<36}{sora.first_lm_loss:>16.6f}{lora.first_lm_loss:>12.6f}   (must agree)")
    say(f"  {'kept triplets after bench':<36}{kept:>16}   (budget {allocator.budget} of {allocator.n_triplets})")
    say(f"  timed section {bench_s:.1f} s")

    if rank == 0 and args.workdir:
        result = {
            "device_name": device_name(cuda), "cuda": cuda, "world_size": world, "backend": dist.get_backend(),
            "dtype": "bf16" if bf16 else "fp32", "torch_threads_per_rank": torch.get_num_threads(),
            "versions": {"torch": torch.__version__, "deepspeed": deepspeed.__version__,
                         "transformers": transformers.__version__, "peft": peft.__version__,
                         "sora_ds": sora_ds.__version__},
            "base_params": n_base, "total_step": total_step,
            "sharding_rank0": {k: {"local": a, "full": b} for k, (a, b) in shard.items()},
            "arms": {"sora": {**s, "first_loss": sora.first_loss, "first_lm_loss": sora.first_lm_loss,
                              "bookkeeping_ms": parts},
                     "lora": {**l_, "first_lm_loss": lora.first_lm_loss}},
            "ratio_sora_over_lora": r, "per_rank_median_ms": all_medians,
            "collectives": {"sora": {"calls": sc, "bytes": sb, "total": sum(sc.values()),
                                     "per_step_total_range": [min(sora.step_totals), max(sora.step_totals)]},
                            "lora": {"calls": lc, "bytes": lb, "total": sum(lc.values()),
                                     "per_step_total_range": [min(lora.step_totals), max(lora.step_totals)]},
                            "sites": {a.key: {f"{op} @ {site}": n for (op, site), n in a.sites.items()}
                                      for a in (sora, lora)}},
            "kept_triplets": kept, "budget": allocator.budget, "triplets": allocator.n_triplets,
            "noisy": is_noisy, "cpu_pressure_before": pressure_before, "cpu_pressure_after": pressure_after,
            "timed_section_s": bench_s,
        }
        (Path(args.workdir) / "zero3.json").write_text(json.dumps(result, indent=2, default=str))
    dist.barrier()
    dist.destroy_process_group()
    del dschf


# ----------------------------------------------------------------------------------------------------------------
# main


def verdict(ratio: float, target: float, strict: bool = False) -> str:
    ok = ratio < target if strict else ratio <= target
    return "PASS" if ok else ("NOT FASTER" if strict else "ABOVE TARGET")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*is deprecated", category=FutureWarning)
    if args.worker:
        worker(args)
        return 0
    t0 = time.perf_counter()
    single = zero3 = None
    rc = 0
    if args.only != "zero3":
        single = run_single(args)
        gc.collect()
    if args.only != "single":
        print(flush=True)
        rc, zero3 = launch_zero3(_strip_json(argv), args)
        if rc != 0 or zero3 is None:
            print(f"adalora_overhead: the ZeRO-3 part failed (exit status {rc})", file=sys.stderr)
    total_s = time.perf_counter() - t0

    import torch

    print()
    dev = (single or {}).get("device_name") or (zero3 or {}).get("device_name") or device_name(False)
    print(f"device: {dev}; torch {torch.__version__}; total {total_s:.0f} s")
    if single:
        a = single["arms"]
        r1, r2 = single["ratio_sora_over_lora"]["median"], single["ratio_sora_over_peft_adalora"]["median"]
        print(f"one process: median step sora-ds AdaLoRA {a['sora']['median_ms']:.2f} ms, PEFT AdaLoRA "
              f"{a['peft_adalora']['median_ms']:.2f} ms, PEFT LoRA {a['lora']['median_ms']:.2f} ms")
        print(f"one process: ratio sora-ds AdaLoRA / PEFT LoRA     {r1:.3f}  target <= {TARGET_VS_LORA:.2f}  "
              f"[{verdict(r1, TARGET_VS_LORA)}]" + ("  [noisy: see NOTE above]" if single["noisy"] else ""))
        print(f"one process: ratio sora-ds AdaLoRA / PEFT AdaLoRA  {r2:.3f}  target <  {TARGET_VS_PEFT_ADALORA:.2f}  "
              f"[{verdict(r2, TARGET_VS_PEFT_ADALORA, strict=True)}]"
              + ("  [noisy: see NOTE above]" if single["noisy"] else ""))
    if zero3:
        a = zero3["arms"]
        r3 = zero3["ratio_sora_over_lora"]["median"]
        c = zero3["collectives"]
        frac0 = zero3["sharding_rank0"]["sora-ds adapter"]
        print(f"ZeRO-3 ({zero3['world_size']} ranks, {zero3['backend']}): median step sora-ds AdaLoRA "
              f"{a['sora']['median_ms']:.2f} ms, PEFT LoRA {a['lora']['median_ms']:.2f} ms; adapter elements on "
              f"rank 0: {frac0['local'] / frac0['full']:.3f}")
        print(f"ZeRO-3: ratio sora-ds AdaLoRA / PEFT LoRA          {r3:.3f}  target <= {TARGET_VS_LORA:.2f}  "
              f"[{verdict(r3, TARGET_VS_LORA)}]" + ("  [noisy: see NOTE above]" if zero3["noisy"] else ""))
        print(f"ZeRO-3: collectives per step: AdaLoRA {c['sora']['total']}, LoRA {c['lora']['total']} (all_reduce "
              f"{c['sora']['calls'].get('all_reduce', 0)} vs {c['lora']['calls'].get('all_reduce', 0)}; expected: one "
              "extra all_reduce per allocation)")
    if args.json is not None:
        result = {
            "host": platform.node(), "python": platform.python_version(), "pid": os.getpid(),
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                     if k not in ("worker", "workdir")},
            "targets": {"sora_over_lora_max": TARGET_VS_LORA, "sora_over_peft_adalora_below": TARGET_VS_PEFT_ADALORA},
            "single": single, "zero3": zero3, "zero3_exit_status": rc if args.only != "single" else None,
            "total_s": total_s,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2, default=str) + "\n")
        print(f"wrote {args.json}")
    return rc


def _strip_json(argv: list[str]) -> list[str]:
    """argv without --json PATH / --json=PATH (rank 0 of the worker hands its figures back through --workdir)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--json":
            skip = True
        elif not a.startswith("--json="):
            out.append(a)
    return out


if __name__ == "__main__":
    sys.exit(main())
