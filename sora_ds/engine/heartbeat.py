"""Which rank stopped responding: every rank records the step it reached in the process group's key-value store
(a few bytes per step, served by the launcher, so it still answers when a rank hangs), and a rank whose collective
timed out reads who fell behind.
"""

from __future__ import annotations

import re

import torch.distributed as dist

_KEY = "sora_ds/heartbeat/{}"


def _store():
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    try:  # not a public API; without it the report still names the step, only not the rank
        return dist.distributed_c10d._get_default_store()
    except (AttributeError, RuntimeError):
        return None


class Heartbeat:
    def __init__(self) -> None:
        self.store = _store()

    def beat(self, step: int) -> None:
        """This rank has started optimizer step ``step`` (0-based)."""
        if self.store is not None:
            self.store.set(_KEY.format(dist.get_rank()), str(step))

    def behind(self, step: int) -> dict[int, int | None]:
        """Rank -> last step it started, for every rank that has not started ``step`` (None: never beat)."""
        if self.store is None:
            return {}
        late = {}
        try:
            for rank in range(dist.get_world_size()):
                key = _KEY.format(rank)
                last = int(self.store.get(key)) if self.store.check([key]) else None
                if last is None or last < step:
                    late[rank] = last
        except RuntimeError:  # the store itself is gone (the launcher died): nothing more to tell
            return {}
        return late


def is_timeout(error: BaseException) -> bool:
    """A collective that gave up waiting (gloo: "Timed out waiting ...ms"; NCCL's watchdog: "... before timing
    out")."""
    return isinstance(error, RuntimeError) and re.search(r"timed out|timing out|timeout", str(error), re.I) is not None
