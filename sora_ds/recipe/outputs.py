"""Where a command may write: the destination rule of ``sora-ds export`` / ``merge`` (and of training runs).

The rule, in the spirit of ``cp``/``rsync`` and the HF Trainer's ``overwrite_output_dir``:

* a folder the command did not create is never deleted or replaced unless the user says so (``--overwrite``); a missing
  path or an empty folder is free;
* a destination that is, contains or is inside an input of the command (the run, checkpoint, adapter, base model) is
  refused even with ``--overwrite``; paths are compared after resolving symlinks, so a link cannot disguise an input;
* a destination that is a file or a symlink is refused (replacing it would not be what the user meant).

Every check runs before the first byte is written; :func:`describe_write_error` turns a failure during the write (disk
full, permissions) into one line.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

from ..engine.atomic import aside_path

_WRITE_ERRORS = {errno.ENOSPC: "disk full", errno.EDQUOT: "disk quota exceeded", errno.EACCES: "not writable",
                 errno.EPERM: "not writable", errno.EROFS: "not writable"}


_NEARLY_FULL = 1 << 20  # bytes


class OutputError(Exception):
    """A destination the command must not or cannot write; the message names the path and the way out."""


def check_destination(out: Path, inputs: Iterable[Path], overwrite: bool, flag: str = "--overwrite") -> None:
    """Raise :class:`OutputError` unless the command may replace ``out`` with a new folder.

    Refused always: ``out`` (after resolving symlinks) is, contains or is inside one of ``inputs``; ``out`` is a file
    or a symlink. Refused without ``overwrite``: ``out`` is a non-empty folder, or the ``.NAME.old`` folder that an
    interrupted write left beside it exists (it may be the only copy of the previous ``out``).
    """
    out = Path(out)
    inputs = [Path(p) for p in inputs]
    aside = aside_path(out.resolve())  # what atomic_dir deletes; resolved, since "." or "x/.." name no folder
    for dest in (out, aside):
        _check_not_an_input(dest, inputs, flag)
    if out.is_symlink():
        raise OutputError(f"{out} is a symlink to {out.resolve()}; give the folder itself, or a new path")
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out} is a file, not a folder; choose a folder path (a file is never replaced)")
    if overwrite:
        return
    if out.is_dir() and any(out.iterdir()):
        raise OutputError(f"{out} is a folder that is not empty; choose a new or empty folder, or pass {flag} to "
                          f"replace its whole content")
    if aside.exists() or aside.is_symlink():
        raise OutputError(f"{aside} exists: the previous {out} left by an interrupted write (maybe the only "
                          f"copy); move it away, or pass {flag} to delete it")


def _check_not_an_input(dest: Path, inputs: list[Path], flag: str) -> None:
    real = dest.resolve()
    real_inputs = [(src, src.resolve()) for src in inputs]
    relations = {  # the most precise first: OUT=RUN/adapter "is the input RUN/adapter" rather than "is inside RUN"
        "is": lambda src: real == src,
        "is inside": real.is_relative_to,
        "contains": lambda src: src.is_relative_to(real),
    }
    for relation, holds in relations.items():
        src = next((src for src, real_src in real_inputs if holds(real_src)), None)
        if src is not None:
            via = "" if real == dest.absolute() else f" (resolved: {real})"
            raise OutputError(f"{dest}{via} {relation} the input {src}; a destination may not be, contain or lie "
                              f"inside an input, even with {flag}: choose another folder")


def check_writable(path: Path) -> None:
    """Raise :class:`OutputError` unless a new file can be created in ``path``, or in its nearest existing ancestor
    when ``path`` does not exist yet (where the folders leading to it would be created).

    Probes by creating and removing a temporary file: ``os.access`` says yes to root even on a read-only filesystem.
    """
    path = Path(path)
    folder = _nearest_existing(path)
    if not folder.is_dir():
        raise OutputError(f"{path}: {folder} is a file, not a folder; choose another location")
    try:
        fd, probe = tempfile.mkstemp(prefix=".sora-ds-write-probe-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OutputError(f"{path}: cannot create a file in {folder} ({e.strerror}; {_free_space(folder)} free "
                          f"there); choose a writable location") from e


def describe_write_error(exc: Exception, path: Path) -> str:
    """One line for an error while writing ``path``: the path, the error in words and the free space left there.
    ``exc`` may also be torch.save's RuntimeError, which carries no errno: a full disk is then told by the space."""
    code = getattr(exc, "errno", None)
    if code is None and shutil.disk_usage(_nearest_existing(Path(path))).free < _NEARLY_FULL:
        code = errno.ENOSPC
    reason = _WRITE_ERRORS.get(code, getattr(exc, "strerror", None) or type(exc).__name__)
    return f"writing {path} failed: {reason} ({exc}); {_free_space(path)} free on its filesystem"


def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _free_space(path: Path) -> str:
    free = shutil.disk_usage(_nearest_existing(Path(path))).free
    return f"{free / 1e9:.1f} GB" if free >= 1e9 else f"{free / 1e6:.1f} MB"
