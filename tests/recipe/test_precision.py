"""The base is held in the precision the config names, also under DeepSpeed (sora_ds/recipe/precision.py).

Under ZeRO-3, ``torch_dtype: bfloat16`` without ``mixed_precision: bf16`` used to partition the base in float32
(DeepSpeed's zero.Init casts to its own mode), twice the memory, silently. The 2-rank test reads the bytes DeepSpeed
really holds per base element from the run's summary.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

from sora_ds.adapters.errors import ConfigError
from sora_ds.engine import launch_deepspeed_config
from sora_ds.recipe.config import TrainConfig
from sora_ds.recipe.precision import consistent_precision, held_dtype
from tests.support import REPO, free_port

ZERO3 = {"zero_optimization": {"stage": 3}, "bf16": {"enabled": "auto"}}
ZERO2 = {"zero_optimization": {"stage": 2}}


@pytest.mark.parametrize("dtype, mixed, ds, want", [
    ("bfloat16", "no", ZERO3, ("bfloat16", "bf16")),    # the trap: mixed_precision follows torch_dtype
    ("float16", "no", ZERO3, ("float16", "fp16")),
    ("float32", "bf16", ZERO3, ("bfloat16", "bf16")),   # DeepSpeed would cast the float32 load: load bf16 instead
    ("float32", "bf16", ZERO2, ("bfloat16", "bf16")),   # the ZeRO-2 engine casts the module too
    ("bfloat16", "no", ZERO2, ("bfloat16", "no")),      # ZeRO-2 in fp32 mode casts nothing: nothing to change
    ("bfloat16", "no", None, ("bfloat16", "no")),       # no DeepSpeed: torch_dtype is what is held
    ("float32", "no", ZERO3, ("float32", "no")),
    ("bfloat16", "bf16", ZERO3, ("bfloat16", "bf16")),
    ("float32", "no", {**ZERO3, "bf16": {"enabled": True}}, ("bfloat16", "no")),  # the JSON fixes bf16
])
def test_precision_is_made_consistent_and_said(dtype, mixed, ds, want):
    cfg = TrainConfig(torch_dtype=dtype, mixed_precision=mixed)
    new, note = consistent_precision(cfg, ds)
    assert (new.torch_dtype, new.mixed_precision) == want
    assert held_dtype(new, ds) == new.torch_dtype
    assert (note is None) == (want == (dtype, mixed))
    if note:
        assert want[0] in note and ("mixed_precision" in note or "torch_dtype" in note)


@pytest.mark.parametrize("dtype, mixed, ds", [
    ("bfloat16", "fp16", ZERO3), ("float16", "bf16", ZERO2), ("bfloat16", "no", {**ZERO3, "fp16": {"enabled": "true"}}),
])
def test_bf16_with_fp16_is_refused_with_the_fix(dtype, mixed, ds):
    with pytest.raises(ConfigError, match="mixed_precision.*set mixed_precision: "):
        consistent_precision(TrainConfig(torch_dtype=dtype, mixed_precision=mixed), ds)


def test_launch_config_is_read_as_accelerate_reads_it(tmp_path, monkeypatch):
    for key in ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_DEEPSPEED_CONFIG_FILE", "ACCELERATE_DEEPSPEED_ZERO_STAGE"):
        monkeypatch.delenv(key, raising=False)
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ZERO2))
    assert launch_deepspeed_config() is None
    assert launch_deepspeed_config(str(path)) == ZERO2  # deepspeed / torchrun launchers: the recipe's key
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    assert launch_deepspeed_config(str(path)) == {"zero_optimization": {"stage": 3}}
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(REPO / "ds_configs" / "zero3.json"))
    assert launch_deepspeed_config()["zero_optimization"]["stage"] == 3


@pytest.mark.distributed
def test_zero3_holds_a_bf16_base_in_bf16_and_halves_it(tmp_path):
    """2 ranks, ZeRO-3 with sharding real, ``torch_dtype: bfloat16`` and no ``mixed_precision``: DeepSpeed holds
    2 bytes per base element (4 before the fix), half of them on each rank, and the run says what it changed. With
    evaluations between steps and before the export (which gathers the adapter), under a small live-parameter
    budget."""
    out = tmp_path / "run"
    # Sharding real, and DeepSpeed keeping little gathered (as the shipped ds_configs/zero3.json does at scale): an
    # evaluation then leaves prefetched layers in flight, which the export after it must not trip on.
    ds = json.loads((REPO / "tests" / "fixtures" / "zero3_sharded.json").read_text())
    ds["zero_optimization"].update(stage3_max_live_parameters=1000, stage3_max_reuse_distance=1000,
                                   stage3_prefetch_bucket_size=1000)
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    cmd = [str(Path(sys.executable).with_name("accelerate")), "launch", "--config_file", "launch/accelerate/zero3.yaml",
           "--deepspeed_config_file", str(tmp_path / "ds.json"), "--num_processes", "2",
           "--main_process_port", str(free_port()), "recipes/llama_sora.py", "--torch_dtype", "bfloat16",
           "--max_steps", "2", "--log_every", "1", "--eval_every", "1", "--per_device_train_batch_size", "4",
           "--output_dir", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    with safe_open(out / "base_model" / "model.safetensors", "pt") as f:
        elements = sum(_numel(f.get_slice(k).get_shape()) for k in f.keys())
    assert summary["zero_stage"] == 3
    assert summary["base_bytes"] == 2 * elements  # bf16, not fp32
    assert 0.45 < summary["base_bytes_on_rank"] / summary["base_bytes"] < 0.55  # really partitioned
    assert "mixed_precision set to bf16" in proc.stdout
    evals = [json.loads(line).get("eval_loss") for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(evals) == 2 and all(e is not None for e in evals)
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert "mixed_precision: bf16" in (out / "config.yaml").read_text()


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
