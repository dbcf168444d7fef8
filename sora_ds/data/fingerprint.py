"""A dataset's fingerprint: what a resume compares to know it trains on the same data."""

from __future__ import annotations

import hashlib
from pathlib import Path

from .chat import BUILTIN_DATASET, _local_files

_CHUNK = 1 << 20


def dataset_fingerprint(source: str | Path | None, split: str = "train") -> str:
    """SHA-256 over the names and bytes of a local file or folder of ``.json``/``.jsonl`` files (the built-in set
    for ``None``), so a moved copy of the same data matches and an edited one does not; a hub dataset is known
    only by its name and split (its content cannot be read offline)."""
    path = BUILTIN_DATASET if source is None else Path(source)
    if not path.exists():
        return f"hub:{source}:{split}"
    files = _local_files(path)
    digest = hashlib.sha256()
    for f in files:
        if path.is_dir():  # which file holds what is part of a folder's data; a single file's name is not
            digest.update(f.name.encode() + b"\0")
        with f.open("rb") as fh:
            while chunk := fh.read(_CHUNK):
                digest.update(chunk)
    return "sha256:" + digest.hexdigest()
