"""Ctrl-C and SIGTERM (a scheduler's preemption) stop a run at the end of the current optimizer step, with a
checkpoint, instead of killing it mid-step.

The signal only sets a flag; the training loop shares it across ranks inside the reduction it already does every
step, so all ranks stop after the same step and save together. A terminal's Ctrl-C reaches every rank and the
launcher, which forwards it again, so signals in the first ``GRACE_S`` seconds count as one; a later one aborts at
once (``KeyboardInterrupt``), for a user who does not want to wait for the save.
"""

from __future__ import annotations

import signal
import sys
import threading
import time

GRACE_S = 2.0
SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequest:
    """A context manager; ``requested`` turns true at the first SIGINT/SIGTERM received inside it."""

    def __init__(self) -> None:
        self.requested = False
        self.signal_name = ""
        self._first = 0.0
        self._previous: dict = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():  # signal handlers can only be set from there
            self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame) -> None:
        now = time.monotonic()
        if not self.requested:
            self.requested, self._first, self.signal_name = True, now, signal.Signals(signum).name
            print(f"\n{self.signal_name}: stopping after this step (saving a checkpoint when save_every is set); "
                  f"press Ctrl-C again after {GRACE_S:.0f} s to abort without saving", file=sys.stderr, flush=True)
        elif now - self._first > GRACE_S:
            raise KeyboardInterrupt
