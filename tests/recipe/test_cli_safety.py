"""`sora-ds export` / `merge` never destroy data: a destination that is, contains or lies inside an input, a file, a
symlink or (without --overwrite) a non-empty folder is refused before anything is written; write errors are one line."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sora_ds.recipe.cli import _writing, main
from sora_ds.recipe.config import load_config
from sora_ds.recipe.outputs import OutputError, check_destination
from sora_ds.recipe.train import train
from tests.support import REPO, SORA_DEMO

pytestmark = pytest.mark.recipe


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished tiny run at ``<root>/parent/run`` (``parent`` holds nothing else), never written by these tests."""
    out = tmp_path_factory.mktemp("safety") / "parent" / "run"
    train(load_config(["--max_steps", "3", "--save_every", "3", "--log_every", "3", "--output_dir", str(out)],
                      SORA_DEMO))
    return out


def snapshot(root):
    """Every path under ``root`` with its content hash (files) or link target: equal snapshots, untouched trees."""
    def entry(p):
        if p.is_symlink():
            return "-> " + os.readlink(p)
        return hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return {str(p.relative_to(root)): entry(p) for p in sorted(root.rglob("*"))}


def a_file(run, tmp):
    (tmp / "notes.txt").write_text("keep me")
    return tmp / "notes.txt"


def a_symlink_to_the_run(run, tmp):
    (tmp / "link").symlink_to(run, target_is_directory=True)
    return tmp / "link"


EXPORT_TARGETS = {
    "the-run": (lambda run, tmp: run, " is the input "),
    "its-parent": (lambda run, tmp: run.parent, " contains the input "),
    "its-adapter": (lambda run, tmp: run / "adapter", " is the input "),
    "inside-a-checkpoint": (lambda run, tmp: run / "checkpoints" / "checkpoint-3" / "new", " is inside the input "),
    "a-file": (a_file, "is a file"),
    "a-symlink-to-the-run": (a_symlink_to_the_run, " is the input "),
}


def refused(argv, out, says, capsys, *trees):
    """``main(argv)`` exits 2 with one line naming ``out`` and ``says``, and leaves every tree in ``trees`` as it was."""
    before = [snapshot(t) for t in trees]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"sora-ds {argv[0]}: ") and err.count("\n") == 1, err
    assert str(out) in err and says in err, err
    assert [snapshot(t) for t in trees] == before


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]], ids=["plain", "overwrite"])
@pytest.mark.parametrize("target", EXPORT_TARGETS)
def test_export_refuses_a_destination_that_would_destroy_data(run, tmp_path, capsys, target, overwrite):
    make, says = EXPORT_TARGETS[target]
    out = make(run, tmp_path)
    refused(["export", str(run), str(out), *overwrite], out, says, capsys, run.parent.parent, tmp_path)


def test_export_replaces_a_non_empty_folder_only_with_overwrite(run, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("mine")
    refused(["export", str(run), str(out)], out, "pass --overwrite", capsys, run.parent.parent, tmp_path)
    assert main(["export", str(run), str(out), "--overwrite"]) == 0
    assert snapshot(out) == snapshot(run / "adapter")
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no temporary or .old folder left


def test_export_into_a_new_path_or_an_empty_folder(run, tmp_path):
    (tmp_path / "empty").mkdir()
    for out in (tmp_path / "new" / "adapter", tmp_path / "empty"):
        assert main(["export", str(run), str(out)]) == 0
        assert snapshot(out) == snapshot(run / "adapter")
    assert sorted(os.listdir(tmp_path)) == ["empty", "new"] and os.listdir(tmp_path / "new") == ["adapter"]


def test_export_refuses_the_folder_an_interrupted_write_left(run, tmp_path, capsys):
    """``.out.old`` may be the only copy of ``out`` after an interrupted write: deleting it needs --overwrite."""
    (tmp_path / ".out.old").mkdir()
    (tmp_path / ".out.old" / "adapter_model.safetensors").write_bytes(b"previous")
    refused(["export", str(run), str(tmp_path / "out")], tmp_path / ".out.old", "interrupted write", capsys, tmp_path)


@pytest.fixture
def no_model_loading(monkeypatch):
    """Merge must refuse its destination before loading anything."""
    import transformers

    def loaded(*args, **kwargs):
        raise AssertionError("a model was loaded before the destination was checked")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", loaded)


@pytest.mark.parametrize("out, overwrite, says", [
    ("base_model", [], " is the input "),
    ("base_model", ["--overwrite"], " is the input "),
    (".", ["--overwrite"], " is the input "),
], ids=["base", "base-overwrite", "run-overwrite"])
def test_merge_refuses_to_write_over_its_inputs(run, tmp_path, capsys, no_model_loading, out, overwrite, says):
    out = run / out if out != "." else run
    argv = ["merge", "--base", str(run / "base_model"), "--adapter", str(run), str(out), *overwrite]
    refused(argv, out, says, capsys, run.parent.parent)


def test_merge_protects_the_base_the_adapter_config_names(run, tmp_path, capsys, no_model_loading):
    """With --base elsewhere, the base the adapter was saved against (its config's base_model_name_or_path) stays."""
    shutil.copytree(run / "base_model", tmp_path / "other_base")
    out = run / "base_model"
    argv = ["merge", "--base", str(tmp_path / "other_base"), "--adapter", str(run / "adapter"), str(out),
            "--overwrite"]
    refused(argv, out, " is the input ", capsys, run.parent.parent)


def test_check_destination_resolves_symlinked_parents(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "alias").symlink_to(tmp_path, target_is_directory=True)
    with pytest.raises(OutputError, match="is the input"):
        check_destination(tmp_path / "alias" / "run", [tmp_path / "run"], overwrite=True)
    check_destination(tmp_path / "alias" / "new", [tmp_path / "run"], overwrite=False)


def test_check_destination_of_the_current_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    check_destination(Path("."), [tmp_path.parent / "elsewhere"], overwrite=False)  # empty: free
    (tmp_path / "x").write_text("x")
    with pytest.raises(OutputError, match="not empty"):
        check_destination(Path("."), [tmp_path.parent / "elsewhere"], overwrite=False)
    with pytest.raises(OutputError, match="contains the input"):
        check_destination(Path("."), [tmp_path / "x"], overwrite=True)


def test_safetensors_disk_full_is_one_line(tmp_path):
    """safetensors reports ENOSPC as text, not as an OSError: the merge's save still says "disk full"."""
    from safetensors import SafetensorError

    with pytest.raises(OutputError, match=r"writing .*merged failed: disk full"), _writing(tmp_path / "merged"):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    assert os.listdir(tmp_path) == []


def in_a_tmpfs(options, command, tmp_path):
    """Run ``command`` (sh) with a fresh tmpfs mounted on ``$MNT`` in a private mount namespace; skip where the machine
    does not allow unprivileged namespaces."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if shutil.which("unshare") is None:
        pytest.skip("unshare (util-linux) is not installed")
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", f'mount -t tmpfs tmpfs "{mnt}"'], check=False,
                           capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs in a user namespace here: {probe.stderr.decode().strip()}")
    script = f'mount -t tmpfs -o {options} tmpfs "$MNT" && {command}'
    env = {**os.environ, "MNT": str(mnt), "PYTHONPATH": str(REPO)}
    return subprocess.run(["unshare", "-rm", "sh", "-c", script], check=False, capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=300)


SORA_DS = f'"{sys.executable}" -m sora_ds.recipe.cli'


def test_export_disk_full_is_one_line_and_leaves_nothing(run, tmp_path):
    assert (run / "adapter" / "adapter_model.safetensors").stat().st_size > 64 * 1024  # more than the tmpfs holds
    proc = in_a_tmpfs("size=16k", f'{SORA_DS} export "{run}" "$MNT/out"; echo "rc=$?"; ls -A "$MNT"', tmp_path)
    lines = proc.stdout.splitlines()
    assert "rc=2" in lines, (proc.stdout, proc.stderr)
    assert lines[lines.index("rc=2") + 1:] == [], "a temporary folder was left on the full disk"
    err = proc.stderr.strip()
    assert err.count("\n") == 0 and err.startswith("sora-ds export: ") and "disk full" in err, err
    assert f"{tmp_path}/mnt/out" in err


def test_export_to_a_read_only_place_is_refused_before_writing(run, tmp_path):
    proc = in_a_tmpfs("ro", f'{SORA_DS} export "{run}" "$MNT/out"; echo "rc=$?"', tmp_path)
    assert proc.stdout.splitlines() == ["rc=2"], (proc.stdout, proc.stderr)
    err = proc.stderr.strip()
    assert err.count("\n") == 0 and "cannot create a file" in err and f"{tmp_path}/mnt" in err, err
