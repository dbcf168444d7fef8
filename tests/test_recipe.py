"""The main recipe end to end on CPU: expected losses for a fixed seed, output contract, export, config errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sora_ds.chat_data import DataError
from sora_ds.train import train
from sora_ds.train_config import ConfigError, load_config

pytestmark = pytest.mark.recipe

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "llama_sora.py"
EXPECTED = REPO / "tests" / "data" / "expected_default_losses.json"


def recipe_defaults() -> dict:
    import runpy

    return runpy.run_path(str(RECIPE), run_name="recipe")["FAMILY_DEFAULTS"]


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_default_recipe_matches_checked_in_losses(tmp_path):
    """The embedded default, first 6 steps, fixed seed: per-step losses equal the checked-in values."""
    cfg = load_config(["--max_steps", "6", "--log_every", "1", "--output_dir", str(tmp_path)], recipe_defaults())
    train(cfg)
    got = [r["loss"] for r in metrics(tmp_path)]
    expected = json.loads(EXPECTED.read_text())["losses"]
    assert [r["step"] for r in metrics(tmp_path)] == list(range(1, 7))
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=1e-4, atol=1e-4)
    for key in ("step", "loss", "lr", "lambda", "active_ranks"):
        assert key in metrics(tmp_path)[0]


def test_default_recipe_prunes_and_exports_loadable_adapter(tmp_path):
    """The full embedded default: loss falls, gates hit exactly zero, the PEFT export reproduces the model."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = load_config(["--output_dir", str(tmp_path)], recipe_defaults())
    model, summary = train(cfg)

    records = metrics(tmp_path)
    first, last = records[0]["loss"], records[-1]["loss"]
    assert last < 0.5 * first, (first, last)
    assert summary["total_kept_ranks"] < summary["total_initial_ranks"]
    assert any(k < summary["initial_ranks"][n] for n, k in summary["kept_ranks"].items())
    assert 0 < summary["retained_adapter_param_fraction"] < 1
    assert summary["final_eval_loss"] < first
    for name in ("summary.json", "rank_heatmap.png", "config.yaml", "adapter/adapter_config.json", "base_model/config.json"):
        assert (tmp_path / name).exists(), name
    adapter_cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert sorted(adapter_cfg["rank_pattern"].values()) == sorted(k for k in summary["kept_ranks"].values() if k)

    ids = torch.randint(7, 200, (2, 24), generator=torch.Generator().manual_seed(0))
    model.eval()
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base_model"), tmp_path / "adapter")
        got = peft_model.eval()(input_ids=ids).logits
    assert (got - ref).abs().max().item() <= 1e-5


def test_quickstart_launch_command_runs(tmp_path):
    """`accelerate launch recipes/llama_sora.py` (the Quickstart) works; a few steps keep it short."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", str(RECIPE),
         "--max_steps", "3", "--output_dir", str(tmp_path)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == 3


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--learning_rat", "1e-3"], "unknown config key 'learning_rat'.*learning_rate"),
        (["--r", "eight"], "'r'.*expected int"),
        (["--threshold_mode", "relative"], "threshold_mode='relative'.*lr_scaled"),
        (["--lambda_schedule", "cosine"], "lambda_schedule='cosine'"),
        (["--max_steps", "0"], "max_steps must be >= 1"),
        (["--config", "does/not/exist.yaml"], "no such file"),
        (["--lambda_schedule", "loglinear", "--lambda_start", "0"], "lambda_start > 0"),
        (["--target_modules", "[]"], "target_modules"),
        (["stray"], "unexpected argument 'stray'"),
    ],
)
def test_config_errors_name_the_key(argv, match):
    with pytest.raises(ConfigError, match=match):
        load_config(argv, recipe_defaults())


def test_yaml_config_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("r: 4\nsparse_lambda: 0.5\nlearning_rate: 1e-3\n")
    cfg = load_config(["--config", str(path), "--r", "2"], recipe_defaults())
    assert (cfg.r, cfg.sparse_lambda, cfg.learning_rate) == (2, 0.5, 1e-3)
    assert cfg.target_modules == recipe_defaults()["target_modules"]
    (tmp_path / "bad.yaml").write_text("r: 4\nbogus_key: 1\n")
    with pytest.raises(ConfigError, match="bogus_key"):
        load_config(["--config", str(tmp_path / "bad.yaml")], recipe_defaults())


def test_bad_dataset_fails_before_the_model_is_built(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"question": "hi", "answer": "yo"}\n')
    out = tmp_path / "out"
    cfg = load_config(["--dataset", str(data), "--output_dir", str(out)], recipe_defaults())
    with pytest.raises(DataError, match="question"):
        train(cfg)
    assert not (out / "base_model").exists()


def test_crash_mid_checkpoint_keeps_last_good_one(tmp_path, monkeypatch):
    """A failure while writing checkpoint step 4 leaves step 2 as `latest`, complete, and resumable."""
    import sora_ds.checkpoint as ckpt

    real_export = ckpt.export_peft
    calls = {"n": 0}

    def failing_export(model, out_dir, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the second checkpoint dies half-written (after the optimizer state was saved)
            raise OSError("disk full")
        return real_export(model, out_dir, *args, **kwargs)

    monkeypatch.setattr(ckpt, "export_peft", failing_export)
    args = ["--max_steps", "6", "--save_every", "2", "--log_every", "1", "--output_dir", str(tmp_path)]
    with pytest.raises(OSError, match="disk full"):
        train(load_config(args, recipe_defaults()))
    root = tmp_path / "checkpoints"
    assert (root / "latest").read_text() == "step-0000002"
    assert not (root / "step-0000004").exists()
    assert json.loads((root / "step-0000002" / "trainer_state.json").read_text())["step"] == 2
    assert (root / "step-0000002" / "adapter" / "adapter_model.safetensors").is_file()

    monkeypatch.setattr(ckpt, "export_peft", real_export)
    _, resumed = train(load_config([*args, "--resume_from", "latest", "--save_total_limit", "1"], recipe_defaults()))
    assert resumed["steps"] == 6
    assert [r["step"] for r in metrics(tmp_path)] == [1, 2, 3, 4, 5, 6]
    # save_total_limit 1: the step-4 checkpoint replaced step 2 once it was complete (step 6 is the end: no save)
    assert sorted(p.name for p in root.glob("step-*")) == ["step-0000004"]
    assert (root / "latest").read_text() == "step-0000004"


def test_staged_sparsifying_scheduler_records_each_stage(tmp_path):
    """sparsify_stages=3 over 9 steps: lambda steps up per stage, and each stage end records the paper's ratios."""
    args = ["--max_steps", "9", "--log_every", "1", "--sparsify_stages", "3", "--lambda_schedule", "linear",
            "--lambda_start", "0", "--sparse_lambda", "2.0", "--output_dir", str(tmp_path)]
    _, summary = train(load_config(args, recipe_defaults()))
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
                                 recipe_defaults()))
    # The layers' own flag (transformers >= 5.0; `is_activation_checkpointing` exists only from 5.23).
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    train(load_config([*base, "--output_dir", str(tmp_path / "plain")], recipe_defaults()))
    with_gc = [r["loss"] for r in metrics(tmp_path / "gc")]
    without = [r["loss"] for r in metrics(tmp_path / "plain")]
    torch.testing.assert_close(torch.tensor(with_gc), torch.tensor(without), rtol=1e-5, atol=1e-5)


def test_tensorboard_tracker_gets_the_logged_metrics(tmp_path):
    """report_to: [tensorboard] goes through accelerate's tracker: the event file holds the loss of every logged step."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    args = ["--max_steps", "4", "--log_every", "2", "--report_to", "[tensorboard]", "--output_dir", str(tmp_path)]
    train(load_config(args, recipe_defaults()))
    events = list(tmp_path.rglob("events.out.tfevents.*"))
    assert events, sorted(p.name for p in tmp_path.rglob("*"))
    scalars = {}
    for event_file in events:
        acc = EventAccumulator(str(event_file))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars[tag] = [(e.step, e.value) for e in acc.Scalars(tag)]
    logged = {r["step"]: r["loss"] for r in metrics(tmp_path)}
    assert [s for s, _ in scalars["loss"]] == [2, 4]
    for step, value in scalars["loss"]:
        assert value == pytest.approx(logged[step], rel=1e-6)
    assert "active_ranks" in scalars and "lambda" in scalars


@pytest.mark.parametrize(
    "report_to, match",
    [("[tensorboardx]", r"report_to entry 'tensorboardx' is not a tracker"),
     ("[swanlab]", r"report_to entry 'swanlab': its package is not installed \(pip install swanlab\)")],
)
def test_unknown_or_missing_tracker_is_refused(report_to, match):
    with pytest.raises(ConfigError, match=match):
        load_config(["--report_to", report_to], recipe_defaults())
