"""Which rank stopped responding. Every rank records, in the process group's key-value store (served by the
launcher, so it still answers when a rank hangs), the step it started and, from a background thread, the time every
``INTERVAL_S``; a rank whose collective timed out reads which ranks went silent (a stopped, dead or frozen process
stops refreshing its time; a rank merely waiting in the same collective keeps refreshing it).
"""

from __future__ import annotations

import re
import threading
import time

import torch.distributed as dist

INTERVAL_S = 1.0
SILENT_AFTER_S = 5.0
_STEP, _TIME = "sora_ds/step/{}", "sora_ds/alive/{}"


def _store():
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    try:  # not a public API; without it the report still names the step, only not the rank
        return dist.distributed_c10d._get_default_store()
    except (AttributeError, RuntimeError):
        return None


class Heartbeat:
    """Start with :meth:`start`, stop with :meth:`stop`; a no-op on one process."""

    def __init__(self) -> None:
        self.store = _store()
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> Heartbeat:
        if self.store is not None and self._thread is None:
            self._thread = threading.Thread(target=self._refresh, name="sora-ds-heartbeat", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._done.set()

    def _refresh(self) -> None:
        key = _TIME.format(dist.get_rank())
        while not self._done.is_set():
            try:
                self.store.set(key, repr(time.time()))
            except RuntimeError:  # the launcher's store is gone: the job is ending
                return
            self._done.wait(INTERVAL_S)

    def beat(self, step: int) -> None:
        """This rank has started optimizer step ``step`` (0-based)."""
        if self.store is not None:
            self.store.set(_STEP.format(dist.get_rank()), str(step))

    def silent(self) -> dict[int, dict]:
        """Rank -> ``{"silent_s", "step"}`` for every other rank that has not refreshed its time for
        ``SILENT_AFTER_S`` (``step``: the last step it started, 0-based, or None)."""
        if self.store is None:
            return {}
        now, found = time.time(), {}
        try:
            for rank in range(dist.get_world_size()):
                if rank == dist.get_rank():
                    continue
                seen = self._get(_TIME.format(rank))
                if seen is None or now - float(seen) > SILENT_AFTER_S:
                    step = self._get(_STEP.format(rank))
                    found[rank] = {"silent_s": None if seen is None else now - float(seen),
                                   "step": None if step is None else int(step)}
        except RuntimeError:  # the store itself is gone (the launcher died): nothing more to tell
            return {}
        return found

    def _get(self, key: str) -> str | None:
        return self.store.get(key).decode() if self.store.check([key]) else None


def default_collective_timeout(seconds: float) -> None:
    """Make ``seconds`` the timeout of every process group created from now on without one. The world group gets
    its timeout from ``init_process_group``, but DeepSpeed builds its data-parallel groups with ``new_group()``,
    which falls back to PyTorch's module default (30 minutes on gloo): a rank waiting in ZeRO's all-gather for a
    silent peer would wait that long. Call before the groups are made (before ``accelerate``/DeepSpeed start)."""
    from datetime import timedelta

    from torch.distributed import distributed_c10d

    distributed_c10d.default_pg_timeout = timedelta(seconds=seconds)  # read at every new_group() call
    distributed_c10d.default_pg_nccl_timeout = timedelta(seconds=seconds)


def is_timeout(error: BaseException) -> bool:
    """A collective that gave up waiting (gloo: "Timed out waiting ...ms"; NCCL's watchdog: "... before timing
    out")."""
    return isinstance(error, RuntimeError) and re.search(r"timed out|timing out|timeout", str(error), re.I) is not None
