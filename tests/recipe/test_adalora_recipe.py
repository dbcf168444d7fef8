"""The AdaLoRA recipe end to end on one process: budget by optimizer steps, export round trip, resume, gradient
checkpointing, 4-bit base, and config errors that name the recipe key."""

from __future__ import annotations

import json
import os

import pytest
import torch

from sora_ds import adapter_layers
from sora_ds.adapters.budget import BudgetSchedule
from sora_ds.recipe.config import ConfigError, load_config
from sora_ds.recipe.train import train
from tests.support import (
    ADALORA_DEMO,
    Crash,
    assert_run_reloads_in_peft,
    assert_same_losses,
    crash_at,
    metrics,
)

pytestmark = pytest.mark.recipe


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--t_init", "150", "--t_final", "60"],
         r"^t_init=150 leaves no budget-decreasing phase: it must be < total_step - t_final = 200 - 60 = 140.*"
         r"\(in a recipe, total_step is max_steps\)$"),
        (["--target_r", "20"], r"^target_r must be in \[1, the initial rank 12\], got 20$"),
        (["--sparsify_stages", "3"], r"^sparsify_stages \(from command line\) is a SoRA key \(LambdaSchedule\); with method: adalora"),
        (["--gate_init", "ones"], r"^gate_init \(from command line\) belongs to SoRAConfig; with method: adalora leave it out"),
        (["--total_step", "50"], r"^total_step \(from command line\) is set by the recipe from max_steps"),
        (["--gate_l1", "0.1"], r"^gate_l1 \(from command line\) is a SoRA setting \(the gate step\); with method: adalora"),
        (["--threshold_mode", "absolute"], r"^threshold_mode \(from command line\) is a SoRA setting"),
        (["--gate_learning_rate", "0.1"], r"^gate_learning_rate \(from command line\) is a SoRA setting"),
        (["--method", "lora"], r"method='lora' is not allowed; choose one of \['sora', 'adalora'\]"),
    ],
)
def test_recipe_config_errors_name_the_key(argv, match):
    with pytest.raises(ConfigError, match=match):
        load_config(argv, ADALORA_DEMO)


@pytest.fixture(scope="module")
def recipe_run(tmp_path_factory):
    """The AdaLoRA recipe for 24 optimizer steps of 2 accumulated micro-batches each."""
    out = tmp_path_factory.mktemp("adalora_recipe")
    args = ["--max_steps", "24", "--t_init", "4", "--t_final", "6", "--delta_t", "2", "--log_every", "1",
            "--gradient_accumulation_steps", "2", "--per_device_train_batch_size", "8", "--output_dir", str(out)]
    cfg = load_config(args, ADALORA_DEMO)
    model, summary = train(cfg)
    return cfg, out, model, summary


def test_recipe_budget_follows_optimizer_steps(recipe_run):
    """With gradient accumulation the schedule advances once per optimizer step, not per micro-batch."""
    cfg, out, _, summary = recipe_run
    n = len(summary["kept_ranks"])
    ada = cfg.adapter
    schedule = BudgetSchedule(ada.r, ada.target_r, n, ada.t_init, ada.t_final, cfg.max_steps, ada.delta_t)
    records = metrics(out)
    assert [r["step"] for r in records] == list(range(1, 25))
    for r in records:
        step = r["step"]
        assert r["budget"] == (schedule(step)[0] if step > ada.t_init else n * ada.r), step
        if step >= cfg.max_steps - ada.t_final:  # the final mask is in place from the last allocation on
            assert r["active_ranks"] == n * ada.target_r, step
    assert summary["total_kept_ranks"] == n * ada.target_r
    assert summary["method"] == "adalora"
    assert any(k != ada.target_r for k in summary["kept_ranks"].values())  # budget moved between matrices


def test_recipe_exports_a_peft_lora_that_reproduces_the_model(recipe_run):
    _, out, model, summary = recipe_run
    for name in ("summary.json", "rank_heatmap.png", "config.yaml", "adapter/adapter_config.json"):
        assert (out / name).exists(), name
    adapter_cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter_cfg["peft_type"] == "LORA"
    assert sorted(adapter_cfg["rank_pattern"].values()) == sorted(k for k in summary["kept_ranks"].values() if k)
    assert_run_reloads_in_peft(model, out)


def test_resume_mid_schedule_reproduces_the_uninterrupted_run(recipe_run, tmp_path):
    """Importance EMAs, masks and the step count live in the optimizer state: a run that dies at step 12 (inside
    the budget-decreasing phase) and resumes from its step-10 checkpoint ends as the one that never stopped."""
    _, reference, _, ref_summary = recipe_run
    args = ["--max_steps", "24", "--t_init", "4", "--t_final", "6", "--delta_t", "2", "--log_every", "1",
            "--gradient_accumulation_steps", "2", "--per_device_train_batch_size", "8", "--output_dir", str(tmp_path),
            "--save_every", "5"]

    with pytest.raises(Crash):
        train(load_config(args, ADALORA_DEMO), on_step=crash_at(12))
    assert os.readlink(tmp_path / "checkpoints" / "latest") == "checkpoint-10"
    train(load_config([*args, "--resume_from", "latest"], ADALORA_DEMO))
    assert [r["step"] for r in metrics(tmp_path)] == list(range(1, 25))
    for key in ("loss", "budget", "active_ranks"):
        got, want = [r[key] for r in metrics(tmp_path)], [r[key] for r in metrics(reference)]
        torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-5, atol=1e-6)
    assert json.loads((tmp_path / "summary.json").read_text())["kept_ranks"] == ref_summary["kept_ranks"]


def test_orth_penalty_survives_gradient_checkpointing(tmp_path):
    base = ["--max_steps", "3", "--log_every", "1", "--t_init", "0", "--t_final", "1"]
    train(load_config([*base, "--gradient_checkpointing", "true", "--output_dir", str(tmp_path / "gc")], ADALORA_DEMO))
    train(load_config([*base, "--output_dir", str(tmp_path / "plain")], ADALORA_DEMO))
    assert_same_losses(tmp_path / "gc", tmp_path / "plain")


def test_adalora_on_a_4bit_base_trains_prunes_and_exports(tmp_path):
    """nf4 base (bitsandbytes on CPU): the adapter trains in fp32 beside it and reaches the target budget."""
    pytest.importorskip("bitsandbytes")
    quant = "{load_in_4bit: true, bnb_4bit_quant_type: nf4, bnb_4bit_compute_dtype: float32}"
    args = ["--max_steps", "12", "--t_init", "2", "--t_final", "4", "--delta_t", "2", "--log_every", "1",
            "--quantization", quant, "--output_dir", str(tmp_path)]
    model, summary = train(load_config(args, ADALORA_DEMO))
    assert type(next(m for _, m in adapter_layers(model)).base_layer).__name__ == "Linear4bit"
    records = metrics(tmp_path)
    assert records[-1]["loss"] < records[0]["loss"]
    assert summary["total_kept_ranks"] == len(summary["kept_ranks"]) * 8
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
