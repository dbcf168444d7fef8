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
