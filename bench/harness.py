"""The one harness of the bench scripts (run as `python bench/<script>.py`, so this folder is on sys.path).

Holds what the scripts share: the environment / version record and JSON output; Llama models built from a
``LlamaConfig``; the SoRA and PEFT LoRA arms; interleaved timing of arms; the statistics (median, p10/p90, minimum,
per-repeat medians and ratios) and the noise notes; rank launching (torchrun, gloo on CPU, NCCL on GPU) and the
per-rank set-up; collective counting. No bench script imports another.
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # run from a checkout without installing

DEFAULT_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
LEARNING_RATE = 1e-4
NOISE_NOTE = ("  NOTE: timings are noisy (per-repeat ratios spread > 0.05 or p90 > 1.5 x p10): other work is probably "
              "competing for the CPU/GPU; rerun on a quiet machine, with more --repeats, or compare the p10 ratios.")


# ----------------------------------------------------------------------------------------------------------------
# environment, versions, JSON


def device_name(cuda: bool) -> str:
    """The GPU's name, or the CPU model from /proc/cpuinfo."""
    if cuda:
        import torch

        return torch.cuda.get_device_name()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_pressure() -> dict | None:
    """Linux PSI for the CPU (``some avg10/avg60``, in %) and the 1-minute load: how much other work competed."""
    try:
        fields = Path("/proc/pressure/cpu").read_text().splitlines()[0].split()[1:]
        psi = {k: float(v) for k, v in (f.split("=") for f in fields) if k.startswith("avg")}
    except (OSError, IndexError, ValueError):
        psi = {}
    try:
        psi["loadavg1"] = os.getloadavg()[0]
    except OSError:
        pass
    return psi or None


def versions(*packages: str) -> dict:
    """``{package: __version__}`` in the order given."""
    import importlib

    return {name: importlib.import_module(name).__version__ for name in packages}


def version_text(vers: dict, python: bool = False) -> str:
    return ", ".join(f"{k} {v}" for k, v in vers.items()) + (f", python {platform.python_version()}" if python else "")


def header(title: str, rows: list[tuple[str, str]], say=print) -> None:
    """The banner every script starts with: a title, then ``  key      : value`` lines."""
    say(title)
    for key, value in rows:
        say(f"  {key:<9}: {value}")


def args_record(args: argparse.Namespace, drop: tuple[str, ...] = ("worker", "workdir")) -> dict:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in drop}


def write_json(path: Path | None, result: dict, say=print) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    say(f"wrote {path}")


def torch_device(name: str, threads: int | None):
    """``torch.device(name)`` after ``set_num_threads``; exits when CUDA is asked for but absent."""
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda given but torch.cuda.is_available() is False")
    return device


def device_sync(device):
    """A no-argument synchronise for ``device`` (a no-op off CUDA)."""
    import torch

    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)


# ----------------------------------------------------------------------------------------------------------------
# command line


def model_args(p: argparse.ArgumentParser, title: str, prefix: str = "", **defaults) -> None:
    """An argument group ``--{prefix}{name}`` per keyword (``hidden_size=256`` -> ``--hidden-size``); a value may be
    ``(default, help)``."""
    g = p.add_argument_group(title)
    for key, value in defaults.items():
        default, help_ = value if isinstance(value, tuple) else (value, None)
        g.add_argument(f"--{prefix}{key.replace('_', '-')}", type=int, default=default, help=help_)


def timing_args(g, steps: int, warmup: int, repeats: int = 3, warmup_help: str = "") -> None:
    g.add_argument("--steps", type=int, default=steps, help="timed steps per arm per repeat")
    g.add_argument("--warmup", type=int, default=warmup,
                   help=f"untimed steps per arm before the first repeat{warmup_help}")
    g.add_argument("--repeats", type=int, default=repeats)


RUN_ARGS = {
    "device": dict(default="cpu", help="cpu, cuda, cuda:1, ..."),
    "dtype": dict(choices=("fp32", "bf16"), default="fp32"),
    "nproc": dict(type=int, default=2, help="ranks (processes)"),
    "seed": dict(type=int, default=0),
    "threads": dict(type=int, default=None, help="torch.set_num_threads (default: torch's default)"),
    "timeout": dict(type=float, default=900, help="seconds before the launched ranks are killed"),
    "json": dict(type=Path, default=None, metavar="PATH", help="also write the figures as JSON"),
    "worker": dict(action="store_true", help=argparse.SUPPRESS),
    "workdir": dict(default=None, help=argparse.SUPPRESS),
}


def run_args(g, *names: str, **help_: str) -> None:
    """The ``--name`` options of :data:`RUN_ARGS`, in the order given; ``name="..."`` overrides a help text."""
    for name in names:
        g.add_argument(f"--{name}", **{**RUN_ARGS[name], **({"help": help_[name]} if name in help_ else {})})


def targets_arg(g) -> None:
    g.add_argument("--targets", default=DEFAULT_TARGETS, help="comma-separated module-name suffixes")


def split_targets(args: argparse.Namespace) -> None:
    args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]


# ----------------------------------------------------------------------------------------------------------------
# models and arms


def build_llama(hidden: int, layers: int, intermediate: int, heads: int, vocab: int, seq_len: int, seed: int,
                kv_heads: int | None = None, ds_config: dict | None = None):
    """A ``LlamaForCausalLM`` from a ``LlamaConfig`` (nothing downloaded), initialised under ``seed``, in train
    mode; inside ``deepspeed.zero.Init`` when ``ds_config`` is given."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads or heads, max_position_embeddings=max(seq_len, 128),
        use_cache=False, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    if ds_config is None:
        return LlamaForCausalLM(config).train()
    import deepspeed

    with deepspeed.zero.Init(config_dict_or_path=ds_config):
        model = LlamaForCausalLM(config)
    return model.train()


def random_batch(vocab: int, batch: int, seq: int, seed: int, device) -> dict:
    """A fixed random batch, ``labels = input_ids``, from its own generator seeded ``seed``."""
    import torch

    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed)).to(device)
    return {"input_ids": ids, "labels": ids}


def trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def adamw(model, lr: float = LEARNING_RATE):
    """torch's AdamW over the trainable parameters; weight decay 0 (torch's default 0.01 would add work)."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)


def sora_arm(model, rank: int, targets, seed: int, sparse_lambda: float, **config):
    """``inject(SoRAConfig(r, 2r, targets, init_seed=seed, **config))`` + ``build_optimizer`` (lr 1e-4, lr-scaled
    threshold): (model, optimizer, adapted modules)."""
    import sora_ds

    targets = targets if isinstance(targets, str) else list(targets)  # a str is one regex
    cfg = sora_ds.SoRAConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, init_seed=seed, **config)
    adapted = sora_ds.inject(model, cfg)
    opt = sora_ds.build_optimizer(model, learning_rate=LEARNING_RATE, sparse_lambda=sparse_lambda,
                                  threshold_mode="lr_scaled")
    return model, opt, len(adapted)


def lora_arm(model, rank: int, targets, autocast_adapter_dtype: bool = True, lora_alpha: float | None = None):
    """PEFT ``LoraConfig(r, 2r, targets, lora_dropout=0)`` + :func:`adamw`: (model, optimizer, adapted modules)."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=rank, lora_alpha=lora_alpha or 2 * rank, target_modules=list(targets), lora_dropout=0.0)
    model = get_peft_model(model, cfg, autocast_adapter_dtype=autocast_adapter_dtype)
    return model, adamw(model), len(peft_lora_layers(model))


def adapter_layers(model) -> list:
    """sora-ds's adapted layers of ``model``: (name, layer) pairs."""
    import sora_ds

    return list(sora_ds.adapter_layers(model))


def adapter_params(model) -> list:
    """Every adapter tensor (A, B, gate) of sora-ds's adapted layers of ``model``."""
    from sora_ds.adapters.compact import adapter_tensors

    return adapter_tensors([m for _, m in adapter_layers(model)])


def peft_lora_layers(model) -> list:
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


# ----------------------------------------------------------------------------------------------------------------
# interleaved timing


class Arm:
    """One arm of a comparison: a model (or DeepSpeed engine) and its optimizer, and what timing records."""

    def __init__(self, name: str, model, opt=None, n_modules: int = 0, penalty=None, after_step=None, **extra):
        self.name, self.model, self.opt, self.n_modules = name, model, opt, n_modules
        self.penalty = penalty  # penalty(module) added to the language-model loss
        self.after_step = after_step  # after_step(arm) right after opt.step()
        self.times: list[list[float]] = []  # per repeat, seconds per step
        self.phase_times: dict[str, list[float]] = {"forward": [], "backward": [], "optimizer": []}
        self.t = 0  # optimizer steps taken (1-based in the step that takes it)
        self.loss = self.lm_loss = self.first_loss = self.first_lm_loss = None
        self.counted = None  # ZeRO-3: (calls, bytes) per op of the first timed step
        self.step_totals: list[int] = []  # ZeRO-3: collectives of every timed step
        self.sites: dict = {}  # ZeRO-3: (op, call site) -> calls, from one traced step
        self.__dict__.update(extra)


def train_step(arm: Arm, batch: dict, sync, phases: bool = False) -> float:
    """One step (forward with labels (+ penalty), backward, ``opt.step()``, ``after_step``, ``zero_grad``); returns
    seconds. ``sync`` runs before and after (and between phases with ``phases``); losses are read after the clock."""
    sync()
    t0 = time.perf_counter()
    arm.t += 1
    lm = arm.model(**batch).loss
    loss = lm + arm.penalty(arm.model) if arm.penalty else lm
    if phases:
        sync()
        t1 = time.perf_counter()
    loss.backward()
    if phases:
        sync()
        t2 = time.perf_counter()
    arm.opt.step()
    if arm.after_step:
        arm.after_step(arm)
    arm.opt.zero_grad(set_to_none=True)
    sync()
    t3 = time.perf_counter()
    if phases:
        for key, dt in zip(arm.phase_times, (t1 - t0, t2 - t1, t3 - t2)):
            arm.phase_times[key].append(dt)
    arm.loss, arm.lm_loss = float(loss.detach()), float(lm.detach())
    return t3 - t0


def time_arms(arms, warmup: int, repeats: int, steps: int, step, timed_step=None, timers=()) -> dict:
    """``warmup`` untimed steps per arm, interleaved (the first step's losses are kept: identical-start checks); then
    :func:`interleave` with ``timed_step`` (default ``step``), the ``timers`` enabled during it and uninstalled
    after."""
    for i in range(warmup):
        for arm in arms:
            step(arm)
            if i == 0:
                arm.first_loss, arm.first_lm_loss = arm.loss, arm.lm_loss
    for timer in timers:
        timer.enabled = True
    timing = interleave(arms, repeats, steps, timed_step or step)
    for timer in timers:
        timer.uninstall()
    return timing


def interleave(arms, repeats: int, steps: int, step) -> dict:
    """Timing interleaved step by step: within a repeat the arms alternate A B C A B C ..., and the arm that goes
    first rotates between repeats (for two: alternates). ``step(arm)`` returns seconds. Returns the section's wall
    time and the CPU pressure before / after."""
    arms = list(arms)
    pressure_before = cpu_pressure()
    t0 = time.perf_counter()
    for rep in range(repeats):
        order = arms[rep % len(arms):] + arms[:rep % len(arms)]
        for arm in order:
            arm.times.append([])
        for _ in range(steps):
            for arm in order:
                arm.times[-1].append(step(arm))
    return {"bench_s": time.perf_counter() - t0, "pressure_before": pressure_before, "pressure_after": cpu_pressure()}


# ----------------------------------------------------------------------------------------------------------------
# statistics and their printing


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolation percentile (q in [0, 100])."""
    xs = sorted(values)
    if len(xs) == 1:
        return xs[0]
    pos = (len(xs) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(times: list[list[float]]) -> dict:
    """Over all timed steps of all repeats: median, p10, p90, min, mean (ms), per-repeat medians, step count."""
    flat = [t for rep in times for t in rep]
    return {
        "median_ms": statistics.median(flat) * 1e3,
        "p10_ms": percentile(flat, 10) * 1e3,
        "p90_ms": percentile(flat, 90) * 1e3,
        "min_ms": min(flat) * 1e3,
        "mean_ms": statistics.fmean(flat) * 1e3,
        "per_repeat_median_ms": [statistics.median(rep) * 1e3 for rep in times],
        "n_steps": len(flat),
    }


def ratios(a: dict, b: dict) -> dict:
    """a / b of the medians, p10s, minima, and of the medians within each repeat."""
    per_rep = [x / y for x, y in zip(a["per_repeat_median_ms"], b["per_repeat_median_ms"])]
    return {"median": a["median_ms"] / b["median_ms"], "p10": a["p10_ms"] / b["p10_ms"],
            "min": a["min_ms"] / b["min_ms"], "per_repeat": per_rep}


def noisy(rs: list[dict], stats: list[dict]) -> bool:
    """Per-repeat ratios spread > 0.05, or p90 > 1.5 x p10."""
    spread = any(max(r["per_repeat"]) - min(r["per_repeat"]) > 0.05 for r in rs)
    return spread or any(s["p90_ms"] > 1.5 * s["p10_ms"] for s in stats)


def report_times(arms, timing: dict, pairs, noisy_stats=1, width: int = 6, digits: int = 2, say=print) -> dict:
    """Summarise each arm (``arm.stats``), print the times table, the ratio of each ``(label, a, b)`` pair and the
    noise notes (noisy: per-repeat ratios of the first arm spread > 0.05, or p90 > 1.5 x p10 in one of the first
    ``noisy_stats`` arms). Returns ``{label: ratios}`` and ``noisy``."""
    for arm in arms:
        arm.stats = summarize(arm.times)
    say()
    print_times([(arm.name, arm.stats) for arm in arms], width, digits, say)
    rs = {label: ratios(a.stats, b.stats) for label, a, b in pairs}
    for label, r in rs.items():
        print_ratio(label, r, max(len(label) for label in rs), say)
    if "medians" in timing:
        print_rank_medians(" / ".join(a.name for a in arms), timing["medians"], say)
    first = [r for (_, a, _), r in zip(pairs, rs.values()) if a is arms[0]]
    is_noisy = noisy(first, [a.stats for a in arms[:noisy_stats]])
    print_noise(is_noisy, timing, say)
    return {"ratios": rs, "noisy": is_noisy}


def print_times(rows: list[tuple[str, dict]], width: int = 6, digits: int = 2, say=print) -> None:
    say(f"  {'arm':<{width}}{'median ms':>11}{'p10 ms':>10}{'p90 ms':>10}{'min ms':>10}   per-repeat medians (ms)")
    for name, s in rows:
        say(f"  {name:<{width}}{s['median_ms']:>11.{digits}f}{s['p10_ms']:>10.{digits}f}{s['p90_ms']:>10.{digits}f}"
            f"{s['min_ms']:>10.{digits}f}   " + " ".join(f"{x:.{digits}f}" for x in s["per_repeat_median_ms"]))


def print_ratio(label: str, r: dict, width: int = 31, say=print) -> None:
    pr = r["per_repeat"]
    say(f"  {label:<{width}} median {r['median']:.3f}; per repeat {' '.join(f'{x:.3f}' for x in pr)} "
        f"(min {min(pr):.3f}, max {max(pr):.3f}); p10s {r['p10']:.3f}, minima {r['min']:.3f}")


def pressure_text(p: dict | None) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in (p or {}).items())


def print_noise(is_noisy: bool, timing: dict, say=print) -> None:
    """The host's CPU pressure at the end of timing, and the NOTE when the timings look noisy."""
    if timing["pressure_after"]:
        say(f"  host CPU pressure (PSI some %, load): start {pressure_text(timing['pressure_before'])}; end of timing "
            f"{pressure_text(timing['pressure_after'])}")
    if is_noisy:
        say(NOISE_NOTE)


def row(label: str, *cells, width: int = 34, cell: int | tuple = 14, note: str = "", say=print) -> None:
    """One line of a side-by-side table: a label, right-aligned cells (strings), a trailing note."""
    widths = cell if isinstance(cell, tuple) else (cell,) * len(cells)
    say((f"  {label:<{width}}" + "".join(f"{c:>{w}}" for c, w in zip(cells, widths)) + note).rstrip())


def verdict(ratio: float, target: float, strict: bool = False) -> str:
    ok = ratio < target if strict else ratio <= target
    return "PASS" if ok else ("NOT FASTER" if strict else "ABOVE TARGET")


# ----------------------------------------------------------------------------------------------------------------
# ranks: launcher (torchrun on the calling script) and per-rank set-up


def launch_and_write(script: str, argv: list[str], args) -> int:
    """:func:`launch_ranks` with ``args.nproc`` and ``args.timeout``, then rank 0's figures to ``args.json``; the
    parent process's whole job in a distributed bench."""
    rc, result = launch_ranks(script, argv, args.nproc, args.timeout)
    if result is not None:
        write_json(args.json, result)
    return rc


def launch_ranks(script: str, argv: list[str], nproc: int, timeout: float) -> tuple[int, dict | None]:
    """``torchrun --standalone --nproc_per_node nproc script *argv --worker --workdir DIR`` (``DS_ACCELERATOR=cpu``
    without CUDA, ``OMP_NUM_THREADS`` = cores / ranks unless set), bounded by ``timeout``. Returns the exit status
    and what rank 0 wrote with :func:`hand_back` (None if nothing)."""
    import torch

    env = dict(os.environ)
    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    name = Path(script).stem
    with tempfile.TemporaryDirectory(prefix=f"{name}.") as workdir:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               str(Path(script).resolve()), *argv, "--worker", "--workdir", workdir]
        proc = subprocess.Popen(cmd, env=env, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            print(f"{name}: ranks still running after {timeout:.0f} s; stopping them", file=sys.stderr)
            stop_tree(proc)
            return 124, None
        except KeyboardInterrupt:
            stop_tree(proc)
            return 130, None
        out = Path(workdir) / "result.json"
        return rc, (json.loads(out.read_text()) if out.exists() else None)


def hand_back(args: argparse.Namespace, result: dict) -> None:
    """Rank 0's figures, for :func:`launch_ranks` to return."""
    (Path(args.workdir) / "result.json").write_text(json.dumps(result, default=str))


def _descendants(pid: int) -> list[int]:
    """Child processes of ``pid``, recursively, read from /proc (torchrun puts its workers in their own sessions,
    so killing the launcher's process group does not reach them)."""
    children: dict[int, list[int]] = collections.defaultdict(list)
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
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


def start_rank(want_bf16: bool):
    """Set up one rank started by torchrun: collective counting (before deepspeed binds torch.distributed), device,
    threads, process group (NCCL on GPU, gloo on CPU, where DeepSpeed's shared-memory op, unused here, is not
    JIT-built: ~40 s). Returns cuda, bf16, rank, world, backend, device, shm_skipped, and rank-0 ``say`` / device
    ``sync`` helpers."""
    import importlib
    import logging
    import types
    import warnings

    COUNTER.install()
    import torch

    warnings.filterwarnings("ignore")
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

    import deepspeed

    shm_skipped = False
    if not cuda:
        comm_torch = importlib.import_module("deepspeed.comm.torch")  # the module, not the torch package
        if hasattr(comm_torch, "build_shm_op"):
            comm_torch.build_shm_op = lambda: None
            shm_skipped = True
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    deepspeed.utils.logger.setLevel(logging.ERROR)
    rank = dist.get_rank()

    def say(*a, **k):
        if rank == 0:
            print(*a, **k, flush=True)

    def sync():
        if cuda:
            get_accelerator().synchronize()

    return types.SimpleNamespace(cuda=cuda, bf16=bool(want_bf16 and cuda), rank=rank, world=dist.get_world_size(),
                                 backend=dist.get_backend(), device=get_accelerator().current_device_name(),
                                 shm_skipped=shm_skipped, say=say, sync=sync)


def rank_device_text(w, threads: int) -> str:
    return (f"{'cuda' if w.cuda else 'cpu'} ({device_name(w.cuda)}), {w.world} ranks, backend {w.backend}, "
            f"{'bf16' if w.bf16 else 'fp32'}, torch threads/rank {threads}"
            + (", DeepSpeed shm op build skipped" if w.shm_skipped else ""))


def ds_config(batch_size: int, bf16: bool, prefetch_bucket_size: int | None = None) -> dict:
    """ZeRO-3 with ``stage3_param_persistence_threshold: 0``: adapters and gates really are partitioned."""
    zero = {"stage": 3, "stage3_param_persistence_threshold": 0}
    if prefetch_bucket_size is not None:
        zero["stage3_prefetch_bucket_size"] = prefetch_bucket_size
    return {
        "train_micro_batch_size_per_gpu": batch_size, "gradient_accumulation_steps": 1, "zero_optimization": zero,
        "zero_allow_untested_optimizer": True, "bf16": {"enabled": bf16}, "fp16": {"enabled": False},
        "steps_per_print": 10**9, "wall_clock_breakdown": False,
    }


def full_numel(p) -> int:
    return p.ds_numel if hasattr(p, "ds_numel") else p.numel()


def local_numel(p) -> int:
    return p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel()


def held(params) -> tuple[int, int]:
    """(elements held by this rank, full elements) of ``params``."""
    return sum(local_numel(p) for p in params), sum(full_numel(p) for p in params)


def print_shard(shard: dict, width: int, say=print) -> None:
    for key, (loc, tot) in shard.items():
        say(f"             {key:<{width}}{loc:>12,} / {tot:<12,} = {loc / max(tot, 1):.3f}")


def ds_step(arm: Arm, batch: dict, sync, trace: bool = False, timed: bool = False) -> float:
    """One ZeRO-3 step ``engine(**batch).loss (+ penalty(engine.module)); engine.backward; engine.step``, after a
    barrier (outside the clock and the counted window); returns seconds on this rank. Collectives are counted into
    ``arm.counts``; ``timed`` records them (per-step total, and the calls of the first timed step), ``trace`` records
    the call sites."""
    import torch.distributed as dist

    dist.barrier()
    sync()
    COUNTER.trace = trace
    COUNTER.reset()
    t0 = time.perf_counter()
    lm = arm.model(**batch).loss
    loss = lm + arm.penalty(arm.model.module) if arm.penalty else lm
    arm.model.backward(loss)
    arm.model.step()
    sync()
    dt = time.perf_counter() - t0
    arm.counts = COUNTER.snapshot()
    if trace:
        arm.sites = dict(COUNTER.sites)
        COUNTER.trace = False
    if timed:
        arm.step_totals.append(sum(arm.counts[0].values()))
        if arm.counted is None:
            arm.counted = arm.counts  # exactly one timed step per arm
    arm.loss, arm.lm_loss = float(loss.detach()), float(lm.detach())
    return dt


def ds_compare(arms, batch: dict, w, args, steps: int, label: str, timers=(), noisy_stats: int = 1) -> dict:
    """Two ZeRO-3 arms: ``args.warmup`` untimed steps, interleaved timed steps (collectives counted), one traced step
    per arm, the medians on every rank's clock; printed (rank 0) and returned as in :func:`report_times`."""
    timing = time_arms(arms, max(args.warmup, 1), args.repeats, steps, lambda a: ds_step(a, batch, w.sync),
                       lambda a: ds_step(a, batch, w.sync, timed=True), timers)
    for arm in arms:  # one more, untimed step per arm that records who issued each collective
        ds_step(arm, batch, w.sync, trace=True)
    timing["medians"] = rank_medians(arms)
    return {**timing, **report_times(arms, timing, [(label, *arms)], noisy_stats, width=len(arms[0].name) + 2,
                                     say=w.say)}


def rank_medians(arms) -> list[dict]:
    """The median step (ms) of each arm on every rank's clock."""
    import torch.distributed as dist

    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, {a.key: statistics.median([t for r in a.times for t in r]) * 1e3 for a in arms})
    return out


def print_rank_medians(label: str, medians: list[dict], say=print) -> None:
    say(f"  median step ms on each rank's clock ({label}): "
        + ", ".join(f"rank {i} " + " / ".join(f"{v:.2f}" for v in m.values()) for i, m in enumerate(medians)))


def print_collectives(title: str, arms, counted, site_note: str = "", say=print) -> list[str]:
    """Calls and KiB per op of each arm, then the call sites of each; returns the ops whose counts differ."""
    (ac, ab), (bc, bb) = counted
    a, b = arms
    ops = sorted(set(ac) | set(bc))
    say(f"  {title:<46}{a.short + ' calls':>14}{b.short + ' calls':>12}{a.short + ' KiB':>14}{b.short + ' KiB':>10}")
    for op, c1, c2, b1, b2 in [(op, ac.get(op, 0), bc.get(op, 0), ab.get(op, 0), bb.get(op, 0)) for op in ops] + [
            ("total", sum(ac.values()), sum(bc.values()), sum(ab.values()), sum(bb.values()))]:
        say(f"    {op:<44}{c1:>14}{c2:>12}{b1 / 1024:>14.1f}{b2 / 1024:>10.1f}")
    say("    (KiB: largest tensor buffer of each call, summed over calls)")
    for arm in arms:
        say(f"    {arm.name} call sites (calls, op, innermost DeepSpeed / sora-ds frames{site_note}):")
        for (op, site), n in sorted(arm.sites.items()):
            say(f"      {n:>4}  {op:<24}{site}")
    return [op for op in ops if ac.get(op, 0) != bc.get(op, 0)]


def print_step_totals(arms, say=print) -> None:
    say(f"    per-step totals over all {len(arms[0].step_totals)} timed steps per arm: " + ", ".join(
        f"{x.short} {min(x.step_totals)}..{max(x.step_totals)}" for x in arms))


def counts_record(arm: Arm, counted) -> dict:
    calls, nbytes = counted
    return {"calls": calls, "bytes": nbytes, "total": sum(calls.values())}


def sites_record(arms) -> dict:
    return {a.key: {f"{op} @ {site}": n for (op, site), n in a.sites.items()} for a in arms}


# ----------------------------------------------------------------------------------------------------------------
# collective counting: installed before deepspeed is imported

COLLECTIVES = (
    "all_reduce", "all_gather", "all_gather_into_tensor", "_all_gather_base", "reduce_scatter",
    "reduce_scatter_tensor", "_reduce_scatter_base", "broadcast", "barrier", "monitored_barrier",
    "all_to_all_single", "all_to_all", "all_gather_object", "broadcast_object_list", "gather_object",
    "scatter_object_list", "reduce", "gather", "scatter", "all_reduce_coalesced", "send", "recv", "isend", "irecv",
    "batch_isend_irecv",
    "all_gather_single", "reduce_scatter_single",  # FSDP2's (torch >= 2.13)
)


class CollectiveCounter:
    """Counts outermost calls (and the bytes of each call's largest tensor buffer) per torch.distributed function."""

    def __init__(self) -> None:
        self.counts: collections.Counter = collections.Counter()
        self.bytes: collections.Counter = collections.Counter()
        self._depth = threading.local()
        self.trace = False  # also record the issuing call site of every counted call
        self.sites: collections.Counter = collections.Counter()

    def reset(self) -> None:
        self.counts.clear()
        self.bytes.clear()
        self.sites.clear()

    @staticmethod
    def _call_site() -> str:
        """The innermost frames above torch.distributed and deepspeed.comm (and this bench): who issued it."""
        import traceback

        keep = []
        for f in reversed(traceback.extract_stack()[:-3]):
            path = f.filename.replace(os.sep, "/")
            if "/torch/distributed/" in path or "/deepspeed/comm/" in path or "/torch/_" in path:
                continue
            if "/torch/nn/modules/module.py" in path or "/torch/utils/" in path or Path(path).resolve().parent == BENCH:
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

        wrapper._bench_counted = True
        return wrapper

    def install(self) -> None:
        import torch.distributed as dist
        import torch.distributed.distributed_c10d as c10d

        for name in COLLECTIVES:
            fn = getattr(c10d, name, None) or getattr(dist, name, None)
            if fn is None or getattr(fn, "_bench_counted", False):
                continue
            wrapped = self._wrap(name, fn)
            for mod in (dist, c10d):  # one wrapper for both names: a call through either counts once
                if hasattr(mod, name):
                    setattr(mod, name, wrapped)


COUNTER = CollectiveCounter()
