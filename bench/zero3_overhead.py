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
import collections
import functools
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from _common import cpu_pressure, device_name, ds_worker, percentile

DEFAULT_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
EXPORT_TARGET = r"model\.layers\.[01]\.self_attn\.(q_proj|v_proj)"
LEARNING_RATE = 1e-4
SPARSE_LAMBDA = 1e-6
TARGET_RATIO = 1.05


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    g = p.add_argument_group("model (step bench)")
    g.add_argument("--hidden-size", type=int, default=128)
    g.add_argument("--layers", type=int, default=4)
    g.add_argument("--intermediate-size", type=int, default=344)
    g.add_argument("--heads", type=int, default=4, help="attention heads (= key/value heads)")
    g.add_argument("--vocab-size", type=int, default=512)
    g.add_argument("--seq-len", type=int, default=64)
    g.add_argument("--batch-size", type=int, default=4, help="micro-batch per rank")
    g = p.add_argument_group("adapters")
    g.add_argument("--rank", type=int, default=8, help="rank of both arms (lora_alpha = 2 * rank)")
    g.add_argument("--targets", default=DEFAULT_TARGETS, help="comma-separated module-name suffixes")
    g = p.add_argument_group("timing")
    g.add_argument("--steps", type=int, default=20, help="timed steps per arm per repeat")
    g.add_argument("--warmup", type=int, default=3, help="untimed steps per arm before the first repeat")
    g.add_argument("--repeats", type=int, default=3)
    g = p.add_argument_group("adapter save")
    g.add_argument("--export-small", default="2,256,256", metavar="L,I,V",
                   help="small base: layers,intermediate_size,vocab_size (hidden = --hidden-size)")
    g.add_argument("--export-large", default="8,8192,32000", metavar="L,I,V", help="large base, same format")
    g.add_argument("--export-repeats", type=int, default=15, help="timed exports per base size")
    g = p.add_argument_group("run")
    g.add_argument("--nproc", type=int, default=2, help="ranks (processes)")
    g.add_argument("--bf16", action="store_true", help="bf16 (CUDA only; CPU runs fp32)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--timeout", type=float, default=900, help="seconds before the launched ranks are killed")
    g.add_argument("--prefetch-bucket-size", type=int, default=None, metavar="N",
                   help="stage3_prefetch_bucket_size (default: DeepSpeed's); 0 = fetch module by module")
    g.add_argument("--module-fetch-count", action=argparse.BooleanOptionalAction, default=True,
                   help="also count one step per arm with stage3_prefetch_bucket_size 0 (default: on)")
    g.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the figures as JSON (rank 0)")
    g.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    g.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    for key in ("export_small", "export_large"):
        try:
            layers, inter, vocab = (int(x) for x in getattr(args, key).split(","))
        except ValueError:
            p.error(f"--{key.replace('_', '-')} must be three integers L,I,V")
        if layers < 2:
            p.error(f"--{key.replace('_', '-')}: the adapter targets layers 0 and 1, so L must be >= 2")
        setattr(args, key, (layers, inter, vocab))
    if args.steps < 1 or args.repeats < 1 or args.warmup < 0 or args.export_repeats < 1 or args.nproc < 1:
        p.error("--steps, --repeats, --export-repeats and --nproc must be >= 1, --warmup >= 0")
    return args


# ----------------------------------------------------------------------------------------------------------------
# launcher (no --worker)


def launch(argv: list[str], args: argparse.Namespace) -> int:
    import torch

    env = dict(os.environ)
    cuda = torch.cuda.is_available()
    if not cuda:
        env.setdefault("DS_ACCELERATOR", "cpu")
        if args.bf16:
            print("note: --bf16 ignored on CPU (fp32)", flush=True)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.nproc)))
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    with tempfile.TemporaryDirectory(prefix="zero3_overhead.") as workdir:
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.nproc),
            str(Path(__file__).resolve()), *argv, "--worker", "--workdir", workdir,
        ]
        proc = subprocess.Popen(cmd, env=env, start_new_session=True)
        try:
            return proc.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            print(f"zero3_overhead: ranks still running after {args.timeout:.0f} s; stopping them", file=sys.stderr)
            stop_tree(proc)
            return 124
        except KeyboardInterrupt:
            stop_tree(proc)
            return 130


def _descendants(pid: int) -> list[int]:
    """Child processes of ``pid``, recursively, read from /proc (torchrun puts its workers in their own sessions,
    so killing the launcher's process group does not reach them)."""
    children: dict[int, list[int]] = collections.defaultdict(list)
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                ppid = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children[ppid].append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def stop_tree(proc: subprocess.Popen) -> None:
    """SIGTERM torchrun (it stops its workers), then SIGKILL whatever of the tree is left after 10 s."""
    import signal

    tree = _descendants(proc.pid) if Path("/proc").is_dir() else []
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    for pid in tree:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


# ----------------------------------------------------------------------------------------------------------------
# collective counting: installed before deepspeed is imported

COLLECTIVES = (
    "all_reduce", "all_gather", "all_gather_into_tensor", "_all_gather_base", "reduce_scatter",
    "reduce_scatter_tensor", "_reduce_scatter_base", "broadcast", "barrier", "monitored_barrier",
    "all_to_all_single", "all_to_all", "all_gather_object", "broadcast_object_list", "gather_object",
    "scatter_object_list", "reduce", "gather", "scatter", "all_reduce_coalesced", "send", "recv", "isend", "irecv",
    "batch_isend_irecv",
)


class CollectiveCounter:
    """Counts outermost calls (and the bytes of each call's largest tensor buffer) per torch.distributed function."""

    def __init__(self) -> None:
        self.counts: collections.Counter = collections.Counter()
        self.bytes: collections.Counter = collections.Counter()
        self._depth = threading.local()
        self.patched: list[str] = []
        self.trace = False  # also record the issuing call site of every counted call
        self.sites: collections.Counter = collections.Counter()

    def reset(self) -> None:
        self.counts.clear()
        self.bytes.clear()
        self.sites.clear()

    @staticmethod
    def _call_site() -> str:
        """The innermost frames above torch.distributed and deepspeed.comm: who issued the collective."""
        import traceback

        frames = traceback.extract_stack()[:-3]
        keep = []
        for f in reversed(frames):
            path = f.filename.replace(os.sep, "/")
            if "/torch/distributed/" in path or "/deepspeed/comm/" in path or "/torch/_" in path:
                continue
            if "/torch/nn/modules/module.py" in path or "/torch/utils/" in path or path.endswith("zero3_overhead.py"):
                continue
            keep.append(f"{Path(f.filename).parent.name}/{Path(f.filename).name}:{f.lineno}:{f.name}")
            if len(keep) == 3:
                break
        return " < ".join(keep)

    def snapshot(self) -> tuple[dict, dict]:
        return dict(self.counts), dict(self.bytes)

    @staticmethod
    def _payload(args, kwargs) -> int:
        import torch

        best = 0
        for a in list(args) + list(kwargs.values()):
            if isinstance(a, torch.Tensor):
                best = max(best, a.numel() * a.element_size())
            elif isinstance(a, (list, tuple)) and a and all(isinstance(t, torch.Tensor) for t in a):
                best = max(best, sum(t.numel() * t.element_size() for t in a))
        return best

    def _wrap(self, name: str, fn):
        counter = self

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            depth = getattr(counter._depth, "d", 0)
            if depth == 0:
                counter.counts[name] += 1
                counter.bytes[name] += counter._payload(args, kwargs)
                if counter.trace:
                    counter.sites[(name, counter._call_site())] += 1
            counter._depth.d = depth + 1
            try:
                return fn(*args, **kwargs)
            finally:
                counter._depth.d = depth

        wrapper._zero3_bench_counted = True
        return wrapper

    def install(self) -> None:
        import torch.distributed as dist
        import torch.distributed.distributed_c10d as c10d

        for name in COLLECTIVES:
            fn = getattr(c10d, name, None) or getattr(dist, name, None)
            if fn is None or getattr(fn, "_zero3_bench_counted", False):
                continue
            wrapped = self._wrap(name, fn)
            for mod in (dist, c10d):  # one wrapper for both names: a call through either counts once
                if hasattr(mod, name):
                    setattr(mod, name, wrapped)
            self.patched.append(name)


COUNTER = CollectiveCounter()


# ----------------------------------------------------------------------------------------------------------------
# worker helpers








def full_numel(p) -> int:
    return p.ds_numel if hasattr(p, "ds_numel") else p.numel()


def local_numel(p) -> int:
    return p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel()


def ds_config_for(args: argparse.Namespace, bf16: bool, prefetch_bucket_size: int | None) -> dict:
    zero = {"stage": 3, "stage3_param_persistence_threshold": 0}
    if prefetch_bucket_size is not None:
        zero["stage3_prefetch_bucket_size"] = prefetch_bucket_size
    return {
        "train_micro_batch_size_per_gpu": args.batch_size,
        "gradient_accumulation_steps": 1,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": bf16},
        "fp16": {"enabled": False},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def build_llama(args, ds_config, layers: int, intermediate: int, vocab: int):
    import deepspeed
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=args.hidden_size,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=max(args.seq_len, 128),
        use_cache=False,
        tie_word_embeddings=False,
    )
    torch.manual_seed(args.seed)
    with deepspeed.zero.Init(config_dict_or_path=ds_config):
        model = LlamaForCausalLM(config)
    return model.train()


def sora_arm(model, targets, args):
    import sora_ds
    from sora_ds import SoRAConfig

    cfg = SoRAConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=targets, gate_init="ones",
                     init_seed=args.seed)
    adapted = sora_ds.inject(model, cfg)
    opt = sora_ds.build_optimizer(model, learning_rate=LEARNING_RATE, sparse_lambda=SPARSE_LAMBDA,
                                  threshold_mode="lr_scaled")
    return model, opt, len(adapted)


def lora_arm(model, targets, args, bf16: bool):
    import torch
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    cfg = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=targets, lora_dropout=0.0)
    # autocast_adapter_dtype=False under --bf16: keep PEFT's adapters bf16 like SoRA's (fp32 runs are unaffected).
    model = get_peft_model(model, cfg, autocast_adapter_dtype=not bf16)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LEARNING_RATE, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    return model, opt, sum(1 for m in model.modules() if isinstance(m, LoraLayer))


class Arm:
    def __init__(self, name: str, engine, n_modules: int) -> None:
        self.name, self.engine, self.n_modules = name, engine, n_modules
        self.times: list[list[float]] = []  # per repeat, seconds per step (rank 0's clock)
        self.step_totals: list[int] = []  # collectives of every timed step
        self.counted: tuple[dict, dict] | None = None  # (calls, bytes) per op of the counted timed step
        self.sites: dict = {}  # (op, call site) -> calls, from one untimed traced step
        self.first_loss: float | None = None
        self.n_groups = len(engine.optimizer.param_groups)


def worker(args: argparse.Namespace) -> None:
    COUNTER.install()  # before deepspeed binds torch.distributed functions

    import gc

    import torch

    w = ds_worker(args.bf16)
    cuda, bf16, rank, world, shm_skipped, say, sync = w.cuda, w.bf16, w.rank, w.world, w.shm_skipped, w.say, w.sync
    import deepspeed
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    import peft
    import transformers
    from transformers.integrations import HfDeepSpeedConfig

    import sora_ds
    from sora_ds.compact import adapter_tensors

    ds_config = ds_config_for(args, bf16, args.prefetch_bucket_size)
    dschf = HfDeepSpeedConfig(ds_config)  # noqa: F841  (keeps transformers/PEFT ZeRO-3 aware, as under Trainer)

    def build_arms(config: dict) -> tuple[Arm, Arm]:
        sizes = (args.layers, args.intermediate_size, args.vocab_size)
        targets = list(args.targets)
        s_model, s_opt, n_s = sora_arm(build_llama(args, config, *sizes), targets, args)
        l_model, l_opt, n_l = lora_arm(build_llama(args, config, *sizes), targets, args, bf16)
        s_engine, *_ = deepspeed.initialize(model=s_model, optimizer=s_opt, config=config)
        l_engine, *_ = deepspeed.initialize(model=l_model, optimizer=l_opt, config=config)
        return Arm("SoRA", s_engine, n_s), Arm("LoRA", l_engine, n_l)

    gen = torch.Generator().manual_seed(args.seed + 1 + rank)  # each rank its own micro-batch, as in DP
    device = get_accelerator().current_device_name()
    ids = torch.randint(0, args.vocab_size, (args.batch_size, args.seq_len), generator=gen).to(device)

    def step(arm: Arm, trace: bool = False) -> tuple[float, float, dict, dict]:
        """One step; returns (seconds on this rank, loss, calls per op, bytes per op)."""
        dist.barrier()  # outside the clock and outside the counted window
        sync()
        COUNTER.trace = trace
        COUNTER.reset()
        t0 = time.perf_counter()
        loss = arm.engine(input_ids=ids, labels=ids).loss
        arm.engine.backward(loss)
        arm.engine.step()
        sync()
        dt = time.perf_counter() - t0
        counts, nbytes = COUNTER.snapshot()
        if trace:
            arm.sites = dict(COUNTER.sites)
            COUNTER.trace = False
        return dt, float(loss.detach()), counts, nbytes

    # ------------------------------------------------------------------ 1 + 2: step time and collectives
    t_setup = time.perf_counter()
    sora, lora = build_arms(ds_config)
    setup_s = time.perf_counter() - t_setup
    n_base = sum(full_numel(p) for p in sora.engine.module.parameters() if not p.requires_grad)
    sora_adapter = adapter_tensors([m for _, m in sora_ds.sora_modules(sora.engine.module)])
    lora_adapter = [p for p in lora.engine.module.parameters() if p.requires_grad]

    def frac(params) -> tuple[int, int]:
        return sum(local_numel(p) for p in params), sum(full_numel(p) for p in params)

    shard = {
        "sora adapter": frac(sora_adapter),
        "sora gates": frac(sora_ds.gate_parameters(sora.engine.module)),
        "lora adapter": frac(lora_adapter),
        "frozen base": frac([p for p in sora.engine.module.parameters() if not p.requires_grad]),
    }
    prefetch = ds_config["zero_optimization"].get("stage3_prefetch_bucket_size", "DeepSpeed default")

    say("SoRA vs PEFT LoRA under DeepSpeed ZeRO-3")
    say(f"  device   : {'cuda' if cuda else 'cpu'} ({device_name(cuda)}), {world} ranks, backend "
        f"{dist.get_backend()}, {'bf16' if bf16 else 'fp32'}, torch threads/rank {torch.get_num_threads()}"
        + (", DeepSpeed shm op build skipped" if shm_skipped else ""))
    say(f"  versions : torch {torch.__version__}, deepspeed {deepspeed.__version__}, transformers "
        f"{transformers.__version__}, peft {peft.__version__}, sora_ds {sora_ds.__version__}, "
        f"python {platform.python_version()}")
    say(f"  model    : Llama hidden {args.hidden_size}, layers {args.layers}, intermediate {args.intermediate_size}, "
        f"heads {args.heads}, vocab {args.vocab_size}; {n_base / 1e6:.2f} M base params")
    say(f"  batch    : {args.batch_size} x {args.seq_len} tokens per rank")
    say(f"  adapters : rank {args.rank}, alpha {2 * args.rank}, targets {','.join(args.targets)}; SoRA gate_init "
        f"ones, sparse_lambda {SPARSE_LAMBDA:g} (lr_scaled), lr {LEARNING_RATE:g}")
    say(f"  ZeRO-3   : stage3_param_persistence_threshold 0, stage3_prefetch_bucket_size {prefetch}; "
        "elements held by rank 0 / full:")
    for key, (loc, tot) in shard.items():
        say(f"             {key:<14}{loc:>12,} / {tot:<12,} = {loc / max(tot, 1):.3f}")
    say(f"  timing   : {args.warmup} warm-up + {args.repeats} x {args.steps} timed steps per arm, interleaved "
        f"step by step, first arm alternating per repeat; setup {setup_s:.1f} s")

    for i in range(max(args.warmup, 1)):
        for arm in (sora, lora):
            _, loss, _, _ = step(arm)
            if i == 0:
                arm.first_loss = loss

    pressure_before = cpu_pressure()
    t_bench = time.perf_counter()
    for rep in range(args.repeats):
        order = (sora, lora) if rep % 2 == 0 else (lora, sora)
        for arm in order:
            arm.times.append([])
        for _ in range(args.steps):
            for arm in order:
                dt, _, counts, nbytes = step(arm)
                arm.times[-1].append(dt)
                arm.step_totals.append(sum(counts.values()))
                if arm.counted is None:
                    arm.counted = (counts, nbytes)  # exactly one timed step per arm
    bench_s = time.perf_counter() - t_bench
    pressure_after = cpu_pressure()

    for arm in (sora, lora):  # one more, untimed step per arm that records who issued each collective
        step(arm, trace=True)
    # Cost of one scalar all_reduce (what a 4-byte collective costs on this backend).
    scalar = torch.zeros(1, device=device)
    ar_times = []
    for _ in range(30):
        dist.barrier()
        sync()
        t0 = time.perf_counter()
        dist.all_reduce(scalar)
        sync()
        ar_times.append(time.perf_counter() - t0)
    scalar_allreduce_us = statistics.median(ar_times) * 1e6

    all_medians = [None] * world
    dist.all_gather_object(all_medians, {a.name: statistics.median([t for r in a.times for t in r]) * 1e3
                                         for a in (sora, lora)})
    report = sora_ds.rank_report(sora.engine.module)
    dead = sum(v["initial"] - v["kept"] for v in report.values())
    n_gate_entries = sum(v["initial"] for v in report.values())

    def stats(arm: Arm) -> dict:
        flat = [t for rep in arm.times for t in rep]
        return {
            "median_ms": statistics.median(flat) * 1e3,
            "p10_ms": percentile(flat, 10) * 1e3,
            "p90_ms": percentile(flat, 90) * 1e3,
            "min_ms": min(flat) * 1e3,
            "per_repeat_median_ms": [statistics.median(r) * 1e3 for r in arm.times],
            "n_steps": len(flat),
        }

    s, l_ = stats(sora), stats(lora)
    ratio = s["median_ms"] / l_["median_ms"]
    rep_ratios = [a / b for a, b in zip(s["per_repeat_median_ms"], l_["per_repeat_median_ms"])]
    say()
    say(f"  {'arm':<6}{'median ms':>11}{'p10 ms':>10}{'p90 ms':>10}{'min ms':>10}   per-repeat medians (ms)")
    for name, st in (("SoRA", s), ("LoRA", l_)):
        say(f"  {name:<6}{st['median_ms']:>11.2f}{st['p10_ms']:>10.2f}{st['p90_ms']:>10.2f}{st['min_ms']:>10.2f}   "
            + " ".join(f"{x:.2f}" for x in st["per_repeat_median_ms"]))
    say(f"  per-repeat ratio sora/lora: {' '.join(f'{r:.3f}' for r in rep_ratios)}; ratio of p10s "
        f"{s['p10_ms'] / l_['p10_ms']:.3f}, of minima {s['min_ms'] / l_['min_ms']:.3f}")
    say("  median step ms on each rank's clock (sora / lora): "
        + ", ".join(f"rank {i} {m['SoRA']:.2f} / {m['LoRA']:.2f}" for i, m in enumerate(all_medians)))
    if pressure_after:
        say("  host CPU pressure at end of timing (PSI some %, load): "
            + ", ".join(f"{k} {v:g}" for k, v in pressure_after.items()))
    if max(rep_ratios) - min(rep_ratios) > 0.05 or s["p90_ms"] > 1.5 * s["p10_ms"]:
        say("  NOTE: timings are noisy (per-repeat ratios spread > 0.05 or p90 > 1.5 x p10): other work is probably "
            "competing for the CPU; rerun on a quiet machine or with more --repeats.")

    def print_counts(title: str, a: Arm, b: Arm, ca: tuple[dict, dict], cb: tuple[dict, dict]) -> list[str]:
        (ac, ab), (bc, bb) = ca, cb
        ops = sorted(set(ac) | set(bc))
        say(f"  {title:<44}{'SoRA calls':>11}{'LoRA calls':>11}{'SoRA KiB':>11}{'LoRA KiB':>11}")
        for op in ops:
            say(f"    {op:<42}{ac.get(op, 0):>11}{bc.get(op, 0):>11}{ab.get(op, 0) / 1024:>11.1f}"
                f"{bb.get(op, 0) / 1024:>11.1f}")
        say(f"    {'total':<42}{sum(ac.values()):>11}{sum(bc.values()):>11}{sum(ab.values()) / 1024:>11.1f}"
            f"{sum(bb.values()) / 1024:>11.1f}")
        say("    (KiB: largest tensor buffer of each call, summed over calls)")
        for arm in (a, b):
            say(f"    {arm.name} call sites (calls, op, innermost DeepSpeed frames):")
            for (op, site), n in sorted(arm.sites.items()):
                say(f"      {n:>4}  {op:<24}{site}")
        return [op for op in ops if ac.get(op, 0) != bc.get(op, 0)]

    say()
    differ = print_counts("collectives in the first timed step (rank 0)", sora, lora, sora.counted, lora.counted)
    say(f"    per-step totals over all {len(sora.step_totals)} timed steps per arm: SoRA "
        f"{min(sora.step_totals)}..{max(sora.step_totals)}, LoRA {min(lora.step_totals)}..{max(lora.step_totals)}")
    say(f"    optimizer param groups: SoRA {sora.n_groups}, LoRA {lora.n_groups}; one scalar all_reduce costs "
        f"{scalar_allreduce_us:.0f} us here (median of 30)")

    n_sora_tr = sum(full_numel(p) for p in sora_adapter)
    n_lora_tr = sum(full_numel(p) for p in lora_adapter)
    say()
    say(f"  {'':<34}{'SoRA':>14}{'LoRA':>14}")
    say(f"  {'adapted modules':<34}{sora.n_modules:>14}{lora.n_modules:>14}")
    say(f"  {'trainable params':<34}{n_sora_tr:>14,}{n_lora_tr:>14,}   (difference: {args.rank} x "
        f"{sora.n_modules} gates = {args.rank * sora.n_modules:,})")
    say(f"  {'partitioned trainable tensors':<34}{len(sora_adapter):>14}{len(lora_adapter):>14}")
    mods = {a.name: list(a.engine.module.modules()) for a in (sora, lora)}
    own = {k: sum(1 for m in v if next(m.parameters(recurse=False), None) is not None) for k, v in mods.items()}
    say(f"  {'modules (ZeRO-3 hooks each)':<34}{len(mods['SoRA']):>14}{len(mods['LoRA']):>14}")
    say(f"  {'  of which hold parameters':<34}{own['SoRA']:>14}{own['LoRA']:>14}")
    say(f"  {'first loss (must agree)':<34}{sora.first_loss:>14.6f}{lora.first_loss:>14.6f}")
    say(f"  {'dead gate entries after bench':<34}{f'{dead} / {n_gate_entries}':>14}")
    say(f"  timed section {bench_s:.1f} s")
    main_counts = {"sora": sora.counted, "lora": lora.counted}
    first_losses = {"sora": sora.first_loss, "lora": lora.first_loss}
    main_sites = {a.name: {f"{op} @ {site}": n for (op, site), n in a.sites.items()} for a in (sora, lora)}
    step_ranges = {a.name: [min(a.step_totals), max(a.step_totals)] for a in (sora, lora)}
    del sora, lora
    gc.collect()

    # ------------------------------------------------------------------ 2b: module-by-module fetch (count only)
    fetch_counts = None
    if args.module_fetch_count and args.prefetch_bucket_size != 0:
        config0 = ds_config_for(args, bf16, 0)
        a0, b0 = build_arms(config0)
        for _ in range(max(args.warmup, 2)):
            for arm in (a0, b0):
                step(arm)
        c0 = {}
        for arm in (a0, b0):
            _, _, counts, nbytes = step(arm, trace=True)
            c0[arm.name] = (counts, nbytes)
        say()
        say("  same models with stage3_prefetch_bucket_size 0 (every module fetched on its own, as when the layers")
        say("  outgrow the prefetch bucket; untimed, one step per arm after warm-up):")
        print_counts("collectives in one step (rank 0)", a0, b0, c0["SoRA"], c0["LoRA"])
        fetch_counts = {"sora": c0["SoRA"], "lora": c0["LoRA"],
                        "sites": {a.name: {f"{op} @ {site}": n for (op, site), n in a.sites.items()}
                                  for a in (a0, b0)}}
        del a0, b0
        gc.collect()

    # ------------------------------------------------------------------ 3: adapter save, two base sizes
    workdir = Path(args.workdir or tempfile.gettempdir())
    exp = {}
    for label, (layers, inter, vocab) in (("small", args.export_small), ("large", args.export_large)):
        model, opt, n_mod = sora_arm(build_llama(args, ds_config, layers, inter, vocab), EXPORT_TARGET, args)
        base_numel = sum(full_numel(p) for p in model.parameters() if not p.requires_grad)
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config)
        adapter = adapter_tensors([m for _, m in sora_ds.sora_modules(engine.module)])
        exp[label] = {"engine": engine, "layers": layers, "intermediate": inter, "vocab": vocab,
                      "base_params": base_numel, "modules": n_mod,
                      "adapter_params": sum(full_numel(p) for p in adapter),
                      "adapter_on_rank0": sum(local_numel(p) for p in adapter), "times": []}
    ex_ids = {}
    for label, e in exp.items():  # one training step, so B is non-zero in what is saved
        g = torch.Generator().manual_seed(args.seed + 1 + rank)
        ex_ids[label] = torch.randint(0, e["vocab"], (args.batch_size, args.seq_len), generator=g).to(device)
        loss = e["engine"](input_ids=ex_ids[label], labels=ex_ids[label]).loss
        e["engine"].backward(loss)
        e["engine"].step()

    def export(label: str) -> tuple[float, dict, Path]:
        out = workdir / f"adapter_{label}"
        dist.barrier()
        sync()
        COUNTER.reset()
        t0 = time.perf_counter()
        sora_ds.export_peft(exp[label]["engine"].module, out)
        dt = time.perf_counter() - t0
        return dt, dict(COUNTER.counts), out

    for label, e in exp.items():  # untimed first export of each (imports, first allocations)
        _, e["collectives"], e["dir"] = export(label)
    for rep in range(args.export_repeats):
        for label in (("small", "large") if rep % 2 == 0 else ("large", "small")):
            exp[label]["times"].append(export(label)[0])
    dist.barrier()

    if rank == 0:
        from safetensors import safe_open

        for e in exp.values():
            st, cfg = e["dir"] / "adapter_model.safetensors", e["dir"] / "adapter_config.json"
            e["bytes"] = st.stat().st_size + cfg.stat().st_size
            with safe_open(str(st), "pt") as f:
                shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
            e["tensors"] = len(shapes)
            e["empty_tensors"] = sum(1 for sh in shapes.values() if not sh or 0 in sh)
            e["saved_elements"] = sum(math.prod(sh) for sh in shapes.values())
            e["median_ms"] = statistics.median(e["times"]) * 1e3
            e["min_ms"] = min(e["times"]) * 1e3
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

        # -------------------------------------------------------------- summary
        sc, sb = main_counts["sora"]
        lc, lb = main_counts["lora"]
        sc_tot, lc_tot = sum(sc.values()), sum(lc.values())
        t_ratio = lg["median_ms"] / sm["median_ms"]
        b_ratio = lg["bytes"] / sm["bytes"]
        say()
        say(f"device: {device_name(cuda)} ({'cuda' if cuda else 'cpu'}, {world} ranks, {dist.get_backend()}, "
            f"{'bf16' if bf16 else 'fp32'}); torch {torch.__version__}, deepspeed {deepspeed.__version__}")
        say(f"step time: sora {s['median_ms']:.2f} ms, lora {l_['median_ms']:.2f} ms (median of {s['n_steps']} "
            "steps each)")
        say(f"step ratio sora/lora: {ratio:.2f} (target <= {TARGET_RATIO})")
        say(f"collectives per step: sora {sc_tot}, lora {lc_tot} (target: equal)"
            + ("" if not differ else " -> differ in " + ", ".join(
                f"{op} {sc.get(op, 0)} vs {lc.get(op, 0)}" for op in differ)))
        if fetch_counts:
            f_s, f_l = sum(fetch_counts["sora"][0].values()), sum(fetch_counts["lora"][0].values())
            say(f"collectives per step, module-by-module fetch (prefetch bucket 0): sora {f_s}, lora {f_l}")
        say(f"adapter save: small {sm['median_ms']:.1f} ms / {sm['bytes'] / 1000:.1f} KB, large "
            f"{lg['median_ms']:.1f} ms / {lg['bytes'] / 1000:.1f} KB -> time ratio {t_ratio:.2f}, bytes ratio "
            f"{b_ratio:.2f} (target: independent of base size; gathering the whole large base would move "
            f"{lg['base_params'] * 4 / 1e6:.1f} MB in fp32)")

        if args.json:
            result = {
                "device": device_name(cuda), "cuda": cuda, "world_size": world, "backend": dist.get_backend(),
                "dtype": "bf16" if bf16 else "fp32",
                "versions": {"torch": torch.__version__, "deepspeed": deepspeed.__version__,
                             "transformers": transformers.__version__, "peft": peft.__version__,
                             "sora_ds": sora_ds.__version__},
                "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                         if k not in ("worker", "workdir")},
                "sharding_rank0": {k: {"local": a, "full": b} for k, (a, b) in shard.items()},
                "step": {"sora": s, "lora": l_, "ratio": ratio, "per_repeat_ratio": rep_ratios,
                         "per_rank_median_ms": all_medians, "target_ratio": TARGET_RATIO,
                         "first_loss": first_losses,
                         "cpu_pressure": {"before": pressure_before, "after": pressure_after}},
                "collectives": {"sora": {"calls": sc, "bytes": sb, "total": sc_tot},
                                "lora": {"calls": lc, "bytes": lb, "total": lc_tot},
                                "differ": differ, "per_step_total_range": step_ranges, "sites": main_sites,
                                "scalar_allreduce_us": scalar_allreduce_us},
                "collectives_prefetch0": fetch_counts and {
                    "sora": {"calls": fetch_counts["sora"][0], "bytes": fetch_counts["sora"][1]},
                    "lora": {"calls": fetch_counts["lora"][0], "bytes": fetch_counts["lora"][1]},
                    "sites": fetch_counts["sites"]},
                "dead_gates": dead, "gate_entries": n_gate_entries,
                "export": {k: {kk: vv for kk, vv in e.items() if kk not in ("engine", "dir")} for k, e in exp.items()},
                "export_ratio": {"time": t_ratio, "time_min": lg["min_ms"] / sm["min_ms"], "bytes": b_ratio},
            }
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(result, indent=2, default=str))
            say(f"wrote {args.json}")
    dist.barrier()
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.worker:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
        worker(args)
        return 0
    return launch(argv, args)


if __name__ == "__main__":
    sys.exit(main())
