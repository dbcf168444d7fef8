"""(placeholder until the cli-safety branch lands)"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path


class OutputError(Exception):
    pass


def describe_write_error(exc: OSError, path: Path) -> str:
    probe = Path(path)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    what = "disk full" if getattr(exc, "errno", None) == errno.ENOSPC else str(exc)
    return f"could not write {path}: {what}; {free / 2**20:.1f} MB free on that filesystem"


def check_writable(path: Path) -> None:
    pass
