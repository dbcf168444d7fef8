"""Helpers shared by the bench scripts (run as `python bench/<script>.py`, so this folder is on sys.path)."""

from __future__ import annotations

import os
import platform
from pathlib import Path


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


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolation percentile (q in [0, 100])."""
    xs = sorted(values)
    if len(xs) == 1:
        return xs[0]
    pos = (len(xs) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def ds_worker(want_bf16: bool):
    """Set up one rank of a DeepSpeed bench worker started by torchrun: device, threads, process group (NCCL on
    GPU, gloo on CPU, where DeepSpeed's shared-memory op, unused here, is not JIT-built: ~40 s). Returns cuda, bf16,
    rank, world, shm_skipped and rank-0 ``say`` / device ``sync`` helpers."""
    import importlib
    import logging
    import types
    import warnings

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
                                 shm_skipped=shm_skipped, say=say, sync=sync)
