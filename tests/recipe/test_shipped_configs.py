"""Every shipped recipe config loads, and trains for two steps on a tiny model of the same family with its own
adapter, sparsity and quantization settings, so no shipped config is broken. Its header names real paths, and it
sets the keys that make a run what it is itself."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from sora_ds.recipe.train import train
from sora_ds.recipe.config import TINY_LLAMA, load_config
from tests.support import REPO

pytestmark = pytest.mark.recipe

# What makes a run differ between families and sizes: every shipped YAML says it itself (no hidden defaults layer).
SELF_CONTAINED = ("method", "target_modules", "r", "lora_alpha", "learning_rate", "max_steps", "output_dir")
CONFIGS = sorted((REPO / "recipes").rglob("*.yaml"))
# config folder -> transformers model_type of that family
FAMILIES = {"llama": "llama", "smollm2": "llama", "mistral": "mistral", "qwen": "qwen2"}


def tiny_overrides(config: Path, out: Path) -> list[str]:
    """Same targets, ranks, sparsity and quantization; tiny dims, built-in data, CPU precision, two steps."""
    raw = yaml.safe_load(config.read_text())
    tiny = {**TINY_LLAMA, "model_type": FAMILIES[config.parent.name]}
    args = ["--model_name_or_path", "null", "--model_config", yaml.safe_dump(tiny, default_flow_style=True),
            "--tokenizer_name_or_path", "null", "--dataset", "null", "--max_length", "128",
            "--torch_dtype", "float32", "--mixed_precision", "no", "--max_steps", "2", "--log_every", "1",
            "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1", "--eval_size", "0.05",
            "--save_every", "0", "--eval_every", "0", "--warmup_steps", "0", "--gradient_checkpointing", "false",
            "--output_dir", str(out)]
    if raw["method"] == "adalora":  # the budget schedule, squeezed into 2 steps
        args += ["--t_init", "0", "--t_final", "0", "--delta_t", "1"]
    if raw.get("quantization"):
        q = {**raw["quantization"], "bnb_4bit_compute_dtype": "float32"}
        if q.get("bnb_4bit_quant_storage"):
            q["bnb_4bit_quant_storage"] = "float32"
        args += ["--quantization", yaml.safe_dump(q, default_flow_style=True)]
    return args


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(REPO)))
def test_shipped_config_runs_two_steps_on_a_tiny_model(config, tmp_path):
    assert config.parent.name in FAMILIES, f"{config}: config folder is not a known model family"
    load_config(["--config", str(config)])  # valid as shipped: known keys, right types
    cfg = load_config(["--config", str(config), *tiny_overrides(config, tmp_path)])
    _, summary = train(cfg)
    assert summary["steps"] == 2
    assert summary["total_initial_ranks"] > 0
    assert summary["method"] == cfg.method
    if cfg.method == "adalora":  # the 2-step schedule ends on the target budget
        assert summary["total_kept_ranks"] == cfg.adapter.target_r * len(summary["kept_ranks"])


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(REPO)))
def test_config_header_says_what_and_how_and_names_real_paths(config):
    header = [line for line in config.read_text().splitlines() if line.startswith("#")]
    text = "\n".join(header)
    assert header and header[0].startswith("# ")
    assert "Launch:" in text and "Override:" in text and "Hardware:" in text
    for path in re.findall(r"(?:recipes|launch|ds_configs)/[\w./-]+", text):
        assert (REPO / path).exists(), path


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(REPO)))
def test_config_is_self_contained(config):
    raw = yaml.safe_load(config.read_text())
    assert [k for k in SELF_CONTAINED if k not in raw] == []
