"""SoRA and AdaLoRA under PyTorch FSDP2 (fully_shard, DTensor parameters) on 2 CPU ranks (gloo), launched with
launch/accelerate/fsdp2.yaml, against one process on the same global batch (the same checks as the ZeRO-3 parity
tests in test_distributed.py, whose helpers this reuses). FSDP2 shards every parameter on dim 0 whatever its size,
so the tiny model's adapters are really split (checked: the fraction each rank holds)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from sora_ds.adapters.errors import ConfigError
from sora_ds.recipe.cli import main as cli
from sora_ds.recipe.config import load_config
from sora_ds.recipe.fsdp2 import fsdp2_settings
from tests.recipe.test_distributed import (ACCELERATE, ADALORA, ADALORA_SCHEDULE, ADALORA_STEPS, ENV, QUANT_4BIT,
                                           RECIPE, assert_same_allocation, assert_same_training, recipe_args, run,
                                           summary)
from tests.recipe.test_kills import FREEZE, _training_ranks, wait_for
from tests.support import REPO, free_port

pytestmark = pytest.mark.distributed

FSDP2 = ["--config_file", "launch/accelerate/fsdp2.yaml", "--num_processes", "2"]


def fsdp2(script: str, *args: str) -> None:
    run([ACCELERATE, "launch", *FSDP2, "--main_process_port", str(free_port()), script, *args])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """SoRA and AdaLoRA, one process (global batch 8) and 2 FSDP2 ranks (4 each), same base; checkpoints at 4."""
    root = tmp_path_factory.mktemp("fsdp2")
    out = {name: root / name for name in ("single", "fsdp2", "adalora_single", "adalora_fsdp2")}
    run([sys.executable, *recipe_args(out["single"], "--per_device_train_batch_size", "8", "--save_every", "4")])
    base = str(out["single"] / "base_model")
    fsdp2(*recipe_args(out["fsdp2"], "--model_name_or_path", base, "--per_device_train_batch_size", "4",
                       "--save_every", "4"))
    adalora = [*ADALORA_SCHEDULE, "--model_name_or_path", base]
    run([sys.executable, ADALORA, *adalora, "--output_dir", str(out["adalora_single"]),
         "--per_device_train_batch_size", "8"])
    fsdp2("tests/scripts/adalora_fsdp2_check.py", *adalora, "--output_dir", str(out["adalora_fsdp2"]),
          "--per_device_train_batch_size", "4")
    return {**out, "base": base}


def test_sora_fsdp2_two_ranks_equals_one_process(runs):
    """Per-step loss within 1e-4 relative, the same pruned gates module by module, adapters within 1e-5."""
    assert_same_training(runs["single"], runs["fsdp2"], rtol=1e-4)
    s = summary(runs["fsdp2"])
    assert (s["fsdp_version"], s["zero_stage"], s["num_processes"]) == (2, 0, 2)
    # The adapter and gates were really sharded: rank 0 held half of the elements (every dim 0 here is even).
    assert s["adapter_elements_on_rank"] / s["adapter_elements"] == 0.5
    assert 0.45 < s["base_bytes_on_rank"] / s["base_bytes"] < 0.55  # the base too (embeddings: 263 rows, uneven)


def test_sora_fsdp2_kill_9_mid_save_then_resume_continues_exactly_and_exports(runs, tmp_path):
    """kill -9 of both ranks while the last checkpoint is being saved (frozen on rank 0 after its manifest is
    written, before it is published); the resumed run continues from checkpoint-4 exactly as the uninterrupted one."""
    out, ready = tmp_path / "killed", tmp_path / "frozen"
    args = recipe_args(out, "--model_name_or_path", runs["base"], "--per_device_train_batch_size", "4",
                       "--save_every", "4")[1:]  # freeze_at's "recipe" entry is recipes/llama_sora.py's main
    proc = subprocess.Popen([sys.executable, "-m", "accelerate.commands.launch", *FSDP2, "--main_process_port",
                             str(free_port()), FREEZE, "sora_ds.recipe.checkpoint:write_manifest", "2", str(ready),
                             "recipe", *args], cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    ranks = {}
    try:
        wait_for(ready.exists, proc, "the second checkpoint's manifest")
        ranks = _training_ranks(proc.pid)
        assert sorted(ranks) == [0, 1]
    finally:
        for pid in [*ranks.values(), proc.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=30)
    root = out / "checkpoints"
    assert os.readlink(root / "latest") == "checkpoint-4" and (root / ".checkpoint-8.tmp").is_dir()
    assert sorted(p.name for p in (root / "checkpoint-4").glob("fsdp2_rank*.pt")) == ["fsdp2_rank0.pt",
                                                                                      "fsdp2_rank1.pt"]
    fsdp2(RECIPE, *args, "--resume_from", "latest")
    assert_same_training(runs["fsdp2"], out, rtol=1e-6)
    # `sora-ds export` of an FSDP2 checkpoint: the whole (gathered) adapter, as the one-process checkpoint's.
    for name in ("single", "fsdp2"):
        assert cli(["export", str(runs[name] / "checkpoints" / "checkpoint-4"), str(tmp_path / name)]) == 0
    one, two = (load_file(tmp_path / n / "adapter_model.safetensors") for n in ("single", "fsdp2"))
    assert one.keys() == two.keys()
    assert all(one[k].shape == two[k].shape and (one[k] - two[k]).abs().max() <= 1e-5 for k in one)


def test_adalora_fsdp2_two_ranks_allocates_as_one_process(runs):
    assert_same_allocation(runs["adalora_single"], runs["adalora_fsdp2"])
    assert summary(runs["adalora_fsdp2"])["adapter_elements_on_rank"] / summary(runs["adalora_fsdp2"])["adapter_elements"] == 0.5


def test_adalora_masks_are_exactly_zero_in_the_sharded_parameters(runs):
    """After every step, every pruned E entry is exactly 0 in the DTensor rows the optimizer steps, and from the
    final allocation on exactly the budget is non-zero; each rank held half of every E."""
    records = [json.loads(line) for line in (runs["adalora_fsdp2"] / "fsdp2_check.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, ADALORA_STEPS + 1))
    assert all(r["pruned_nonzero"] == 0 for r in records)
    assert max(r["pruned"] for r in records) > 0
    assert all(r["held"] == r["full"] == 2 * r["rank0_held"] for r in records)
    final = [r for r in records if r["step"] >= ADALORA_STEPS - 4]
    assert all(r["kept_nonzero"] == r["budget"] == 8 * 14 for r in final)


@pytest.mark.parametrize("env, extra, key", [
    ({"FSDP_VERSION": "1"}, [], "fsdp_version"),
    ({"FSDP_OFFLOAD_PARAMS": "true"}, [], "fsdp_offload_params"),
    ({"FSDP_ACTIVATION_CHECKPOINTING": "true"}, [], "fsdp_activation_checkpointing"),
    ({}, ["--quantization", "{load_in_8bit: true}"], "quantization.load_in_8bit"),
    ({}, ["--quantization", QUANT_4BIT.replace("quant_storage: float32", "quant_storage: uint8")],
     "quantization.bnb_4bit_quant_storage"),
    ({}, ["--mixed_precision", "fp16"], "mixed_precision"),
    ({}, ["--deepspeed_config", "ds_configs/zero3.json"], "deepspeed_config"),
])
def test_refused_fsdp2_combinations_name_the_key_and_the_fix(monkeypatch, env, extra, key):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    cfg = load_config([*extra], Path("recipes/llama/tiny_sora_cpu.yaml"))
    with pytest.raises(ConfigError, match=key) as e:
        fsdp2_settings(cfg)
    assert re.search(r"\b(set|use)\b", str(e.value))  # the message says what to do instead
