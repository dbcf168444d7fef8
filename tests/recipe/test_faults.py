"""Nothing lost, nothing silently wrong: output folders, checkpoint rotation and manifests, resume checks, bad values,
runs that prune everything. (Kill -9, Ctrl-C, disk full and hung ranks, which need a separate process: test_kills.py.)
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
from pathlib import Path

import pytest

from sora_ds.adapters.inject import TargetError
from sora_ds.data.chat import DataError
from sora_ds.recipe.checkpoint import rotate
from sora_ds.recipe.config import load_config
from sora_ds.recipe.resume import check_resume, identity
from sora_ds.recipe.manifest import CheckpointError, verify_manifest
from sora_ds.recipe.outputs import OutputError
from sora_ds.recipe.train import TrainingStopped, train
from tests.support import ADALORA_DEMO, SORA_DEMO, metrics

pytestmark = pytest.mark.recipe

SHORT = ["--max_steps", "4", "--save_every", "2", "--log_every", "1", "--eval_every", "0"]


def run(out: Path, *extra: str):
    return train(load_config([*SHORT, "--output_dir", str(out), *extra], SORA_DEMO))[1]


def snapshot(folder: Path) -> dict[str, str]:
    """Relative path -> SHA-256 of every file below ``folder``: equal snapshots mean nothing was touched."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished 4-step run with checkpoints at steps 2 and 4 (the end is saved too)."""
    out = tmp_path_factory.mktemp("finished")
    run(out)
    return out


@pytest.fixture
def copy_of(tmp_path, finished):
    def make(name: str = "run") -> Path:
        return Path(shutil.copytree(finished, tmp_path / name, symlinks=True))
    return make


# ---------------------------------------------------------------- output folders


def test_reusing_a_finished_runs_folder_is_refused_and_touches_nothing(copy_of):
    out = copy_of()
    before = snapshot(out)
    with pytest.raises(OutputError, match=r"holds the files of another run: config.yaml, metrics.jsonl, summary.json, "
                                          r".*adapter, base_model, checkpoints\. Nothing was written.*--resume_from "
                                          r"latest.*--overwrite_output_dir true"):
        run(out, "--r", "4")
    assert snapshot(out) == before


def test_overwrite_output_dir_replaces_run_files_only(copy_of):
    out = copy_of()
    (out / "notes.txt").write_text("my notes")
    run(out, "--overwrite_output_dir", "true", "--max_steps", "3", "--save_every", "0")
    assert (out / "notes.txt").read_text() == "my notes"  # not a run file: never removed
    assert not (out / "checkpoints").exists()  # the old run's checkpoints went with it
    assert [r["step"] for r in metrics(out)] == [1, 2, 3]  # metrics of this run only
    assert json.loads((out / "summary.json").read_text())["steps"] == 3


def test_output_dir_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "out").write_text("x")
    with pytest.raises(OutputError, match="is a file, not a folder"):
        run(tmp_path / "out")


@pytest.mark.parametrize(
    "extra, error, match",
    [
        (["--target_modules", "[q_proj, nope_proj]"], TargetError, r"entries \['nope_proj'\] match no linear module"),
        (["--modules_to_save", "[score]"], TargetError, r"modules_to_save entry 'score' matches no module"),
        (["--dataset", "MISSING"], DataError, "does not exist"),
    ],
)
def test_bad_targets_or_data_fail_before_anything_is_written(tmp_path, extra, error, match):
    if extra[-1] == "MISSING":
        extra = [extra[0], str(tmp_path / "missing.jsonl")]
    with pytest.raises(error, match=match):
        run(tmp_path / "out", *extra)
    assert not (tmp_path / "out").exists()  # no config.yaml, no base model: nothing was written


# ---------------------------------------------------------------- resume checks


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--learning_rate", "0.5"], r"^resume_from: learning_rate was 0.01 when checkpoint .*checkpoint-4 was saved "
                                     r"and is 0.5 now; a resumed run must keep it \(the optimizer and scheduler"),
        (["--seed", "7"], r"^resume_from: seed was 42 .* is 7 now; .*builds the base model"),
        (["--r", "4"], r"^resume_from: r was 8 .* is 4 now"),
        (["--target_modules", "[q_proj]"], r"^resume_from: target_modules was \['q_proj', 'k_proj', 'v_proj'"),
        (["--max_steps", "6"], r"^resume_from: max_steps was 4 .* is 6 now; .*--resume_allow_changes '\[max_steps\]'"),
    ],
)
def test_resume_with_a_changed_setting_is_refused_naming_the_key(finished, extra, match):
    with pytest.raises(CheckpointError, match=match):
        run(finished, "--resume_from", "latest", *extra)


def test_resume_with_another_method_is_refused_before_any_model_is_loaded(finished):
    cfg = load_config(["--max_steps", "4", "--t_init", "1", "--t_final", "1", "--delta_t", "1", "--output_dir",
                       str(finished), "--resume_from", "latest"], ADALORA_DEMO)
    with pytest.raises(CheckpointError, match=r"^resume_from: method was 'sora' .* is 'adalora' now"):
        train(cfg)


def test_resume_across_engines_is_refused_and_a_0_3_checkpoint_counts_as_no_fsdp():
    """The sharded state loads only into the layout that wrote it: an FSDP2 checkpoint is refused without FSDP2 (and
    the reverse) at the resume check, before the model is loaded; checkpoints of 0.3 record no fsdp_version."""
    cfg = load_config([], SORA_DEMO)
    plain = identity(cfg, "f", 2, 0, fsdp_version=0)
    fsdp2 = identity(cfg, "f", 2, 0, fsdp_version=2)
    with pytest.raises(CheckpointError,
                       match=r"was saved with FSDP version 2, this run has FSDP version 0; .*FSDP2 or none"):
        check_resume(fsdp2, plain, [], "checkpoint c")
    with pytest.raises(CheckpointError, match=r"was saved with FSDP version 0, this run has FSDP version 2"):
        check_resume(plain, fsdp2, [], "checkpoint c")
    of_0_3 = {k: v for k, v in plain.items() if k != "fsdp_version"}
    check_resume(of_0_3, plain, [], "checkpoint c")


def test_resume_on_changed_data_is_refused(tmp_path):
    data = tmp_path / "data.jsonl"
    rows = [{"prompt": f"question {i}", "response": f"answer {i}"} for i in range(40)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run(tmp_path / "out", "--dataset", str(data))
    data.write_text("".join(json.dumps(r) + "\n" for r in rows[::-1]))  # same records, other order
    with pytest.raises(CheckpointError, match=r"the data of .*data.jsonl differs from the data checkpoint .* was "
                                              r"trained on"):
        run(tmp_path / "out", "--dataset", str(data), "--resume_from", "latest")


def test_moved_data_resumes_when_allowed_and_counts_land_in_the_summary(tmp_path):
    rows = [{"prompt": f"question {i}", "response": "answer " * (3 + 40 * (i % 4 == 0))} for i in range(40)]
    first, moved = tmp_path / "a.jsonl", tmp_path / "moved" / "b.jsonl"
    first.write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = run(tmp_path / "out", "--dataset", str(first), "--max_length", "64")
    # split on records (seed 42, eval 10%): records 3, 9, 10 and 36 are held out; every 4th one is long
    assert summary["data"] == {"records": 40, "train": {"examples": 36, "truncated": 9, "dropped": 0},
                               "eval": {"examples": 4, "truncated": 1, "dropped": 0}}
    moved.parent.mkdir()
    first.rename(moved)
    resume = ["--dataset", str(moved), "--max_length", "64", "--resume_from", "latest"]
    with pytest.raises(CheckpointError, match=r"^resume_from: dataset was .*a.jsonl.*--resume_allow_changes '\[dataset\]'"):
        run(tmp_path / "out", *resume)
    assert run(tmp_path / "out", *resume, "--resume_allow_changes", "[dataset]")["steps"] == 4


def test_allowed_max_steps_change_resumes_and_follows_the_new_length(copy_of):
    out = copy_of()
    summary = run(out, "--resume_from", "latest", "--max_steps", "6", "--resume_allow_changes", "[max_steps]")
    assert summary["steps"] == 6
    assert [r["step"] for r in metrics(out)] == [1, 2, 3, 4, 5, 6]


# ---------------------------------------------------------------- rotation and lineage


def test_rotation_keeps_other_lineages_and_the_newest(copy_of):
    """Resume from step 2 of a run that went on to save steps 4 and 6: those belong to the abandoned branch. They are
    refused without overwrite_output_dir; with it they are removed, and rotation keeps the newest of this lineage."""
    out = copy_of()
    root = out / "checkpoints"
    run(out, "--resume_from", "latest", "--max_steps", "6", "--resume_allow_changes", "[max_steps]")  # saves step 6
    assert sorted(p.name for p in root.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    step2 = str(root / "checkpoint-2")
    again = ["--resume_from", step2, "--max_steps", "6", "--resume_allow_changes", "[max_steps]", "--save_every", "1",
             "--save_total_limit", "2"]
    with pytest.raises(OutputError, match=r"not in the history of the one you resume .*: checkpoints/checkpoint-4, "
                                          r"checkpoints/checkpoint-6"):
        run(out, *again)
    run(out, *again, "--overwrite_output_dir", "true")
    assert sorted(p.name for p in root.glob("checkpoint-*")) == ["checkpoint-5", "checkpoint-6"]
    assert os.readlink(root / "latest") == "checkpoint-6"
    verify_manifest(root / "checkpoint-6")


def test_rotate_deletes_only_checkpoints_of_its_run(tmp_path):
    for name, run_id in (("checkpoint-1", "a"), ("checkpoint-2", "b"), ("checkpoint-3", "a"), ("checkpoint-4", "a")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "trainer_state.json").write_text(json.dumps({"run_id": run_id}))
    rotate(tmp_path, ["checkpoint-1", "checkpoint-2", "checkpoint-3", "checkpoint-4"], keep=1, run_id="a")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "checkpoint-4"]


# ---------------------------------------------------------------- the manifest


class _Payload:
    """Unpickling this creates a file: what a planted optimizer file could do with a shell command instead."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "code ran"))


@pytest.mark.parametrize("attack", ["crafted_pickle", "symlink", "missing", "extra", "no_manifest"])
def test_a_modified_checkpoint_is_refused_before_anything_is_unpickled(copy_of, tmp_path, attack):
    out = copy_of()
    ckpt = out / "checkpoints" / "checkpoint-4"
    marker = tmp_path / "pwned"
    pickled = sorted(p for p in ckpt.iterdir() if p.suffix in (".bin", ".pkl", ".pt"))[0]
    if attack == "crafted_pickle":
        pickled.write_bytes(pickle.dumps(_Payload(marker)))
        match = rf"{pickled.name} has (changed|\d+ bytes)"
    elif attack == "symlink":
        (tmp_path / "elsewhere.bin").write_bytes(pickled.read_bytes())
        pickled.unlink()
        pickled.symlink_to(tmp_path / "elsewhere.bin")
        match = rf"{pickled.name} is a symbolic link"
    elif attack == "missing":
        pickled.unlink()
        match = rf"{pickled.name} is missing"
    elif attack == "extra":
        (ckpt / "extra_optim_states.pt").write_bytes(pickle.dumps(_Payload(marker)))
        match = r"extra_optim_states.pt is not in manifest.json"
    else:
        (ckpt / "manifest.json").unlink()
        match = r"no manifest.json"
    with pytest.raises(CheckpointError, match=match + r".*resume is refused"):
        run(out, "--resume_from", "latest")
    assert not marker.exists()


# ---------------------------------------------------------------- runs that prune everything


def test_a_run_that_prunes_every_rank_stops_at_once_and_writes_its_summary(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(TrainingStopped, match=r"every adapter rank was pruned at step (\d+) of 50.*Lower sparse_lambda") as e:
        train(load_config(["--max_steps", "50", "--sparse_lambda", "500", "--log_every", "10", "--eval_every", "0",
                           "--output_dir", str(out)], SORA_DEMO))
    assert e.value.exit_code == 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["total_kept_ranks"] == 0 and summary["stopped_early"].startswith("every adapter rank was pruned")
    assert summary["steps"] < 50 and metrics(out)[-1]["step"] == summary["steps"]
    assert metrics(out)[-1]["active_ranks"] == 0
    assert not (out / "adapter").exists()


def test_outputs_follow_the_umask_and_latest_is_a_path_tools_open(finished, tmp_path):
    """Folders and files a run writes are readable by others under the usual umask (022), not 0700/0600; `latest`
    is a link, so `checkpoints/latest/adapter` opens in any tool and `sora-ds export` takes it."""
    from sora_ds.recipe.cli import main as sora_ds

    for path in [finished / "adapter", *(finished / "adapter").iterdir(), finished / "checkpoints" / "checkpoint-4",
                 *(finished / "checkpoints" / "checkpoint-4").iterdir()]:
        assert path.stat().st_mode & 0o044 == 0o044, f"{path} is {oct(path.stat().st_mode)}"
    latest = finished / "checkpoints" / "latest"
    assert latest.is_symlink() and (latest / "adapter" / "adapter_config.json").is_file()
    assert sora_ds(["export", str(latest), str(tmp_path / "exported")]) == 0
    assert (tmp_path / "exported" / "adapter_model.safetensors").read_bytes() == \
        (finished / "checkpoints" / "checkpoint-4" / "adapter" / "adapter_model.safetensors").read_bytes()
