"""The main recipe end to end on CPU: expected losses for a fixed seed, output contract, export, config errors."""

from __future__ import annotations

import errno
import json
import os
from datetime import datetime

import pytest
import torch

from sora_ds.data.chat import DataError
from sora_ds.recipe.config import load_config
from sora_ds.recipe.outputs import OutputError
from sora_ds.recipe.train import train
from tests.support import (
    REPO,
    SORA_DEMO,
    Crash,
    assert_run_reloads_in_peft,
    assert_same_losses,
    crash_at,
    metrics,
)

pytestmark = pytest.mark.recipe

RECIPE = REPO / "recipes" / "llama_sora.py"
EXPECTED = REPO / "tests" / "fixtures" / "expected_default_losses.json"


def test_default_recipe_matches_checked_in_losses(tmp_path):
    """The embedded default, first 6 steps, fixed seed: per-step losses equal the checked-in values."""
    cfg = load_config(["--max_steps", "6", "--log_every", "1", "--output_dir", str(tmp_path)], SORA_DEMO)
    train(cfg)
    got = [r["loss"] for r in metrics(tmp_path)]
    expected = json.loads(EXPECTED.read_text())["losses"]
    assert [r["step"] for r in metrics(tmp_path)] == list(range(1, 7))
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=1e-4, atol=1e-4)
    for key in ("step", "loss", "lr", "lambda", "active_ranks"):
        assert key in metrics(tmp_path)[0]
    # grad norm before clipping, tokens/s over all ranks, and the wall-clock time of every record
    first = metrics(tmp_path)[0]
    assert first["grad_norm"] > 0 and first["tokens_per_s"] > 0
    assert datetime.fromisoformat(first["time"]).tzinfo is not None


def test_default_recipe_prunes_and_exports_loadable_adapter(tmp_path):
    """The full embedded default: loss falls, gates hit exactly zero, the PEFT export reproduces the model."""

    cfg = load_config(["--output_dir", str(tmp_path)], SORA_DEMO)
    model, summary = train(cfg)

    records = metrics(tmp_path)
    first, last = records[0]["loss"], records[-1]["loss"]
    assert last < 0.5 * first, (first, last)
    assert summary["total_kept_ranks"] < summary["total_initial_ranks"]
    assert any(k < summary["initial_ranks"][n] for n, k in summary["kept_ranks"].items())
    assert 0 < summary["retained_adapter_param_fraction"] < 1
    assert summary["final_eval_loss"] < first
    for name in ("summary.json", "rank_heatmap.png", "config.yaml", "adapter/adapter_config.json", "base_model/config.json",
                 "adapter/tokenizer_config.json"):  # the tokenizer travels with the adapter, as the Trainer saves it
        assert (tmp_path / name).exists(), name
    adapter_cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert sorted(adapter_cfg["rank_pattern"].values()) == sorted(k for k in summary["kept_ranks"].values() if k)

    assert_run_reloads_in_peft(model, tmp_path)


def test_bad_dataset_fails_before_the_model_is_built(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"question": "hi", "answer": "yo"}\n')
    out = tmp_path / "out"
    cfg = load_config(["--dataset", str(data), "--output_dir", str(out)], SORA_DEMO)
    with pytest.raises(DataError, match="question"):
        train(cfg)
    assert not (out / "base_model").exists()


def test_crash_mid_checkpoint_keeps_last_good_one(tmp_path, monkeypatch):
    """A failure while writing checkpoint step 4 leaves step 2 as `latest`, complete, and resumable."""
    import sora_ds.recipe.checkpoint as ckpt

    real_export = ckpt.export_peft
    calls = {"n": 0}

    def failing_export(model, out_dir, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the second checkpoint dies half-written (after the optimizer state was saved)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_export(model, out_dir, *args, **kwargs)

    monkeypatch.setattr(ckpt, "export_peft", failing_export)
    args = ["--max_steps", "6", "--save_every", "2", "--log_every", "1", "--output_dir", str(tmp_path)]
    with pytest.raises(OutputError, match=r"^checkpoint at step 4: writing .*checkpoint-4.tmp failed: disk full"):
        train(load_config(args, SORA_DEMO))
    root = tmp_path / "checkpoints"
    assert not list(root.glob(".*.tmp"))  # the failed save cleaned up after itself
    assert os.readlink(root / "latest") == "checkpoint-2"
    assert not (root / "checkpoint-4").exists()
    assert json.loads((root / "checkpoint-2" / "trainer_state.json").read_text())["step"] == 2
    assert (root / "checkpoint-2" / "adapter" / "adapter_model.safetensors").is_file()

    monkeypatch.setattr(ckpt, "export_peft", real_export)
    _, resumed = train(load_config([*args, "--resume_from", "latest", "--save_total_limit", "1"], SORA_DEMO))
    assert resumed["steps"] == 6
    assert [r["step"] for r in metrics(tmp_path)] == [1, 2, 3, 4, 5, 6]
    # save_total_limit 1: each new checkpoint replaced the previous one once it was complete; the end is saved too
    assert sorted(p.name for p in root.glob("checkpoint-*")) == ["checkpoint-6"]
    assert os.readlink(root / "latest") == "checkpoint-6"


def test_staged_sparsifying_scheduler_records_each_stage(tmp_path):
    """sparsify_stages=3 over 9 steps: lambda steps up per stage, and each stage end records the paper's ratios."""
    args = ["--max_steps", "9", "--log_every", "1", "--sparsify_stages", "3", "--lambda_schedule", "linear",
            "--lambda_start", "0", "--sparse_lambda", "2.0", "--output_dir", str(tmp_path)]
    _, summary = train(load_config(args, SORA_DEMO))
    stages = summary["stages"]
    assert [s["stage"] for s in stages] == [0, 1, 2]
    assert [s["step"] for s in stages] == [3, 6, 9]
    assert [s["sparse_lambda"] for s in stages] == [0.0, 1.0, 2.0]
    assert [r["lambda"] for r in metrics(tmp_path)] == [0.0] * 3 + [1.0] * 3 + [2.0] * 3
    for key in ("memorization_ratio", "generalization_ratio"):
        ratios = [s[key] for s in stages]
        assert max(ratios) == 1.0 and all(0 <= r <= 1 for r in ratios), ratios
    assert stages[0]["nonzero_params"] >= stages[-1]["nonzero_params"] > 0


def test_gradient_checkpointing_changes_nothing_but_memory(tmp_path):
    base = ["--max_steps", "3", "--log_every", "1"]
    model, _ = train(load_config([*base, "--gradient_checkpointing", "true", "--output_dir", str(tmp_path / "gc")],
                                 SORA_DEMO))
    # The layers' own flag (transformers >= 5.0; `is_activation_checkpointing` exists only from 5.23).
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    train(load_config([*base, "--output_dir", str(tmp_path / "plain")], SORA_DEMO))
    assert_same_losses(tmp_path / "gc", tmp_path / "plain")


def test_tensorboard_tracker_gets_the_logged_metrics(tmp_path):
    """report_to: [tensorboard] goes through accelerate's tracker: the event file holds the loss of every logged step."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    args = ["--max_steps", "4", "--log_every", "2", "--report_to", "[tensorboard]", "--output_dir", str(tmp_path),
            "--save_every", "2"]
    train(load_config(args, SORA_DEMO))
    # One folder, output_dir/tensorboard, holds the scalars and the hyperparameters (no per-name or timestamp folders).
    events = list(tmp_path.rglob("events.out.tfevents.*"))
    assert events and {p.parent for p in events} == {tmp_path / "tensorboard"}, sorted(map(str, events))
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    scalars = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    logged = {r["step"]: r["loss"] for r in metrics(tmp_path)}
    assert [s for s, _ in scalars["loss"]] == [2, 4]
    for step, value in scalars["loss"]:
        assert value == pytest.approx(logged[step], rel=1e-6)
    assert "active_ranks" in scalars and "lambda" in scalars
    hparams = [f for f in events if b"hparams" in f.read_bytes() and b"learning_rate" in f.read_bytes()]
    assert len(hparams) == 1

    # Resumed from step 2 and run to 6: steps 2..6 are drawn once each (the first run's step 4 is purged).
    resume = ["--max_steps", "6", "--resume_from", str(tmp_path / "checkpoints" / "checkpoint-2"),
              "--resume_allow_changes", "[max_steps]"]
    (tmp_path / "checkpoints" / "checkpoint-4").rename(tmp_path / "abandoned")
    train(load_config([*args, *resume], SORA_DEMO))
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("loss")] == [2, 4, 6]


KEEP_HALF = ["--max_steps", "40", "--keep_fraction", "0.5", "--lambda_schedule", "linear", "--log_every", "1"]


@pytest.fixture(scope="module")
def keep_half_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("keep_half")
    _, summary = train(load_config([*KEEP_HALF, "--output_dir", str(out)], SORA_DEMO))
    return out, summary


def test_keep_fraction_reaches_its_target_by_the_end_of_the_ramp(keep_half_run):
    """keep_fraction 0.5 over a 40-step linear ramp on the demo (112 gate entries): lambda is steered from the
    measured kept fraction, which tracks the target and ends on it (measured: 56 of 112 kept, at most 0.052 off
    along the way)."""
    out, summary = keep_half_run
    records = metrics(out)
    assert [r["target_keep"] for r in records] == pytest.approx([1 - 0.5 * d / 40 for d in range(1, 41)])
    assert all(abs(r["kept_fraction"] - r["target_keep"]) <= 0.1 for r in records), records
    assert abs(records[-1]["kept_fraction"] - 0.5) <= 0.05
    assert records[0]["lambda"] == 1.0 and len({r["lambda"] for r in records}) > 10  # starts at sparse_lambda
    assert records[-1]["kept_fraction"] == summary["kept_fraction"] == pytest.approx(
        records[-1]["active_ranks"] / summary["total_initial_ranks"])
    assert summary["keep_fraction"] == 0.5


def test_keep_fraction_resumes_with_the_controller_state(keep_half_run, tmp_path):
    """A run that dies at step 24 and resumes from its step-20 checkpoint logs the lambdas and losses of the run that
    never stopped: the controller's lambda is part of the checkpoint."""
    reference, _ = keep_half_run
    args = [*KEEP_HALF, "--save_every", "20", "--output_dir", str(tmp_path)]

    with pytest.raises(Crash):
        train(load_config(args, SORA_DEMO), on_step=crash_at(24))
    assert json.loads((tmp_path / "checkpoints" / "checkpoint-20" / "trainer_state.json").read_text())["lambda"] > 0
    train(load_config([*args, "--resume_from", "latest"], SORA_DEMO))
    got, want = metrics(tmp_path), metrics(reference)
    assert [r["step"] for r in got] == list(range(1, 41))
    assert [r["lambda"] for r in got] == pytest.approx([r["lambda"] for r in want], rel=1e-12)
    assert [r["kept_fraction"] for r in got] == [r["kept_fraction"] for r in want]
    assert_same_losses(tmp_path, reference)


def test_num_train_epochs_sets_the_run_length_and_the_schedules_follow(tmp_path):
    """Two passes over the training split: max_steps, the lambda ramp (unset, so over the whole run) and config.yaml
    all say the computed length."""
    import yaml

    cfg = load_config(["--num_train_epochs", "2", "--lambda_schedule", "linear", "--log_every", "1", "--eval_every",
                       "0", "--per_device_train_batch_size", "32", "--output_dir", str(tmp_path)], SORA_DEMO)
    _, summary = train(cfg)
    rows = summary["data"]["train"]["examples"]
    steps = 2 * (rows // 32)
    assert summary["steps"] == steps and [r["step"] for r in metrics(tmp_path)] == list(range(1, steps + 1))
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert (saved["max_steps"], saved["lambda_ramp_steps"], saved["num_train_epochs"]) == (steps, steps, 2.0)
    assert metrics(tmp_path)[-1]["lambda"] == pytest.approx(cfg.sparsity.sparse_lambda * (steps - 1) / steps)


def test_eval_every_that_is_not_a_multiple_of_log_every_still_evaluates_at_each_of_its_steps(tmp_path):
    cfg = load_config(["--max_steps", "6", "--log_every", "4", "--eval_every", "3", "--eval_size", "8",
                       "--output_dir", str(tmp_path)], SORA_DEMO)
    train(cfg)
    rows = metrics(tmp_path)
    assert [r["step"] for r in rows] == [3, 4, 6]  # log lines at 4 and 6 (the last), eval lines at 3 and 6
    assert [r["step"] for r in rows if "eval_loss" in r] == [3, 6]


def test_num_train_epochs_and_max_steps_in_one_place_is_an_error_the_command_line_wins(tmp_path):
    from sora_ds.recipe.config import ConfigError

    with pytest.raises(ConfigError, match=r"^num_train_epochs and max_steps are both set \(in command line\)"):
        load_config(["--num_train_epochs", "1", "--max_steps", "5"], SORA_DEMO)
    cfg = load_config(["--num_train_epochs", "1"], SORA_DEMO)  # the demo YAML's max_steps gives way
    assert cfg.num_train_epochs == 1.0
