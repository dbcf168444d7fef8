"""atomic_dir: a folder is replaced whole or not at all, whatever interrupts the write."""

from __future__ import annotations

import pytest

from sora_ds.engine.atomic import atomic_dir

pytestmark = pytest.mark.unit


def _listing(d):
    return sorted(p.name for p in d.iterdir())


def test_atomic_dir_success_replaces_old_content(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with atomic_dir(target) as tmp:
        assert tmp.parent == target.parent
        assert tmp != target
        assert (target / "old.txt").read_text() == "old"  # old content still in place during the write
        (tmp / "new.txt").write_text("new")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "x.bin").write_bytes(b"\x00\x01")
    assert _listing(target) == ["new.txt", "sub"]
    assert (target / "new.txt").read_text() == "new"
    assert (target / "sub" / "x.bin").read_bytes() == b"\x00\x01"
    assert _listing(tmp_path) == ["out"]  # no temp or .old directory left


def test_atomic_dir_exception_keeps_old_content(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(RuntimeError, match="boom"), atomic_dir(target) as tmp:
        (tmp / "partial.txt").write_text("half")
        raise RuntimeError("boom")
    assert _listing(target) == ["old.txt"]
    assert (target / "old.txt").read_text() == "old"
    assert _listing(tmp_path) == ["out"]


def test_atomic_dir_keyboard_interrupt_cleans_up(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(KeyboardInterrupt), atomic_dir(target) as tmp:
        (tmp / "partial.txt").write_text("half")
        raise KeyboardInterrupt
    assert _listing(target) == ["old.txt"]
    assert _listing(tmp_path) == ["out"]


def test_atomic_dir_new_target_and_failed_new_target(tmp_path):
    target = tmp_path / "nested" / "out"
    with pytest.raises(ValueError), atomic_dir(target) as tmp:
        (tmp / "a").write_text("a")
        raise ValueError("fail")
    assert not target.exists()
    assert _listing(tmp_path / "nested") == []
    with atomic_dir(target) as tmp:
        (tmp / "a").write_text("a")
    assert _listing(target) == ["a"]
    assert _listing(tmp_path / "nested") == ["out"]


def test_atomic_dir_removes_stale_old_dir(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "v1").write_text("1")
    stale = tmp_path / ".out.old"
    stale.mkdir()
    (stale / "junk").write_text("junk")
    with atomic_dir(target) as tmp:
        (tmp / "v2").write_text("2")
    assert _listing(target) == ["v2"]
    assert _listing(tmp_path) == ["out"]


def test_atomic_dir_interrupted_between_renames_puts_the_old_target_back(tmp_path, monkeypatch):
    """An interrupt after the old folder was moved aside and before the new one is renamed in leaves the old one."""
    import os

    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    real_replace = os.replace

    def interrupted(src, dst):
        if str(src).startswith(str(tmp_path / ".out.tmp-")):
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt), atomic_dir(target) as tmp:
        (tmp / "new.txt").write_text("new")
    monkeypatch.undo()
    assert _listing(target) == ["old.txt"]
    assert _listing(tmp_path) == ["out"]
