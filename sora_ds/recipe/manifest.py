"""A checkpoint's manifest: the size and SHA-256 of every file, written when the save completes and checked before
a resume reads anything.

Why: a resume unpickles optimizer state (DeepSpeed loads ``*_optim_states.pt`` with ``weights_only=False``), so a
corrupt, swapped or planted file must be refused before it is opened. The manifest catches files that changed,
disappeared or appeared since the save, and symbolic links (a checkpoint holds only regular files it wrote). It is
not a signature: whoever can rewrite the files can rewrite the manifest, so a checkpoint from someone else is as
unsafe as any pickle (see the README's "Safety and recovery").
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

MANIFEST = "manifest.json"
_CHUNK = 1 << 20


class CheckpointError(ValueError):
    """A checkpoint that must not be resumed: incomplete, modified, or written with other settings."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _files(folder: Path) -> dict[str, Path]:
    """Every entry below ``folder`` except the manifest, by relative path; a symbolic link is an error."""
    found = {}
    for path in sorted(folder.rglob("*")):
        if path.is_symlink():
            raise CheckpointError(
                f"checkpoint {folder}: {path.relative_to(folder)} is a symbolic link (to {path.readlink()}); a "
                "checkpoint holds only the regular files it wrote, so resume is refused"
            )
        if path.is_file() and path != folder / MANIFEST:
            found[path.relative_to(folder).as_posix()] = path
    return found


def write_manifest(folder: Path) -> None:
    files = {rel: {"bytes": p.stat().st_size, "sha256": _sha256(p)} for rel, p in _files(folder).items()}
    (folder / MANIFEST).write_text(json.dumps({"format": 1, "files": files}, indent=1))


def verify_manifest(folder: Path) -> None:
    """Raise :class:`CheckpointError`, naming the file, unless ``folder`` holds exactly the files of its manifest."""
    refuse = (f"checkpoint {folder}: {{}}; the checkpoint is damaged or was modified after it was saved, and its "
              "pickled optimizer files could run code when loaded, so resume is refused (resume from another "
              "checkpoint, or start a new run)")
    manifest = folder / MANIFEST
    if not manifest.is_file():
        raise CheckpointError(refuse.format(f"no {MANIFEST} (written by every sora-ds >= 0.3 checkpoint save)"))
    try:
        listed = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError) as e:
        raise CheckpointError(refuse.format(f"{MANIFEST} is not readable ({e})")) from None
    present = _files(folder)
    unlisted = sorted(set(present) - set(listed))
    if unlisted:
        raise CheckpointError(refuse.format(f"{unlisted[0]} is not in {MANIFEST}"))
    for rel, expected in sorted(listed.items()):
        path = present.get(rel)
        if path is None:
            raise CheckpointError(refuse.format(f"{rel} is missing"))
        size = path.stat().st_size
        if size != expected["bytes"]:
            raise CheckpointError(refuse.format(f"{rel} has {size} bytes, {expected['bytes']} when saved"))
        if _sha256(path) != expected["sha256"]:
            raise CheckpointError(refuse.format(f"{rel} has changed (its SHA-256 differs from the saved one)"))
