"""Atomic directory writes: a crash mid-save leaves the previous good directory in place."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path


def aside_path(target: str | os.PathLike) -> Path:
    """Where :func:`atomic_dir` keeps the previous ``target`` while it swaps in the new one (``.NAME.old`` beside it).

    A folder there is the only copy of the old ``target`` if a write was interrupted between the two renames; the next
    :func:`atomic_dir` on ``target`` deletes it, so callers that must not delete data check it first.
    """
    target = Path(target)
    return target.with_name(f".{target.name}.old")


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike):
    """Yield a fresh temporary directory beside ``target``; on success it replaces ``target`` in one rename.

    The old directory is moved aside first and deleted only after the new one is in place, so at every moment
    either the old or the new complete directory exists under ``target`` (or beside it as ``.old``).
    On any exception, KeyboardInterrupt included, the temporary directory is removed and ``target`` is untouched (put
    back if the interruption came between the two renames).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    old = aside_path(target)
    moved_aside = False
    try:
        yield tmp
        publish(tmp)
        if old.exists():
            shutil.rmtree(old)
        if target.exists():
            os.replace(target, old)
            moved_aside = True
        os.replace(tmp, target)
        moved_aside = False
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if moved_aside and not target.exists():  # interrupted between the renames: the old folder is the good one
            os.replace(old, target)
        raise


def publish(root: Path) -> None:
    """Make a freshly written folder ready to be renamed into place: its data on disk (fsync) and its permissions
    those of any file the user creates (``mkdtemp`` makes 0700 folders and some writers 0600 files, which teammates
    on a shared cluster could not read)."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(root, 0o777 & ~mask)
    for path in root.rglob("*"):
        if path.is_symlink():
            continue
        if path.is_dir():
            os.chmod(path, 0o777 & ~mask)
        elif path.is_file():
            os.chmod(path, 0o666 & ~mask)
            with open(path, "rb") as f:
                os.fsync(f.fileno())
