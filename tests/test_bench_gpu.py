"""bench/gpu.py --tiny: the prepared GPU benchmark runs its whole code path on CPU, so the GPU command cannot rot."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from transformers import LlamaConfig

from sora_ds.recipe.throughput import flops_per_token
from tests.support import REPO

pytestmark = pytest.mark.recipe

ARMS = ("lora", "sora", "adalora", "peft_adalora", "qlora", "sora_4bit", "sora_zero3")


def test_gpu_bench_tiny_runs_every_arm_and_its_figures_add_up(tmp_path):
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu.py"), "--tiny", "--peak-flops", "1e12",
                           "--json", str(out)], cwd=REPO, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    arms, r = result["arms"], result["ratios"]
    assert tuple(arms) == ARMS
    s = result["args"]["shape"]
    config = LlamaConfig(hidden_size=s["hidden_size"], intermediate_size=s["intermediate_size"],
                         num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                         num_key_value_heads=s["kv_heads"], vocab_size=s["vocab_size"])
    for key, a in arms.items():
        assert "error" not in a, a
        assert a["tokens_per_step"] > 0 and a["tokens_per_step"] <= result["args"]["rows"] * s["seq_len"]
        assert a["tokens_per_s"] == pytest.approx(a["tokens_per_step"] / (a["median_step_ms"] / 1e3))
        assert a["trainable_params"] > 0
        assert a["flops_per_token"] == flops_per_token(config, a["trainable_params"], s["seq_len"])
        assert a["mfu"] == pytest.approx(a["flops_per_token"] * a["tokens_per_s"] / 1e12)
        assert a["peak_memory_gib"] is None  # CUDA only
        assert a["arm"] in proc.stdout
    assert r["sora_over_lora"] == pytest.approx(arms["sora"]["tokens_per_s"] / arms["lora"]["tokens_per_s"])
    assert r["adalora_over_lora"] == pytest.approx(arms["adalora"]["tokens_per_s"] / arms["lora"]["tokens_per_s"])
    assert r["peft_adalora_over_lora"] == pytest.approx(arms["peft_adalora"]["tokens_per_s"] / arms["lora"]["tokens_per_s"])
    assert r["sora_4bit_over_qlora"] == pytest.approx(arms["sora_4bit"]["tokens_per_s"] / arms["qlora"]["tokens_per_s"])
    assert r["zero3_over_sora"] == pytest.approx(arms["sora_zero3"]["tokens_per_s"] / arms["sora"]["tokens_per_s"])
    assert r["qlora_memory_over_bf16"] is None
    # every arm starts with a zero adapter update on the same base and batch: the same first loss per base kind
    bf16 = [arms[k]["first_lm_loss"] for k in ("lora", "sora", "adalora", "sora_zero3")]  # (PEFT AdaLoRA's loss
    # includes its orthogonality penalty)
    assert max(bf16) - min(bf16) < 1e-4, bf16
    assert arms["qlora"]["first_lm_loss"] == pytest.approx(arms["sora_4bit"]["first_lm_loss"], abs=1e-4)
    for line in ("SoRA / PEFT LoRA tokens/s", "AdaLoRA / PEFT LoRA tokens/s", "ZeRO-3 / no ZeRO tokens/s"):
        assert line in proc.stdout
