"""SoRA against PEFT LoRA under PyTorch FSDP2 (2 ranks): step time and collectives per optimizer step.

What it measures (one run, both arms side by side)
    1. Step time. A step is ``loss = model(input_ids=x, labels=x).loss; loss.backward(); opt.step();
       opt.zero_grad()`` on a model sharded with FSDP2 the way the recipe shards it
       (:func:`sora_ds.engine.fsdp.shard`: ``fully_shard`` per decoder layer, then the root), for two arms with the
       same adapter shapes on the same base (same ``LlamaConfig``, same seed):

       * SoRA: ``sora_ds.inject(model, SoRAConfig(r, 2r, targets, gate_init="ones"))``, sharded, then
         ``sora_ds.build_optimizer(..., sparse_lambda=1e-6, threshold_mode="lr_scaled")`` (AdamW plus the proximal
         step on the gates' local rows; a shrink of 1e-10 per step, so no gate dies);
       * LoRA: ``peft.get_peft_model(model, LoraConfig(r, 2r, targets, lora_dropout=0))``, sharded, then
         ``torch.optim.AdamW`` over the trainable parameters.

       Prints the median step time of each arm, p10/p90, per-repeat medians and the ratio SoRA/LoRA (target
       <= 1.05).
    2. Collectives per optimizer step: every ``torch.distributed`` collective is wrapped before the models are
       built (FSDP2 looks its collectives up in ``torch.distributed`` at call time) and counted over every timed
       step, per op; the per-step totals are checked for being constant. Target: equal counts in both arms (the
       proximal step adds none).
    3. The fraction of adapter elements rank 0 holds (~0.5 with 2 ranks: really sharded).

How
    ``python bench/fsdp2_overhead.py`` starts ``torchrun --standalone --nproc_per_node N`` on itself with
    ``--worker`` (gloo on CPU, NCCL on GPU). Arms are stepped interleaved, the first arm alternating between
    repeats, each step after a barrier (outside the clock and the counted window). Only rank 0 prints.

Commands
    CPU (2 ranks, gloo, fp32)::

        python bench/fsdp2_overhead.py --json /tmp/fsdp2_overhead_cpu.json

    CUDA (one GPU per rank, NCCL; fp32 parameters)::

        python bench/fsdp2_overhead.py --hidden-size 2048 --layers 8 --intermediate-size 5504 --heads 16 \\
            --vocab-size 32000 --seq-len 1024 --batch-size 4 --steps 30
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from datetime import timedelta
from pathlib import Path

import harness as h


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    h.model_args(p, "model", hidden_size=256, layers=4, intermediate_size=688, heads=8, vocab_size=1024, seq_len=128,
                 batch_size=4, seed=0)
    g = p.add_argument_group("adapters")
    g.add_argument("--rank", type=int, default=8)
    h.targets_arg(g)
    h.timing_args(p.add_argument_group("timing"), steps=20, warmup=3)
    g = p.add_argument_group("run")
    g.add_argument("--nproc", type=int, default=2)
    g.add_argument("--timeout", type=float, default=900)
    g.add_argument("--json", type=Path, default=None)
    g.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    g.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    h.split_targets(args)
    return args


def build_arms(args, device) -> list[h.Arm]:
    import peft
    import torch

    import sora_ds
    from sora_ds.engine.fsdp import shard

    def base():
        return h.build_llama(args.hidden_size, args.layers, args.intermediate_size, args.heads, args.vocab_size,
                             args.seq_len, args.seed).to(device)

    model = base()
    sora_ds.inject(model, sora_ds.SoRAConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=args.targets,
                                             init_seed=args.seed, gate_init="ones"))
    shard(model)
    sora = h.Arm("SoRA", model, sora_ds.build_optimizer(model, learning_rate=h.LEARNING_RATE, sparse_lambda=1e-6,
                                                        threshold_mode="lr_scaled"), key="sora", short="SoRA")
    lora_model = peft.get_peft_model(base(), peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank,
                                                             target_modules=args.targets, lora_dropout=0.0))
    shard(lora_model.base_model.model)
    lora = h.Arm("LoRA", lora_model, h.adamw(lora_model), key="lora", short="LoRA")
    torch.manual_seed(args.seed)
    return [sora, lora]


def step(arm: h.Arm, batch: dict, sync, timed: bool) -> float:
    import torch.distributed as dist

    dist.barrier()
    sync()
    h.COUNTER.reset()
    t0 = time.perf_counter()
    loss = arm.model(**batch).loss
    loss.backward()
    arm.opt.step()
    arm.opt.zero_grad(set_to_none=True)
    sync()
    dt = time.perf_counter() - t0
    calls, _ = h.COUNTER.snapshot()
    if timed:
        arm.step_totals.append(sum(calls.values()))
        arm.counted = arm.counted or h.COUNTER.snapshot()
    arm.loss = arm.lm_loss = float(loss.detach())
    return dt


def worker(args: argparse.Namespace) -> None:
    h.COUNTER.install()
    import torch
    import torch.distributed as dist

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=args.timeout))
    rank, device = dist.get_rank(), torch.device("cuda" if cuda else "cpu")
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def say(*a):
        if rank == 0:
            print(*a, flush=True)

    from sora_ds.adapters.compact import adapter_tensors
    from sora_ds.engine import local_numel

    arms = build_arms(args, device)
    sora_params = adapter_tensors([m for _, m in h.adapter_layers(arms[0].model)])
    held = sum(local_numel(p) for p in sora_params) / sum(p.numel() for p in sora_params)
    h.header("SoRA vs LoRA under FSDP2", [
        ("device", f"{'cuda' if cuda else 'cpu'} ({h.device_name(cuda)}), {dist.get_world_size()} ranks, "
                   f"backend {dist.get_backend()}, fp32"),
        ("versions", h.version_text(h.versions("torch", "transformers", "peft", "accelerate"), python=True)),
        ("model", f"hidden {args.hidden_size}, layers {args.layers}, intermediate {args.intermediate_size}, "
                  f"vocab {args.vocab_size}, batch {args.batch_size} x {args.seq_len} per rank"),
        ("adapters", f"r {args.rank}, targets {','.join(args.targets)}; rank 0 holds {held:.3f} of SoRA's "
                     "adapter elements"),
    ], say=say)
    batch = h.random_batch(args.vocab_size, args.batch_size, args.seq_len, args.seed + 1 + rank, device)
    timing = h.time_arms(arms, max(args.warmup, 1), args.repeats, args.steps,
                         lambda a: step(a, batch, sync, False), lambda a: step(a, batch, sync, True))
    timing["medians"] = h.rank_medians(arms)
    times = h.report_times(arms, timing, [("SoRA / LoRA", arms[0], arms[1])], width=6, say=say)
    ratio = times["ratios"]["SoRA / LoRA"]["median"]
    say(f"  step-time ratio SoRA/LoRA {ratio:.3f} (target <= 1.05): {h.verdict(ratio, 1.05)}")
    (sc, _), (lc, _) = arms[0].counted, arms[1].counted
    say(f"  collectives per optimizer step{'':<16}{'SoRA':>8}{'LoRA':>8}")
    for op in sorted(set(sc) | set(lc)):
        say(f"    {op:<44}{sc.get(op, 0):>8}{lc.get(op, 0):>8}")
    say(f"    {'total':<44}{sum(sc.values()):>8}{sum(lc.values()):>8}")
    h.print_step_totals(arms, say=say)
    equal = sc == lc and len(set(arms[0].step_totals)) == 1
    say(f"  collectives: {'EQUAL' if equal else 'DIFFERENT'} in both arms")
    if rank == 0:
        h.hand_back(args, {"device": h.device_name(cuda), "world_size": dist.get_world_size(),
                           "adapter_fraction_rank0": held, "ratio": ratio, "times": times,
                           "stats": {a.key: a.stats for a in arms}, "collectives": {"sora": sc, "lora": lc},
                           "step_totals": {a.key: a.step_totals for a in arms},
                           "pressure": [timing["pressure_before"], timing["pressure_after"]], "args": h.args_record(args)})
    dist.barrier()
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    return h.launch_and_write(__file__, argv, args)


if __name__ == "__main__":
    sys.exit(main())
