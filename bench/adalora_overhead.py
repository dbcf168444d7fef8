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
       engine.step()``; sora-ds's ``AdapterAdamW`` (from ``build_optimizer``) and torch's AdamW are the client
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
      does, with the same helpers (``bench/harness.py``: collective counter, ZeRO-3 config, PEFT LoRA arm). The
      config has ``stage3_param_persistence_threshold: 0``; base models are built inside ``deepspeed.zero.Init`` (with
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
import os
import platform
import statistics
import sys
import time
import warnings

import harness as h

ORTH_WEIGHT = 0.5
T_INIT = 1  # the first optimizer step keeps the full budget (untimed warm-up); every later step allocates
T_FINAL = 1
TARGET_VS_LORA = 1.10  # sora-ds AdaLoRA / PEFT LoRA, one process and ZeRO-3
TARGET_VS_PEFT_ADALORA = 1.0  # sora-ds AdaLoRA / PEFT AdaLoRA: faster

ARM_LABELS = {"sora": "sora-ds AdaLoRA", "peft_adalora": "PEFT AdaLoRA", "lora": "PEFT LoRA"}
PART_NAMES = ("scores", "allocation", "total")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    h.model_args(p, "model (one process)", hidden_size=256, layers=4, intermediate_size=688, heads=8, kv_heads=8,
                 vocab_size=4096, seq_len=128, batch_size=4)
    h.model_args(p, "model (ZeRO-3; layers as --layers; defaults as zero3_overhead.py)", prefix="zero3-",
                 hidden_size=128, intermediate_size=344, heads=(4, "attention heads (= key/value heads)"),
                 vocab_size=512, seq_len=64, batch_size=(4, "micro-batch per rank"))
    g = p.add_argument_group("adapters")
    g.add_argument("--rank", type=int, default=12, help="initial AdaLoRA rank and LoRA rank (lora_alpha = 2 * rank)")
    g.add_argument("--target-rank", type=int, default=8, help="AdaLoRA target_r (average final rank)")
    h.targets_arg(g)
    g = p.add_argument_group("timing")
    h.timing_args(g, steps=20, warmup=3, warmup_help=" (>= 1)")
    g.add_argument("--zero3-steps", type=int, default=20, help="timed steps per arm per repeat under ZeRO-3")
    g.add_argument("--phases", action="store_true",
                   help="one process: also time forward (incl. orth penalty) / backward / optimizer (incl. AdaLoRA "
                   "bookkeeping and zero_grad) separately")
    g.add_argument("--parts", action=argparse.BooleanOptionalAction, default=None,
                   help="also time the AdaLoRA bookkeeping (scores / allocation); default: on for CPU, off for CUDA")
    g = p.add_argument_group("run")
    g.add_argument("--only", choices=("single", "zero3"), default=None, help="run one part only")
    h.run_args(g, "device", "dtype", "nproc", "seed", "threads", "timeout", "json", "worker", "workdir",
               device="one-process part: cpu, cuda, cuda:1, ... (ZeRO-3 uses CUDA when available)",
               dtype="bf16: base weights (ZeRO-3: CUDA only)", nproc="ZeRO-3 ranks (processes)",
               threads="torch.set_num_threads, one-process part (default: torch's default)")
    args = p.parse_args(argv)
    h.split_targets(args)
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


class PartTimer:
    """Wall time of calls to a few methods, installed as instance attributes (so internal ``self.x()`` calls hit
    them); off until ``enabled``; synchronises a CUDA device around each call when ``sync`` is given."""

    def __init__(self, sync=None) -> None:
        self.times: dict[str, list[float]] = {k: [] for k in PART_NAMES}
        self.enabled = False
        self._sync = sync
        self._installed: list[tuple[object, str]] = []

    def wrap(self, obj, **methods: str) -> PartTimer:
        """``method=part`` for each method of ``obj`` to time."""
        for method, part in methods.items():
            self._wrap(obj, method, part)
        return self

    def _wrap(self, obj, method: str, part: str) -> None:
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


def sora_timer(allocator, sync) -> PartTimer:
    return PartTimer(sync).wrap(allocator, after_update="total", _update_importance="scores", _allocate="allocation")


def orth_penalty(module):
    import sora_ds

    return sora_ds.orth_loss(module, ORTH_WEIGHT)


def adalora_config(args: argparse.Namespace, total_step: int):
    from sora_ds import AdaLoRAConfig

    return AdaLoRAConfig(r=args.rank, target_r=args.target_rank, lora_alpha=2 * args.rank,
                         target_modules=list(args.targets), t_init=T_INIT, t_final=T_FINAL, delta_t=1,
                         total_step=total_step, orth_reg_weight=ORTH_WEIGHT, init_seed=args.seed)


# ----------------------------------------------------------------------------------------------------------------
# part 1: one process


def build_single_arms(args, base, timer_sync) -> tuple[h.Arm, h.Arm, h.Arm, int]:
    """PEFT LoRA, PEFT AdaLoRA and sora-ds AdaLoRA (P, Q copied from PEFT's) on copies of ``base``; with
    ``timer_sync`` (False: none), a bookkeeping timer on each AdaLoRA arm."""
    import torch
    from peft import AdaLoraConfig, get_peft_model

    import sora_ds

    n_steps = total_steps(args, args.steps)
    total_step = schedule_total_step(n_steps)
    lora_model, lora_opt, n_lora = h.lora_arm(copy.deepcopy(base), args.rank, args.targets)
    lora = h.Arm(ARM_LABELS["lora"], lora_model, lora_opt, n_lora, key="lora")

    peft_cfg = AdaLoraConfig(init_r=args.rank, target_r=args.target_rank, tinit=T_INIT, tfinal=T_FINAL, deltaT=1,
                             total_step=total_step, lora_alpha=2 * args.rank, target_modules=list(args.targets),
                             lora_dropout=0.0, orth_reg_weight=ORTH_WEIGHT, task_type="CAUSAL_LM")
    peft_model = get_peft_model(copy.deepcopy(base), peft_cfg)
    peft = h.Arm(ARM_LABELS["peft_adalora"], peft_model, h.adamw(peft_model), len(h.peft_lora_layers(peft_model)),
                 key="peft_adalora", after_step=lambda arm: arm.model.base_model.update_and_allocate(arm.t))

    sora_model = copy.deepcopy(base)
    adapted = sora_ds.inject(sora_model, adalora_config(args, total_step))
    with torch.no_grad():  # twin start: PEFT's P and Q (E = 0 in both)
        for name, m in h.adapter_layers(sora_model):
            pm = peft_model.base_model.model.get_submodule(name)
            m.lora_A.copy_(pm.lora_A["default"])
            m.lora_B.copy_(pm.lora_B["default"])
    sora = h.Arm(ARM_LABELS["sora"], sora_model, sora_ds.build_optimizer(sora_model, learning_rate=h.LEARNING_RATE),
                 len(adapted), key="sora", penalty=orth_penalty)
    sora.parts = peft.parts = None
    if timer_sync is not False:
        sora.parts = sora_timer(sora.opt.rank_allocator, timer_sync)
        peft.parts = PartTimer(timer_sync).wrap(peft_model.base_model, update_and_allocate="total")
        peft.parts.wrap(peft_model.base_model.rankallocator, update_ipt="scores", mask_to_budget="allocation")
    return sora, peft, lora, n_steps


def check_schedules(sora: h.Arm, peft: h.Arm, n_steps: int) -> dict:
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


def single_header(args, device, n_base: int, budget: dict, n_steps: int, parts_on: bool, setup_s: float) -> None:
    import torch

    h.header("AdaLoRA train-step overhead, part 1: one process (sora-ds AdaLoRA vs PEFT AdaLoRA vs PEFT LoRA)", [
        ("device", f"{device} ({h.device_name(device.type == 'cuda')}), dtype {args.dtype}, torch threads "
                   f"{torch.get_num_threads()}"),
        ("versions", h.version_text(h.versions("torch", "transformers", "peft", "sora_ds"), python=True)),
        ("model", f"Llama hidden {args.hidden_size}, layers {args.layers}, intermediate {args.intermediate_size}, "
                  f"heads {args.heads}/{args.kv_heads} kv, vocab {args.vocab_size}; {n_base / 1e6:.2f} M base params"),
        ("batch", f"{args.batch_size} x {args.seq_len} tokens"),
        ("adapters", f"r {args.rank} (AdaLoRA initial, LoRA), AdaLoRA target_r {args.target_rank}, alpha "
                     f"{2 * args.rank}, targets {','.join(args.targets)}; lr {h.LEARNING_RATE:g}, orth_reg_weight "
                     f"{ORTH_WEIGHT}"),
        ("schedule", f"delta_t 1, t_init {T_INIT}, t_final {T_FINAL}, total_step {budget['total_step']} (= {n_steps} "
                     f"steps per arm + {budget['total_step'] - n_steps}): scores + global re-allocation at every step "
                     f"from step {T_INIT + 1}; budget {budget['initial']} -> {budget['per_step'][args.warmup]} at the "
                     f"first timed step -> {budget['per_step'][-1]} at the last (target {budget['target']}); "
                     "schedules of both AdaLoRA arms checked equal, PEFT kthvalue k >= 1 at every allocation"),
        ("timing", f"{args.warmup} warm-up + {args.repeats} x {args.steps} timed steps per arm, interleaved step by "
                   f"step, first arm rotating per repeat; bookkeeping parts {'timed' if parts_on else 'not timed'}; "
                   f"setup {setup_s:.1f} s"),
    ])


def print_bookkeeping(parts: dict, st: dict) -> None:
    sora, peft = parts["sora"], parts["peft_adalora"]
    print()
    print(f"  AdaLoRA bookkeeping per step (median ms over the timed steps){'sora-ds':>14}{'PEFT':>10}")
    for k, label in (("scores", "importance scores (EMA update)"),
                     ("allocation", "allocation (triplet scores, top-b, masks)"),
                     ("total", "total (sora-ds: after_update; PEFT: update_and_allocate)")):
        h.row(f"  {label}", f"{sora[k]:.3f}", f"{peft[k]:.3f}", width=62, cell=(12, 10))
    h.row("  share of the median step", f"{sora['total'] / st['sora']['median_ms']:.1%}",
          f"{peft['total'] / st['peft_adalora']['median_ms']:.1%}", width=62, cell=(12, 10))
    h.row("  allocations / steps timed", *(f"{p['allocations']} / {p['steps']}" for p in (sora, peft)), width=62,
          cell=(12, 10))


def kept_triplets(sora: h.Arm, peft: h.Arm, budget: dict) -> dict:
    """Kept triplets (E != 0) of both AdaLoRA arms, and how many agree."""
    sora_kept = {n: (m.gate.detach() != 0).cpu() for n, m in h.adapter_layers(sora.model)}
    peft_kept = {n: (peft.model.base_model.model.get_submodule(n).lora_E["default"].detach().reshape(-1) != 0).cpu()
                 for n in sora_kept}
    return {"sora": sum(int(v.sum()) for v in sora_kept.values()),
            "peft_adalora": sum(int(v.sum()) for v in peft_kept.values()), "budget": budget["per_step"][-1],
            "agree": sum(int((sora_kept[n] == peft_kept[n]).sum()) for n in sora_kept),
            "triplets": sum(v.numel() for v in sora_kept.values())}


def print_sanity(args, arms, n_tr: dict, kept: dict) -> None:
    sora, peft, lora = arms
    cells = dict(width=36, cell=(16, 14, 12))
    print()
    h.row("", *(a.name for a in arms), **cells)
    h.row("adapted modules", *(str(a.n_modules) for a in arms), **cells)
    h.row("trainable params", *(f"{n_tr[a.key]:,}" for a in arms), **cells,
          note=f"   (AdaLoRA - LoRA: E, {args.rank} x {sora.n_modules} = {args.rank * sora.n_modules:,})")
    h.row("first loss incl. orth penalty", f"{sora.first_loss:.6f}", f"{peft.first_loss:.6f}", "", **cells,
          note="   (AdaLoRA arms must agree)")
    h.row("first language-model loss", f"{sora.first_lm_loss:.6f}", "", f"{lora.first_lm_loss:.6f}", **cells,
          note="   (must agree)")
    h.row("kept triplets after bench (E != 0)", str(kept["sora"]), str(kept["peft_adalora"]), "", **cells,
          note=f"   (budget {kept['budget']} of {kept['triplets']})")
    h.row("same kept/pruned state, both arms", f"{kept['agree']} / {kept['triplets']} triplets", width=36, cell=30)


def run_single(args: argparse.Namespace) -> dict:
    import torch

    device = h.torch_device(args.device, args.threads)
    cuda = device.type == "cuda"
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    parts_on = (not cuda) if args.parts is None else args.parts
    vers = h.versions("torch", "transformers", "peft", "sora_ds")
    sync = h.device_sync(device)
    t_setup = time.perf_counter()
    base = h.build_llama(args.hidden_size, args.layers, args.intermediate_size, args.heads, args.vocab_size,
                         args.seq_len, args.seed, kv_heads=args.kv_heads).to(device=device, dtype=dtype)
    n_base = sum(p.numel() for p in base.parameters())
    sora, peft, lora, n_steps = build_single_arms(args, base, (sync if cuda else None) if parts_on else False)
    del base
    gc.collect()
    budget = check_schedules(sora, peft, n_steps)
    batch = h.random_batch(args.vocab_size, args.batch_size, args.seq_len, args.seed + 1, device)
    setup_s = time.perf_counter() - t_setup
    arms = (sora, peft, lora)
    single_header(args, device, n_base, budget, n_steps, parts_on, setup_s)

    timing = h.time_arms(arms, args.warmup, args.repeats, args.steps, lambda arm: h.train_step(arm, batch, sync),
                         lambda arm: h.train_step(arm, batch, sync, args.phases),
                         [arm.parts for arm in (sora, peft) if arm.parts])
    rep = h.report_times(arms, timing, [(f"{a.name} / {b.name}", a, b) for a, b in ((sora, lora), (sora, peft),
                                                                                    (peft, lora))], 3, width=17)
    st = {arm.key: arm.stats for arm in arms}
    r_lora, r_peft, r_peft_lora = rep["ratios"].values()
    phase_ms = None
    if args.phases:
        phase_ms = {arm.key: {ph: statistics.median(v) * 1e3 for ph, v in arm.phase_times.items()} for arm in arms}
        print()
        h.row("phase (median ms)", *(a.name for a in arms), width=28, cell=(16, 14, 12))
        for ph, label in (("forward", "forward (+ orth penalty)"), ("backward", "backward"),
                          ("optimizer", "optimizer + bookkeeping")):
            h.row(label, *(f"{phase_ms[a.key][ph]:.3f}" for a in arms), width=28, cell=(16, 14, 12))
    parts = {arm.key: arm.parts and arm.parts.medians_ms() for arm in (sora, peft)}
    if parts_on:
        print_bookkeeping(parts, st)
    n_tr = {arm.key: h.trainable(arm.model) for arm in arms}
    kept = kept_triplets(sora, peft, budget)
    print_sanity(args, arms, n_tr, kept)
    print(f"  timed section: {timing['bench_s']:.1f} s", flush=True)
    return {
        "device": str(device), "device_name": h.device_name(cuda), "dtype": args.dtype,
        "torch_threads": torch.get_num_threads(), "versions": vers, "base_params": n_base, "schedule": budget,
        "arms": {arm.key: {**st[arm.key], "trainable_params": n_tr[arm.key], "adapted_modules": arm.n_modules,
                           "first_loss": arm.first_loss, "first_lm_loss": arm.first_lm_loss,
                           "bookkeeping_ms": parts.get(arm.key)} for arm in arms},
        "ratio_sora_over_lora": r_lora, "ratio_sora_over_peft_adalora": r_peft,
        "ratio_peft_adalora_over_lora": r_peft_lora, "phases_ms": phase_ms, "kept_triplets": kept,
        "noisy": rep["noisy"], "cpu_pressure_before": timing["pressure_before"],
        "cpu_pressure_after": timing["pressure_after"], "timed_section_s": timing["bench_s"],
    }


# ----------------------------------------------------------------------------------------------------------------
# part 2: ZeRO-3 (worker, one rank each, started by torchrun)


def build_zero3_arms(args, w, config: dict, total_step: int) -> tuple[h.Arm, h.Arm]:
    import deepspeed

    import sora_ds

    def llama():
        return h.build_llama(args.zero3_hidden_size, args.layers, args.zero3_intermediate_size, args.zero3_heads,
                             args.zero3_vocab_size, args.zero3_seq_len, args.seed, ds_config=config)

    s_model = llama()
    adapted = sora_ds.inject(s_model, adalora_config(args, total_step))
    s_opt = sora_ds.build_optimizer(s_model, learning_rate=h.LEARNING_RATE)
    l_model, l_opt, n_l = h.lora_arm(llama(), args.rank, args.targets, autocast_adapter_dtype=not w.bf16)
    s_engine, *_ = deepspeed.initialize(model=s_model, optimizer=s_opt, config=config)
    l_engine, *_ = deepspeed.initialize(model=l_model, optimizer=l_opt, config=config)
    return (h.Arm(ARM_LABELS["sora"], s_engine, s_opt, len(adapted), key="sora", short="AdaLoRA",
                  penalty=orth_penalty),
            h.Arm(ARM_LABELS["lora"], l_engine, l_opt, n_l, key="lora", short="LoRA"))


def zero3_header(args, w, shard: dict, total_step: int, schedule, n_steps: int, setup_s: float) -> None:
    import torch

    h.header("AdaLoRA train-step overhead, part 2: DeepSpeed ZeRO-3 (sora-ds AdaLoRA vs PEFT LoRA)", [
        ("device", h.rank_device_text(w, torch.get_num_threads())),
        ("versions", h.version_text(h.versions("torch", "deepspeed", "transformers", "peft", "sora_ds"))),
        ("model", f"Llama hidden {args.zero3_hidden_size}, layers {args.layers}, intermediate "
                  f"{args.zero3_intermediate_size}, heads {args.zero3_heads}, vocab {args.zero3_vocab_size}; "
                  f"{shard['frozen base'][1] / 1e6:.2f} M base params"),
        ("batch", f"{args.zero3_batch_size} x {args.zero3_seq_len} tokens per rank"),
        ("adapters", f"r {args.rank}, AdaLoRA target_r {args.target_rank}, alpha {2 * args.rank}, targets "
                     f"{','.join(args.targets)}; schedule delta_t 1, t_init {T_INIT}, t_final {T_FINAL}, total_step "
                     f"{total_step} (budget {schedule.initial_budget} -> {schedule(n_steps)[0]}, target "
                     f"{schedule.target_budget})"),
        ("ZeRO-3", "stage3_param_persistence_threshold 0; elements held by rank 0 / full:"),
    ], say=w.say)
    h.print_shard(shard, 16, say=w.say)
    w.say(f"  timing   : {args.warmup} warm-up + {args.repeats} x {args.zero3_steps} timed steps per arm, "
          f"interleaved step by step, first arm alternating per repeat; setup {setup_s:.1f} s")


def print_zero3(w, sora: h.Arm, lora: h.Arm, parts) -> None:
    s, say = sora.stats, w.say
    if parts:
        say(f"  sora-ds AdaLoRA bookkeeping per step on rank 0 (median ms): scores {parts['scores']:.3f}, allocation "
            f"(incl. its all_reduce) {parts['allocation']:.3f}, total {parts['total']:.3f} "
            f"({parts['total'] / s['median_ms']:.1%} of the median step); {parts['allocations']} allocations in "
            f"{parts['steps']} timed steps")
    say()
    h.print_collectives("collectives in the first timed step (rank 0)", (sora, lora), (sora.counted, lora.counted),
                        site_note="; one untimed step", say=say)
    h.print_step_totals((sora, lora), say=say)
    say(f"    optimizer param groups: AdaLoRA {len(sora.model.optimizer.param_groups)}, LoRA "
        f"{len(lora.model.optimizer.param_groups)}")


def print_zero3_sanity(w, sora: h.Arm, lora: h.Arm, shard: dict, allocator, kept: int) -> None:
    cells = dict(width=36, cell=(16, 12), say=w.say)
    w.say()
    h.row("", sora.name, lora.name, **cells)
    h.row("adapted modules", str(sora.n_modules), str(lora.n_modules), **cells)
    h.row("trainable params", f"{shard['sora-ds adapter'][1]:,}", f"{shard['lora adapter'][1]:,}", **cells)
    h.row("first loss incl. orth penalty", f"{sora.first_loss:.6f}", "", **cells)
    h.row("first language-model loss", f"{sora.first_lm_loss:.6f}", f"{lora.first_lm_loss:.6f}", **cells,
          note="   (must agree)")
    h.row("kept triplets after bench", str(kept), **cells,
          note=f"   (budget {allocator.budget} of {allocator.n_triplets})")


def worker(args: argparse.Namespace) -> None:
    w = h.start_rank(args.dtype == "bf16")  # counts collectives from here on
    import torch
    import torch.distributed as dist
    from transformers.integrations import HfDeepSpeedConfig

    from sora_ds.adapters.optim import unwrap_optimizer

    parts_on = (not w.cuda) if args.parts is None else args.parts
    config = h.ds_config(args.zero3_batch_size, w.bf16)
    dschf = HfDeepSpeedConfig(config)  # kept alive to the end: transformers/PEFT stay ZeRO-3 aware (as under Trainer)
    n_steps = total_steps(args, args.zero3_steps, extra=1)  # + one traced step after timing
    total_step = schedule_total_step(n_steps)
    t_setup = time.perf_counter()
    sora, lora = build_zero3_arms(args, w, config, total_step)
    setup_s = time.perf_counter() - t_setup
    allocator = unwrap_optimizer(sora.model.optimizer).rank_allocator
    sora.parts = sora_timer(allocator, w.sync if w.cuda else None) if parts_on else None
    frozen = [p for p in sora.model.module.parameters() if not p.requires_grad]
    shard = {"sora-ds adapter": h.held(h.adapter_params(sora.model.module)),
             "lora adapter": h.held([p for p in lora.model.module.parameters() if p.requires_grad]),
             "frozen base": h.held(frozen)}
    batch = h.random_batch(args.zero3_vocab_size, args.zero3_batch_size, args.zero3_seq_len, args.seed + 1 + w.rank,
                           w.device)  # each rank its own micro-batch, as in DP
    zero3_header(args, w, shard, total_step, allocator.schedule, n_steps, setup_s)

    timing = h.ds_compare((sora, lora), batch, w, args, args.zero3_steps, "sora-ds AdaLoRA / PEFT LoRA",
                          [sora.parts] if sora.parts else (), noisy_stats=2)
    kept = allocator.n_triplets - int(allocator.pruned.sum())
    s, l_, r = sora.stats, lora.stats, timing["ratios"]["sora-ds AdaLoRA / PEFT LoRA"]
    parts = sora.parts and sora.parts.medians_ms()
    print_zero3(w, sora, lora, parts)
    print_zero3_sanity(w, sora, lora, shard, allocator, kept)
    w.say(f"  timed section {timing['bench_s']:.1f} s")
    if w.rank == 0 and args.workdir:
        h.hand_back(args, {
            "device_name": h.device_name(w.cuda), "cuda": w.cuda, "world_size": w.world, "backend": w.backend,
            "dtype": "bf16" if w.bf16 else "fp32", "torch_threads_per_rank": torch.get_num_threads(),
            "versions": h.versions("torch", "deepspeed", "transformers", "peft", "sora_ds"),
            "base_params": shard["frozen base"][1], "total_step": total_step,
            "sharding_rank0": {k: {"local": a, "full": b} for k, (a, b) in shard.items()},
            "arms": {"sora": {**s, "first_loss": sora.first_loss, "first_lm_loss": sora.first_lm_loss,
                              "bookkeeping_ms": parts},
                     "lora": {**l_, "first_lm_loss": lora.first_lm_loss}},
            "ratio_sora_over_lora": r, "per_rank_median_ms": timing["medians"],
            "collectives": {**{a.key: {**h.counts_record(a, a.counted),
                                       "per_step_total_range": [min(a.step_totals), max(a.step_totals)]}
                               for a in (sora, lora)}, "sites": h.sites_record((sora, lora))},
            "kept_triplets": kept, "budget": allocator.budget, "triplets": allocator.n_triplets,
            "noisy": timing["noisy"], "cpu_pressure_before": timing["pressure_before"],
            "cpu_pressure_after": timing["pressure_after"], "timed_section_s": timing["bench_s"],
        })
    dist.barrier()
    dist.destroy_process_group()
    del dschf


# ----------------------------------------------------------------------------------------------------------------
# main


def print_summary(single: dict | None, zero3: dict | None, total_s: float) -> None:
    import torch

    noisy = "  [noisy: see NOTE above]"
    print()
    dev = (single or {}).get("device_name") or (zero3 or {}).get("device_name") or h.device_name(False)
    print(f"device: {dev}; torch {torch.__version__}; total {total_s:.0f} s")
    if single:
        a = single["arms"]
        r1, r2 = single["ratio_sora_over_lora"]["median"], single["ratio_sora_over_peft_adalora"]["median"]
        print(f"one process: median step sora-ds AdaLoRA {a['sora']['median_ms']:.2f} ms, PEFT AdaLoRA "
              f"{a['peft_adalora']['median_ms']:.2f} ms, PEFT LoRA {a['lora']['median_ms']:.2f} ms")
        print(f"one process: ratio sora-ds AdaLoRA / PEFT LoRA     {r1:.3f}  target <= {TARGET_VS_LORA:.2f}  "
              f"[{h.verdict(r1, TARGET_VS_LORA)}]" + (noisy if single["noisy"] else ""))
        print(f"one process: ratio sora-ds AdaLoRA / PEFT AdaLoRA  {r2:.3f}  target <  {TARGET_VS_PEFT_ADALORA:.2f}  "
              f"[{h.verdict(r2, TARGET_VS_PEFT_ADALORA, strict=True)}]" + (noisy if single["noisy"] else ""))
    if zero3:
        a, c = zero3["arms"], zero3["collectives"]
        r3 = zero3["ratio_sora_over_lora"]["median"]
        frac0 = zero3["sharding_rank0"]["sora-ds adapter"]
        print(f"ZeRO-3 ({zero3['world_size']} ranks, {zero3['backend']}): median step sora-ds AdaLoRA "
              f"{a['sora']['median_ms']:.2f} ms, PEFT LoRA {a['lora']['median_ms']:.2f} ms; adapter elements on "
              f"rank 0: {frac0['local'] / frac0['full']:.3f}")
        print(f"ZeRO-3: ratio sora-ds AdaLoRA / PEFT LoRA          {r3:.3f}  target <= {TARGET_VS_LORA:.2f}  "
              f"[{h.verdict(r3, TARGET_VS_LORA)}]" + (noisy if zero3["noisy"] else ""))
        print(f"ZeRO-3: collectives per step: AdaLoRA {c['sora']['total']}, LoRA {c['lora']['total']} (all_reduce "
              f"{c['sora']['calls'].get('all_reduce', 0)} vs {c['lora']['calls'].get('all_reduce', 0)}; expected: one "
              "extra all_reduce per allocation)")


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
        rc, zero3 = h.launch_ranks(__file__, argv, args.nproc, args.timeout)
        if rc != 0 or zero3 is None:
            print(f"adalora_overhead: the ZeRO-3 part failed (exit status {rc})", file=sys.stderr)
    total_s = time.perf_counter() - t0
    print_summary(single, zero3, total_s)
    h.write_json(args.json, {
        "host": platform.node(), "python": platform.python_version(), "pid": os.getpid(), "args": h.args_record(args),
        "targets": {"sora_over_lora_max": TARGET_VS_LORA, "sora_over_peft_adalora_below": TARGET_VS_PEFT_ADALORA},
        "single": single, "zero3": zero3, "zero3_exit_status": rc if args.only != "single" else None,
        "total_s": total_s,
    })
    return rc


if __name__ == "__main__":
    sys.exit(main())
