"""What only a separate process shows: kill -9 in the middle of a checkpoint save, of the final export, of
`sora-ds export` and `merge`; Ctrl-C; a full disk and a read-only output folder (in a private mount namespace);
a rank that stops responding."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sora_ds.recipe.config import load_config
from sora_ds.recipe.manifest import verify_manifest
from sora_ds.recipe.train import train
from tests.support import REPO, SORA_DEMO, assert_same_losses, free_port, metrics

pytestmark = pytest.mark.recipe

FREEZE = REPO / "tests" / "scripts" / "freeze_at.py"
RECIPE = REPO / "recipes" / "llama_sora.py"
ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
SHORT = ["--save_every", "2", "--log_every", "1", "--eval_every", "0"]


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def wait_for(condition, proc: subprocess.Popen, what: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None and not condition():
            pytest.fail(f"the process ended (rc {proc.returncode}) before {what}:\n{proc.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.2)


def kill_when_frozen(tmp_path: Path, target: str, n: int, entry: str, *args: str) -> None:
    """Run ``entry`` with ``target``'s ``n``-th call frozen, and kill -9 it there."""
    ready = tmp_path / "frozen"
    proc = subprocess.Popen([sys.executable, str(FREEZE), target, str(n), str(ready), entry, *args], cwd=REPO,
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for(ready.exists, proc, f"call {n} of {target}")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    ready.unlink()


def test_kill_9_during_a_checkpoint_save_keeps_the_last_one_and_resumes_exactly(tmp_path):
    out, ref = tmp_path / "out", tmp_path / "ref"
    args = ["--max_steps", "6", *SHORT]
    # Frozen after the second save wrote its manifest into .checkpoint-4.tmp, before the rename that publishes it.
    kill_when_frozen(tmp_path, "sora_ds.recipe.checkpoint:write_manifest", 2, "recipe", *args, "--output_dir", str(out))
    root = out / "checkpoints"
    assert os.readlink(root / "latest") == "checkpoint-2" and not (root / "checkpoint-4").exists()
    assert (root / ".checkpoint-4.tmp").is_dir()  # what a kill leaves; the next run removes it
    verify_manifest(root / "checkpoint-2")
    train(load_config([*args, "--output_dir", str(out), "--resume_from", "latest"], SORA_DEMO))
    assert not list(root.glob(".*.tmp"))
    train(load_config([*args, "--output_dir", str(ref)], SORA_DEMO))
    assert_same_losses(out, ref)


def test_kill_9_during_the_final_export_keeps_the_previous_adapter(tmp_path):
    out = tmp_path / "out"
    train(load_config(["--max_steps", "4", *SHORT, "--output_dir", str(out)], SORA_DEMO))
    before = snapshot(out / "adapter")
    resume = ["--max_steps", "6", *SHORT, "--save_every", "0", "--output_dir", str(out), "--resume_from", "latest",
              "--resume_allow_changes", "[max_steps]"]
    # atomic_dir's fsync runs after the body wrote everything, before the renames: call 1 is base_model/, 2 adapter/.
    kill_when_frozen(tmp_path, "sora_ds.engine.atomic:publish", 2, "recipe", *resume)
    assert snapshot(out / "adapter") == before
    assert list(out.glob(".adapter.tmp-*"))
    train(load_config(resume, SORA_DEMO))
    assert snapshot(out / "adapter") != before and not list(out.glob(".adapter.tmp-*"))


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("finished")
    train(load_config(["--max_steps", "2", *SHORT, "--save_every", "0", "--output_dir", str(out)], SORA_DEMO))
    return out


@pytest.mark.parametrize("command", ["export", "merge"])
def test_kill_9_during_sora_ds_export_or_merge_leaves_the_old_destination(finished, tmp_path, command):
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "previous.txt").write_text("an earlier result")
    before = snapshot(dest)
    args = (["export", str(finished), str(dest), "--overwrite"] if command == "export" else
            ["merge", "--base", str(finished / "base_model"), "--adapter", str(finished), str(dest), "--overwrite"])
    kill_when_frozen(tmp_path, "sora_ds.engine.atomic:publish", 1, "cli", *args)
    assert snapshot(dest) == before


def test_ctrl_c_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, str(RECIPE), "--max_steps", "500", "--save_every", "100", "--log_every",
                             "1", "--eval_every", "0", "--output_dir", str(out)], cwd=REPO, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: (out / "metrics.jsonl").is_file() and len(metrics(out)) >= 3, proc, "three logged steps")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err
    step = metrics(out)[-1]["step"]
    assert f"SIGINT: stopped after step {step}; checkpoint " in err
    name = f"checkpoint-{step}"
    assert os.readlink(out / "checkpoints" / "latest") == name
    verify_manifest(out / "checkpoints" / name)
    summary = train(load_config(["--max_steps", str(step + 2), "--log_every", "1", "--eval_every", "0", "--output_dir",
                                 str(out), "--resume_from", "latest", "--resume_allow_changes", "[max_steps]"],
                                SORA_DEMO))[1]
    assert summary["steps"] == step + 2


def _unshare_or_skip() -> None:
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                           capture_output=True, text=True, check=False) if shutil.which("unshare") else None
    if probe is None or probe.returncode != 0:
        pytest.skip(f"needs `unshare -rm` and tmpfs mounts (user namespaces): {probe.stderr if probe else 'no unshare'}")


def _in_private_mount(tmp_path: Path, mount_opts: str, *recipe_args: str) -> tuple[int, str, list[str]]:
    """The recipe with ``tmp_path/mnt`` a fresh tmpfs (``mount_opts``) that only it sees: its exit code, its stderr
    and what was left in ``mnt/out/checkpoints`` afterwards (the mount vanishes with the namespace)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    cmd = (f"mount -t tmpfs -o {mount_opts} tmpfs {mnt} && {{ {sys.executable} {RECIPE} {' '.join(recipe_args)}; "
           f"echo rc=$?; ls -A {mnt}/out/checkpoints 2>/dev/null; }}")
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", cmd], cwd=REPO, env=ENV, capture_output=True, text=True,
                          timeout=300, check=False)
    lines = proc.stdout.split("rc=")[-1].split()
    return int(lines[0]), proc.stderr, lines[1:]


def test_disk_full_during_a_checkpoint_names_the_path_and_the_free_space(tmp_path):
    _unshare_or_skip()
    # 640 KiB: room for the base model (~450 KiB) and the logs, not for a checkpoint (~260 KiB).
    rc, err, left = _in_private_mount(tmp_path, "size=640k", "--max_steps", "4", *SHORT, "--output_dir",
                                      str(tmp_path / "mnt" / "out"))
    assert rc == 2, err[-3000:]
    last = next(line for line in re.split(r"[\r\n]", err) if line.startswith("sora-ds: "))  # the bar uses \r
    assert last.startswith("sora-ds: error: checkpoint at step 2: writing ") and "failed: disk full" in last, last
    assert "free on its filesystem" in last
    assert left == []  # the failed save removed its temporary folder; no checkpoint, no `latest`


def test_read_only_output_folder_is_refused_before_training(tmp_path):
    _unshare_or_skip()
    rc, err, _ = _in_private_mount(tmp_path, "ro", "--max_steps", "4", "--output_dir", str(tmp_path / "mnt" / "out"))
    assert rc == 2
    assert "sora-ds: error: " in err and "cannot create a file in" in err and "Read-only" in err
    assert "Traceback" not in err
    assert "sora:" not in err  # no progress bar: refused before the first step


def launch_two_ranks(out: Path, log: Path, *args: str) -> subprocess.Popen:
    """The SoRA demo on 2 CPU ranks under ZeRO-2, in its own session (a terminal's process group), stderr to ``log``."""
    with log.open("w") as err:
        return subprocess.Popen(
            [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "launch/accelerate/zero2.yaml"),
             "--num_processes", "2", "--main_process_port", str(free_port()), str(RECIPE), "--max_steps", "500",
             "--log_every", "1", "--eval_every", "0", "--output_dir", str(out), *args],
            cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=err, text=True, start_new_session=True)


def test_ctrl_c_on_two_ranks_stops_both_after_the_same_step_with_one_checkpoint(tmp_path):
    out, log = tmp_path / "out", tmp_path / "stderr.txt"
    proc = launch_two_ranks(out, log, "--save_every", "100")
    wait_for(lambda: (out / "metrics.jsonl").is_file() and len(metrics(out)) >= 3, proc, "three logged steps")
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: every process of the group gets it
    proc.wait(timeout=120)
    stops = re.findall(r"sora-ds: \[rank \d\] SIGINT: stopped after step (\d+); checkpoint (\S+);", log.read_text())
    assert len(stops) == 2 and stops[0] == stops[1], log.read_text()[-3000:]
    step = int(stops[0][0])
    assert metrics(out)[-1]["step"] == step
    assert os.readlink(out / "checkpoints" / "latest") == f"checkpoint-{step}"
    verify_manifest(out / "checkpoints" / f"checkpoint-{step}")


@pytest.mark.parametrize("stopped", [0, 1])
def test_a_rank_that_stops_responding_is_reported_with_rank_and_step(tmp_path, stopped):
    out, log = tmp_path / "out", tmp_path / "stderr.txt"
    proc = launch_two_ranks(out, log, "--dist_timeout", "10")
    ranks = {}
    try:
        wait_for(lambda: (out / "metrics.jsonl").is_file() and len(metrics(out)) >= 2, proc, "two logged steps")
        ranks = _training_ranks(proc.pid)
        assert sorted(ranks) == [0, 1]
        os.kill(ranks[stopped], signal.SIGSTOP)
        stopped_at = time.monotonic()
        wait_for(lambda: "did not respond" in log.read_text(), proc, "the timeout report", timeout=90)
        waited = time.monotonic() - stopped_at
    finally:
        for pid in [*ranks.values(), proc.pid]:  # the ranks too: a stopped process ignores everything but SIGKILL
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=30)
    report = next(line for line in log.read_text().splitlines() if "did not respond" in line)
    reporter, silent = re.search(r"rank (\d): at step \d+ a collective waited dist_timeout=10 s and rank (\d) \(silent "
                                 r"for \d+ s, last started step \d+\) did not respond", report).groups()
    assert (int(reporter), int(silent)) == (1 - stopped, stopped)
    assert waited < 60  # reported within the timeout (plus start-up slack), not after gloo's default 30 minutes


def _training_ranks(root: int) -> dict[int, int]:
    """RANK -> pid of the processes ``root`` (the launcher) started."""
    ranks = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                env = (entry / "environ").read_bytes().split(b"\0")
            except (OSError, IndexError, ValueError):
                continue
            rank = [e.split(b"=", 1)[1] for e in env if e.startswith(b"RANK=")]
            if ppid == root and rank:
                ranks[int(rank[0])] = int(entry.name)
    return ranks
