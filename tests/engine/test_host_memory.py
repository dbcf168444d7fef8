"""glibc settings of ZeRO-3 runs (sora_ds/engine/host_memory.py): applied on glibc, never over the user's own."""

from __future__ import annotations

import platform

import pytest

from sora_ds.engine import return_freed_memory


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_applied_on_glibc_unless_the_user_set_malloc_variables(monkeypatch):
    for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_ARENA_MAX", "MALLOC_CONF", "LD_PRELOAD"):
        monkeypatch.delenv(name, raising=False)
    assert return_freed_memory() is True
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert return_freed_memory() is False
