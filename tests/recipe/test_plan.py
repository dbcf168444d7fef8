"""``sora-ds plan``: the memory model (sora_ds/recipe/plan.py), checked against published model sizes, against the
CPU figures bench/scale_memory.py measured (bench/results/scale_memory.json), and against every recipe header."""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex

import pytest

from sora_ds.recipe.cli import main as cli
from sora_ds.recipe.config import TrainConfig, from_flat
from sora_ds.recipe.plan import (CPU_TOLERANCE, KNOWN, add_arguments, from_args, parameter_counts, plan,
                                 summary_line)
from tests.support import REPO

CONFIGS = sorted((REPO / "recipes").rglob("*.yaml"))
MEASURED = REPO / "bench" / "results" / "scale_memory.json"


@pytest.mark.parametrize("name, published", [  # the parameter counts of the models' own model cards / safetensors
    ("llama-3.1-8b-instruct", 8.03e9), ("llama-3.1-70b-instruct", 70.55e9), ("mistral-7b-instruct-v0.3", 7.25e9),
    ("qwen2.5-7b-instruct", 7.61e9), ("smollm2-135m-instruct", 134.5e6),
])
def test_known_shapes_give_the_published_sizes(name, published):
    n = parameter_counts(KNOWN[name])
    assert abs(sum(n[k] for k in ("linear", "embed", "lm_head", "norms")) / published - 1) < 0.005


def test_what_divides_and_what_does_not():
    cfg = TrainConfig(model_name_or_path="meta-llama/Llama-3.1-8B-Instruct", torch_dtype="bfloat16",
                      mixed_precision="bf16", max_length=1024, per_device_train_batch_size=1)
    one, eight = plan(cfg, 1), plan(cfg, 8, engine="zero3")
    assert one.gpu["base"] == pytest.approx(2 * one.params, rel=0.01)  # bf16, whole
    assert eight.gpu["base"] == pytest.approx(one.gpu["base"] / 8)  # ZeRO-3 divides the base...
    assert eight.gpu["activations"] == one.gpu["activations"]  # ...not the activations
    assert plan(cfg, 8, engine="zero2").gpu["base"] == one.gpu["base"]
    assert plan(cfg, 8, engine="zero3_offload").gpu["base"] == 0
    ckpt = plan(dataclasses.replace(cfg, gradient_checkpointing=True), 1)
    assert ckpt.gpu["activations"] < one.gpu["activations"] / 10
    q4 = dataclasses.replace(cfg, quantization={"load_in_4bit": True,
                                                "bnb_4bit_quant_storage": "bfloat16"})
    assert 0.3 < plan(q4, 1).gpu["base"] / one.gpu["base"] < 0.4  # ~0.52 byte per linear weight; embeddings stay bf16
    # ZeRO-3 with mixed_precision: no would hold fp32; the plan follows what the run will hold (precision.py)
    assert plan(dataclasses.replace(cfg, mixed_precision="no"), 8).held == "bfloat16"


@pytest.mark.skipif(not MEASURED.is_file(), reason="bench/results/scale_memory.json not written yet")
def test_cpu_plan_matches_the_measured_peaks(tmp_path):
    """Per-process peak RSS of the bench's runs (1 process and ZeRO-3 x2) within CPU_TOLERANCE of the plan."""
    data = json.loads(MEASURED.read_text())
    checked = 0
    for r in data["results"]:
        folder = tmp_path / r["size"]
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(r["config"]))
        for arm, gpus in (("single", 1), ("zero3", 2)):
            if not r.get(arm):
                continue
            cfg = from_flat({**data["meta"]["recipe"], "model_name_or_path": str(folder),
                             "per_device_train_batch_size": 2 // gpus})  # the same global batch
            measured = max(max(p["peak"] for p in k["phases"].values()) for k in r[arm])
            planned = plan(cfg, gpus, engine="zero3" if gpus > 1 else "none", cpu=True).per_gpu
            assert abs(planned / measured - 1) <= CPU_TOLERANCE, (r["size"], arm, planned, measured)
            checked += 1
    assert checked >= 2


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(REPO)))
def test_recipe_header_states_its_plan(config):
    """The header's "# Memory:" command, run now, prints the line the header shows (so the header cannot rot)."""
    lines = config.read_text().splitlines()
    i = next((k for k, line in enumerate(lines) if line.startswith("# Memory:")), None)
    assert i is not None, f"{config}: no '# Memory:' line (sora-ds plan --config {config.relative_to(REPO)} ...)"
    command, shown = lines[i].removeprefix("# Memory:").strip(), lines[i + 1].removeprefix("#").strip()
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    argv = shlex.split(command)
    assert argv[:2] == ["sora-ds", "plan"] and argv[argv.index("--config") + 1] == str(config.relative_to(REPO))
    args = parser.parse_args(argv[2:])
    args.config = str(REPO / args.config)
    assert shown == "-> " + summary_line(from_args(args, []), args.cpu)


def test_plan_command_prints_the_parts_and_refuses_unknown_models(capsys, tmp_path):
    assert cli(["plan", "--config", str(REPO / "recipes/llama/70b_sora_zero3.yaml"), "--gpus", "32",
                "--gpu-memory", "80", "--max_length", "2048"]) == 0
    out = capsys.readouterr().out
    assert "base" in out and "activations" in out and "per node" in out and "32 GPUs" in out
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model_name_or_path: someone/unknown-model\n")
    assert cli(["plan", "--config", str(cfg)]) == 2
    assert "no local config.json and not a known shape" in capsys.readouterr().err


