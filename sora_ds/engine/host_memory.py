"""Host memory that goes back to the system once freed: glibc's allocator, set for processes that gather whole layers.

Under ZeRO-3 every rank gathers each layer whole, uses it and frees it, thousands of times. glibc serves blocks of
up to 32 MB from its heaps (its mmap threshold rises to the largest block freed) and keeps one heap per thread that
allocated (gloo's and autograd's threads too); freed blocks stay resident there. Measured on a 0.5B Llama under
ZeRO-3 on 2 CPU ranks (bench/scale_memory.py): the peak per rank fell from 2.9 to 1.6 GB once blocks of 1 MB and more
are mapped on their own (returned at free) and two heaps are shared, at the same step time.
"""

from __future__ import annotations

import ctypes
import os

M_MMAP_THRESHOLD = -3  # mallopt parameters (malloc.h)
M_ARENA_MAX = -8
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_ARENA_MAX", "MALLOC_CONF", "LD_PRELOAD")


def return_freed_memory(threshold: int = 1 << 20, arenas: int = 2) -> bool:
    """Map blocks of ``threshold`` bytes and more on their own (a fixed threshold: glibc stops raising it) and cap
    the heaps at ``arenas``. Returns whether it was applied: not when the user set glibc's variables (or preloads
    another allocator), nor off glibc."""
    if any(os.environ.get(v) for v in USER_SETTINGS):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, threshold)) and bool(libc.mallopt(M_ARENA_MAX, arenas))
    except (OSError, AttributeError):
        return False
