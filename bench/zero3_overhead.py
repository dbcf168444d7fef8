"""SoRA against PEFT LoRA under DeepSpeed ZeRO-3 (2 ranks): step time, collectives per step, adapter save cost.

What it measures (one run, both arms side by side)
    1. Step time. A step is ``loss = engine(input_ids=x, labels=x).loss; engine.backward(loss); engine.step()`` on a
       ZeRO-3 ``deepspeed.initialize`` engine, for two arms with the same adapter shapes (same targets, same rank,
       ``lora_alpha = 2 * rank``) on the same base model (same ``LlamaConfig``, same seed):

       * SoRA: ``sora_ds.inject(model, SoRAConfig(r, 2r, targets, gate_init="ones", init_seed=seed))`` and
         ``sora_ds.build_optimizer(model, learning_rate=1e-4, sparse_lambda=1e-6, threshold_mode="lr_scaled")``
         (AdamW plus the proximal soft-threshold on the gates; a shrink of 1e-10 per step, so no gate dies and the
         shapes of both arms stay equal: the number of dead gate entries is printed at the end);
       * LoRA: ``peft.get_peft_model(model, LoraConfig(r, 2r, targets, lora_dropout=0))`` and ``torch.optim.AdamW``
         over the trainable parameters (lr 1e-4, weight decay 0 as in the SoRA arm).

       Prints the median step time of each arm (over all timed steps of all repeats), p10/p90, the per-repeat
       medians and the ratio SoRA/LoRA of the medians (target <= 1.05).
    2. Collectives per optimizer step. Every ``torch.distributed`` collective / point-to-point function is wrapped
       (in ``torch.distributed`` and ``torch.distributed.distributed_c10d``) BEFORE deepspeed is imported, because
       DeepSpeed's ``TorchBackend`` binds ``all_gather_into_tensor`` / ``reduce_scatter_tensor`` when it is created.
       Only outermost calls are counted (``all_gather_object`` calling ``all_gather`` counts once). Counters are reset
       right before, and read right after, the first timed step of each arm; per-op counts and the size of the
       largest buffer of each call are printed, and the per-step totals of every timed step are checked for being
       constant. One more (untimed) step per arm records the DeepSpeed call site of every collective, so a
       difference between the arms is attributed in the output. Target: equal counts in both arms.
       With DeepSpeed's default ``stage3_prefetch_bucket_size`` a model this small is fetched in one coalesced
       all-gather, which hides per-module fetches; so the same models are also built with a prefetch bucket of 0
       (every module fetched on its own, as when layers outgrow the bucket) and one step per arm is counted (off
       with ``--no-module-fetch-count``). The cost of one scalar all_reduce on the backend is printed for scale.
    3. Adapter save cost. Two more SoRA models under ZeRO-3 with IDENTICAL adapters (regex target
       ``model\\.layers\\.[01]\\.self_attn\\.(q_proj|v_proj)``, same hidden size and rank) on a small and a large base
       (the base grows through intermediate size, vocabulary and number of layers). ``sora_ds.export_peft(model, dir)``
       is called on every rank (it gathers only the adapter and writes on rank 0) after one training step (so B is
       non-zero). Printed: its wall time on rank 0 (median of ``--export-repeats``, the two sizes interleaved, after
       one untimed export each), the collectives of one export, the bytes written (``adapter_model.safetensors`` +
       ``adapter_config.json``) and a check that no written tensor is empty, with the ratios large/small (target:
       independent of the base size) and, for contrast, the bytes a gather of the whole fp32 base would move.

How
    ``python bench/zero3_overhead.py`` starts ``torchrun --standalone --nproc_per_node N`` on itself with
    ``--worker`` (bounded by ``--timeout``; ``DS_ACCELERATOR=cpu`` and gloo when there is no CUDA, NCCL otherwise;
    ``OMP_NUM_THREADS`` = cores / ranks unless set). The ZeRO-3 config has ``stage3_param_persistence_threshold: 0``
    so adapters and gates really are partitioned (the fraction of adapter elements held by rank 0 is printed; ~0.5
    with 2 ranks). Base models are built inside ``deepspeed.zero.Init`` (with ``HfDeepSpeedConfig`` alive, as under
    the HF Trainer), adapters are added after, and ``deepspeed.initialize`` partitions them. Both engines live in one
    process and are stepped interleaved step by step; the arm that goes first alternates between repeats. A barrier
    (outside the clock and outside the counted window) precedes every timed step so ranks start together; each step
    is timed with ``time.perf_counter`` on rank 0 (on CUDA with a device synchronise on both sides). On CPU the JIT
    build of DeepSpeed's shared-memory comm op (unused here) is skipped by replacing ``build_shm_op`` in
    ``deepspeed.comm.torch`` with a no-op. Only rank 0 prints. The script prints (and with ``--json`` writes) figures;
    it asserts nothing about timings.

Commands
    CPU (defaults: 2 ranks, gloo, fp32; about 2.5 minutes on 2 busy cores, mostly the 3 x 20 x 2 timed steps)::

        python bench/zero3_overhead.py
        python bench/zero3_overhead.py --json /tmp/zero3_overhead_cpu.json

    CUDA (one GPU per rank, NCCL, bf16, a larger model)::

        python bench/zero3_overhead.py --bf16 --hidden-size 2048 --layers 8 --intermediate-size 5504 --heads 16 \\
            --vocab-size 32000 --seq-len 1024 --batch-size 4 --steps 30 \\
            --export-large 16,8192,32000 --json /tmp/zero3_overhead_gpu.json
"""

from __future__ import annotations

import argparse
import gc
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import harness as h

EXPORT_TARGET = r"model\.layers\.[01]\.self_attn\.(q_proj|v_proj)"
SPARSE_LAMBDA = 1e-6
TARGET_RATIO = 1.05


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    h.model_args(p, "model (step bench)", hidden_size=128, layers=4, intermediate_size=344,
                 heads=(4, "attention heads (= key/value heads)"), vocab_size=512, seq_len=64,
                 batch_size=(4, "micro-batch per rank"))
    g = p.add_argument_group("adapters")
    g.add_argument("--rank", type=int, default=8, help="rank of both arms (lora_alpha = 2 * rank)")
    h.targets_arg(g)
    h.timing_args(p.add_argument_group("timing"), steps=20, warmup=3)
    g = p.add_argument_group("adapter save")
    g.add_argument("--export-small", default="2,256,256", metavar="L,I,V",
                   help="small base: layers,intermediate_size,vocab_size (hidden = --hidden-size)")
    g.add_argument("--export-large", default="8,8192,32000", metavar="L,I,V", help="large base, same format")
    g.add_argument("--export-repeats", type=int, default=15, help="timed exports per base size")
    g = p.add_argument_group("run")
    h.run_args(g, "nproc", "seed", "timeout", "json", "worker", "workdir")
    g.add_argument("--bf16", action="store_true", help="bf16 (CUDA only; CPU runs fp32)")
    g.add_argument("--prefetch-bucket-size", type=int, default=None, metavar="N",
                   help="stage3_prefetch_bucket_size (default: DeepSpeed's); 0 = fetch module by module")
    g.add_argument("--module-fetch-count", action=argparse.BooleanOptionalAction, default=True,
                   help="also count one step per arm with stage3_prefetch_bucket_size 0 (default: on)")
    args = p.parse_args(argv)
    h.split_targets(args)
    for key in ("export_small", "export_large"):
        flag = f"--{key.replace('_', '-')}"
        try:
            layers, inter, vocab = (int(x) for x in getattr(args, key).split(","))
        except ValueError:
            p.error(f"{flag} must be three integers L,I,V")
        if layers < 2:
            p.error(f"{flag}: the adapter targets layers 0 and 1, so L must be >= 2")
        setattr(args, key, (layers, inter, vocab))
    if args.steps < 1 or args.repeats < 1 or args.warmup < 0 or args.export_repeats < 1 or args.nproc < 1:
        p.error("--steps, --repeats, --export-repeats and --nproc must be >= 1, --warmup >= 0")
    return args


# ----------------------------------------------------------------------------------------------------------------
# worker phases (one rank each, started by torchrun)


def build_arms(args: argparse.Namespace, w, config: dict) -> tuple[h.Arm, h.Arm]:
    """SoRA and PEFT LoRA on the same base (built inside zero.Init under --seed), as ZeRO-3 engines."""
    import deepspeed

    def llama():
        return h.build_llama(args.hidden_size, args.layers, args.intermediate_size, args.heads, args.vocab_size,
                             args.seq_len, args.seed, ds_config=config)

    built = (h.sora_arm(llama(), args.rank, args.targets, args.seed, SPARSE_LAMBDA, gate_init="ones"),
             # autocast_adapter_dtype=False under --bf16: PEFT's adapters bf16 like SoRA's (fp32 runs unaffected)
             h.lora_arm(llama(), args.rank, args.targets, autocast_adapter_dtype=not w.bf16))
    arms = []
    for name, (model, opt, n_modules) in zip(("SoRA", "LoRA"), built):
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config)
        arms.append(h.Arm(name, engine, n_modules=n_modules, key=name, short=name,
                          n_groups=len(engine.optimizer.param_groups)))
    return arms[0], arms[1]


def sharding(sora: h.Arm, lora: h.Arm) -> tuple[dict, list, list]:
    """Elements held by this rank / full, and the partitioned trainable tensors of each arm."""
    import sora_ds

    sora_adapter = h.adapter_params(sora.model.module)
    lora_adapter = [p for p in lora.model.module.parameters() if p.requires_grad]
    return {
        "sora adapter": h.held(sora_adapter),
        "sora gates": h.held(sora_ds.gate_parameters(sora.model.module)),
        "lora adapter": h.held(lora_adapter),
        "frozen base": h.held([p for p in sora.model.module.parameters() if not p.requires_grad]),
    }, sora_adapter, lora_adapter


def print_header(args, w, config: dict, shard: dict, setup_s: float) -> None:
    import torch

    prefetch = config["zero_optimization"].get("stage3_prefetch_bucket_size", "DeepSpeed default")
    h.header("SoRA vs PEFT LoRA under DeepSpeed ZeRO-3", [
        ("device", h.rank_device_text(w, torch.get_num_threads())),
        ("versions", h.version_text(h.versions("torch", "deepspeed", "transformers", "peft", "sora_ds"), python=True)),
        ("model", f"Llama hidden {args.hidden_size}, layers {args.layers}, intermediate {args.intermediate_size}, "
                  f"heads {args.heads}, vocab {args.vocab_size}; {shard['frozen base'][1] / 1e6:.2f} M base params"),
        ("batch", f"{args.batch_size} x {args.seq_len} tokens per rank"),
        ("adapters", f"rank {args.rank}, alpha {2 * args.rank}, targets {','.join(args.targets)}; SoRA gate_init "
                     f"ones, sparse_lambda {SPARSE_LAMBDA:g} (lr_scaled), lr {h.LEARNING_RATE:g}"),
        ("ZeRO-3", f"stage3_param_persistence_threshold 0, stage3_prefetch_bucket_size {prefetch}; elements held by "
                   "rank 0 / full:"),
    ], say=w.say)
    h.print_shard(shard, 14, say=w.say)
    w.say(f"  timing   : {args.warmup} warm-up + {args.repeats} x {args.steps} timed steps per arm, interleaved "
          f"step by step, first arm alternating per repeat; setup {setup_s:.1f} s")


def scalar_allreduce_us(w) -> float:
    """Cost of one scalar all_reduce (what a 4-byte collective costs on this backend), median of 30."""
    import torch
    import torch.distributed as dist

    scalar, times = torch.zeros(1, device=w.device), []
    for _ in range(30):
        dist.barrier()
        w.sync()
        t0 = time.perf_counter()
        dist.all_reduce(scalar)
        w.sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def step_bench(args, w, config: dict, batch: dict) -> dict:
    """Parts 1 and 2: interleaved step time, collectives per step with call sites, sharding; figures for JSON."""
    import sora_ds

    t_setup = time.perf_counter()
    sora, lora = build_arms(args, w, config)
    setup_s = time.perf_counter() - t_setup
    shard, sora_adapter, lora_adapter = sharding(sora, lora)
    print_header(args, w, config, shard, setup_s)
    timing = h.ds_compare((sora, lora), batch, w, args, args.steps, "ratio sora/lora")
    r = timing["ratios"]["ratio sora/lora"]
    ar_us = scalar_allreduce_us(w)
    report = sora_ds.rank_report(sora.model.module)
    dead = sum(v["initial"] - v["kept"] for v in report.values())
    n_gates = sum(v["initial"] for v in report.values())
    say = w.say
    say()
    differ = h.print_collectives("collectives in the first timed step (rank 0)", (sora, lora),
                                 (sora.counted, lora.counted), say=say)
    h.print_step_totals((sora, lora), say=say)
    say(f"    optimizer param groups: SoRA {sora.n_groups}, LoRA {lora.n_groups}; one scalar all_reduce costs "
        f"{ar_us:.0f} us here (median of 30)")
    n_tr = [h.full_numel(p) for p in sora_adapter], [h.full_numel(p) for p in lora_adapter]
    mods = [list(a.model.module.modules()) for a in (sora, lora)]
    own = [sum(1 for m in v if next(m.parameters(recurse=False), None) is not None) for v in mods]
    say()
    h.row("", "SoRA", "LoRA", say=say)
    h.row("adapted modules", str(sora.n_modules), str(lora.n_modules), say=say)
    h.row("trainable params", *(f"{sum(n):,}" for n in n_tr), say=say,
          note=f"   (difference: {args.rank} x {sora.n_modules} gates = {args.rank * sora.n_modules:,})")
    h.row("partitioned trainable tensors", *(str(len(n)) for n in n_tr), say=say)
    h.row("modules (ZeRO-3 hooks each)", *(str(len(m)) for m in mods), say=say)
    h.row("  of which hold parameters", *(str(n) for n in own), say=say)
    h.row("first loss (must agree)", f"{sora.first_loss:.6f}", f"{lora.first_loss:.6f}", say=say)
    h.row("dead gate entries after bench", f"{dead} / {n_gates}", say=say)
    say(f"  timed section {timing['bench_s']:.1f} s")
    return {
        "sharding_rank0": {k: {"local": a, "full": b} for k, (a, b) in shard.items()},
        "step": {"sora": sora.stats, "lora": lora.stats, "ratio": r["median"], "per_repeat_ratio": r["per_repeat"],
                 "per_rank_median_ms": timing["medians"], "target_ratio": TARGET_RATIO,
                 "first_loss": {"sora": sora.first_loss, "lora": lora.first_loss},
                 "cpu_pressure": {"before": timing["pressure_before"], "after": timing["pressure_after"]}},
        "collectives": {"sora": h.counts_record(sora, sora.counted), "lora": h.counts_record(lora, lora.counted),
                        "differ": differ,
                        "per_step_total_range": {a.key: [min(a.step_totals), max(a.step_totals)] for a in (sora, lora)},
                        "sites": h.sites_record((sora, lora)), "scalar_allreduce_us": ar_us},
        "dead_gates": dead, "gate_entries": n_gates,
    }


def module_fetch_counts(args, w, batch: dict) -> dict:
    """Part 2b: the same models with stage3_prefetch_bucket_size 0, one counted (untimed) step per arm."""
    sora, lora = build_arms(args, w, h.ds_config(args.batch_size, w.bf16, 0))
    h.time_arms((sora, lora), max(args.warmup, 2), 0, 0, lambda arm: h.ds_step(arm, batch, w.sync))
    for arm in (sora, lora):
        h.ds_step(arm, batch, w.sync, trace=True)
    w.say()
    w.say("  same models with stage3_prefetch_bucket_size 0 (every module fetched on its own, as when the layers")
    w.say("  outgrow the prefetch bucket; untimed, one step per arm after warm-up):")
    h.print_collectives("collectives in one step (rank 0)", (sora, lora), (sora.counts, lora.counts), say=w.say)
    return {"sora": {"calls": sora.counts[0], "bytes": sora.counts[1]},
            "lora": {"calls": lora.counts[0], "bytes": lora.counts[1]}, "sites": h.sites_record((sora, lora))}


def export_arms(args, w, config: dict) -> list[h.Arm]:
    """Part 3 set-up: SoRA with identical adapters on a small and a large base, one training step each."""
    import deepspeed

    arms = []
    for label, (layers, inter, vocab) in (("small", args.export_small), ("large", args.export_large)):
        base = h.build_llama(args.hidden_size, layers, inter, args.heads, vocab, args.seq_len, args.seed,
                             ds_config=config)
        model, opt, n_mod = h.sora_arm(base, args.rank, EXPORT_TARGET, args.seed, SPARSE_LAMBDA, gate_init="ones")
        _, base_numel = h.held([p for p in model.parameters() if not p.requires_grad])
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config)
        on_rank0, full = h.held(h.adapter_params(engine.module))
        arms.append(h.Arm(label, engine, info={"layers": layers, "intermediate": inter, "vocab": vocab,
                                               "base_params": base_numel, "modules": n_mod, "adapter_params": full,
                                               "adapter_on_rank0": on_rank0}))
    for arm in arms:  # one training step, so B is non-zero in what is saved
        batch = h.random_batch(arm.info["vocab"], args.batch_size, args.seq_len, args.seed + 1 + w.rank, w.device)
        arm.model.backward(arm.model(**batch).loss)
        arm.model.step()
    return arms


def export_bench(args, w, config: dict) -> dict:
    """Part 3: export_peft time (sizes interleaved, after one untimed export each), collectives, bytes written."""
    import torch.distributed as dist

    import sora_ds

    workdir = Path(args.workdir or tempfile.gettempdir())
    arms = export_arms(args, w, config)

    def export(arm: h.Arm) -> float:
        dist.barrier()
        w.sync()
        h.COUNTER.reset()
        t0 = time.perf_counter()
        sora_ds.export_peft(arm.model.module, workdir / f"adapter_{arm.name}")
        dt = time.perf_counter() - t0
        arm.info.setdefault("collectives", dict(h.COUNTER.counts))  # those of the untimed first export
        return dt

    for arm in arms:  # untimed first export of each (imports, first allocations)
        export(arm)
    h.interleave(arms, args.export_repeats, 1, export)
    dist.barrier()
    for arm in arms:
        arm.info["times"] = [t for rep in arm.times for t in rep]
        arm.info["median_ms"] = statistics.median(arm.info["times"]) * 1e3
        arm.info["min_ms"] = min(arm.info["times"]) * 1e3
        if w.rank == 0:
            arm.info.update(written(workdir / f"adapter_{arm.name}"))
    return {arm.name: arm.info for arm in arms}


def written(out: Path) -> dict:
    """Bytes written (safetensors + config), tensors, empty tensors and elements of one saved adapter."""
    from safetensors import safe_open

    st, cfg = out / "adapter_model.safetensors", out / "adapter_config.json"
    with safe_open(str(st), "pt") as f:
        shapes = [tuple(f.get_slice(k).get_shape()) for k in f.keys()]
    return {"bytes": st.stat().st_size + cfg.stat().st_size, "tensors": len(shapes),
            "empty_tensors": sum(1 for sh in shapes if not sh or 0 in sh),
            "saved_elements": sum(math.prod(sh) for sh in shapes)}


def print_export(args, exp: dict, say=print) -> None:
    sm, lg = exp["small"], exp["large"]
    say()
    say(f"  adapter save: export_peft, target {EXPORT_TARGET}, rank {args.rank}, hidden {args.hidden_size};")
    say(f"  median of {args.export_repeats} per size, sizes interleaved, after one untimed export each")
    say(f"  {'base':<6}{'layers':>7}{'inter':>7}{'vocab':>7}{'base params':>13}{'fp32 MiB':>9}{'adapter':>9}"
        f"{'rank0':>7}{'saved':>7}{'tensors':>8}{'bytes':>9}{'med ms':>8}{'min ms':>8}{'colls':>6}")
    for label, e in exp.items():
        say(f"  {label:<6}{e['layers']:>7}{e['intermediate']:>7}{e['vocab']:>7}{e['base_params']:>13,}"
            f"{e['base_params'] * 4 / 2**20:>9.1f}{e['adapter_params']:>9,}{e['adapter_on_rank0']:>7,}"
            f"{e['saved_elements']:>7,}{e['tensors']:>8}{e['bytes']:>9,}{e['median_ms']:>8.2f}{e['min_ms']:>8.2f}"
            f"{sum(e['collectives'].values()):>6}")
    for label, e in exp.items():
        say(f"    {label}: collectives of one export: "
            + ", ".join(f"{k} {v}" for k, v in sorted(e["collectives"].items()))
            + (f"; EMPTY tensors written: {e['empty_tensors']}" if e["empty_tensors"] else "; no empty tensor"))
    say(f"    (adapter = full adapter elements incl. gates, rank0 = held by rank 0, saved = elements written; "
        f"base params large/small {lg['base_params'] / sm['base_params']:.0f}x; ratio of minimum save times "
        f"large/small {lg['min_ms'] / sm['min_ms']:.2f}, less sensitive to CPU contention)")


def print_summary(res: dict, say=print) -> None:
    st, c, sm, lg = res["step"], res["collectives"], res["export"]["small"], res["export"]["large"]
    sc, lc = c["sora"]["calls"], c["lora"]["calls"]
    say()
    say(f"device: {res['device']} ({'cuda' if res['cuda'] else 'cpu'}, {res['world_size']} ranks, {res['backend']}, "
        f"{res['dtype']}); torch {res['versions']['torch']}, deepspeed {res['versions']['deepspeed']}")
    say(f"step time: sora {st['sora']['median_ms']:.2f} ms, lora {st['lora']['median_ms']:.2f} ms (median of "
        f"{st['sora']['n_steps']} steps each)")
    say(f"step ratio sora/lora: {st['ratio']:.2f} (target <= {TARGET_RATIO})")
    say(f"collectives per step: sora {c['sora']['total']}, lora {c['lora']['total']} (target: equal)"
        + ("" if not c["differ"] else " -> differ in " + ", ".join(
            f"{op} {sc.get(op, 0)} vs {lc.get(op, 0)}" for op in c["differ"])))
    if res["collectives_prefetch0"]:
        f = res["collectives_prefetch0"]
        say(f"collectives per step, module-by-module fetch (prefetch bucket 0): sora "
            f"{sum(f['sora']['calls'].values())}, lora {sum(f['lora']['calls'].values())}")
    say(f"adapter save: small {sm['median_ms']:.1f} ms / {sm['bytes'] / 1000:.1f} KB, large "
        f"{lg['median_ms']:.1f} ms / {lg['bytes'] / 1000:.1f} KB -> time ratio {res['export_ratio']['time']:.2f}, "
        f"bytes ratio {res['export_ratio']['bytes']:.2f} (target: independent of base size; gathering the whole "
        f"large base would move {lg['base_params'] * 4 / 1e6:.1f} MB in fp32)")


def worker(args: argparse.Namespace) -> None:
    w = h.start_rank(args.bf16)  # counts collectives from here on
    import torch.distributed as dist
    from transformers.integrations import HfDeepSpeedConfig

    config = h.ds_config(args.batch_size, w.bf16, args.prefetch_bucket_size)
    dschf = HfDeepSpeedConfig(config)  # noqa: F841  (keeps transformers/PEFT ZeRO-3 aware, as under Trainer)
    batch = h.random_batch(args.vocab_size, args.batch_size, args.seq_len, args.seed + 1 + w.rank, w.device)
    res = {"device": h.device_name(w.cuda), "cuda": w.cuda, "world_size": w.world, "backend": w.backend,
           "dtype": "bf16" if w.bf16 else "fp32",
           "versions": h.versions("torch", "deepspeed", "transformers", "peft", "sora_ds"),
           "args": h.args_record(args), **step_bench(args, w, config, batch)}
    gc.collect()
    fetch = args.module_fetch_count and args.prefetch_bucket_size != 0
    res["collectives_prefetch0"] = module_fetch_counts(args, w, batch) if fetch else None
    gc.collect()
    res["export"] = exp = export_bench(args, w, config)
    if w.rank == 0:
        sm, lg = exp["small"], exp["large"]
        res["export_ratio"] = {"time": lg["median_ms"] / sm["median_ms"], "time_min": lg["min_ms"] / sm["min_ms"],
                               "bytes": lg["bytes"] / sm["bytes"]}
        print_export(args, exp)
        print_summary(res)
        h.hand_back(args, res)
    dist.barrier()
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    import torch

    if args.bf16 and not torch.cuda.is_available():
        print("note: --bf16 ignored on CPU (fp32)", flush=True)
    return h.launch_and_write(__file__, argv, args)


if __name__ == "__main__":
    sys.exit(main())
