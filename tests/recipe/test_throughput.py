"""Throughput figures: the FLOPs-per-token count against a model's own layers, the device peaks, and the fields every
metrics record and the summary carry."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig

from sora_ds.recipe.config import load_config
from sora_ds.recipe.throughput import flops_per_token, matmul_params, mfu, peak_flops
from sora_ds.recipe.train import train
from tests.support import SORA_DEMO, metrics

LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False)


@pytest.mark.unit
@pytest.mark.parametrize("shape", [LLAMA3_8B, dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                                                   num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                                   vocab_size=300)], ids=["llama3-8b", "tiny-head_dim"])
def test_matmul_params_equal_the_linear_weights_of_the_model(shape):
    """Counted from the config = the weights of every nn.Linear of the model built from it (on the meta device)."""
    config = LlamaConfig(**shape)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    assert matmul_params(config) == linear
    if shape is LLAMA3_8B:  # about 4 x 7.5e9 for the frozen base, plus attention at 2k and the adapters' 6x
        assert linear == 8_030_261_248 - 128256 * 4096 - 65 * 4096  # Llama-3-8B less embedding and norms
        assert flops_per_token(config, 10**6, 2048) == 4 * linear + 12 * 32 * 4096 * 2048 + 6e6
    assert matmul_params(object()) is None and flops_per_token(object(), 0, 8) is None


@pytest.mark.unit
def test_peak_flops_by_device_name_and_mfu():
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989.4e12
    assert peak_flops("NVIDIA H100 PCIe") == 756e12  # the more specific name wins
    assert peak_flops("NVIDIA H200") == 989.4e12
    assert peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops("NVIDIA A10G") == 70e12
    assert peak_flops("NVIDIA L40S") == 362e12 and peak_flops("NVIDIA L40") == 181e12 and peak_flops("NVIDIA L4") == 121e12
    assert peak_flops("Intel(R) Xeon(R) Platinum") is None and peak_flops(None) is None
    assert mfu(1000.0, 4e9, 1e13) == pytest.approx(0.4)
    assert mfu(1000.0, None, 1e13) is None and mfu(1000.0, 4e9, None) is None


@pytest.mark.recipe
def test_metrics_and_summary_carry_throughput(tmp_path, single_thread):
    """Every record: tokens/s per device (= total / processes) and an MFU from the FLOPs count and the peak given by
    peak_flops_per_device (none on CPU otherwise); peak memory only on CUDA. The summary's averages lie within the
    records' range and use the same FLOPs."""
    args = ["--max_steps", "4", "--log_every", "1", "--eval_every", "0", "--peak_flops_per_device", "2e12",
            "--output_dir", str(tmp_path)]
    model, summary = train(load_config(args, SORA_DEMO))
    records = metrics(tmp_path)
    thr = summary["throughput"]
    adapter = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert thr["flops_per_token"] == flops_per_token(model.config, adapter, 128)  # the demo's max_length
    assert thr["peak_flops_per_device"] == 2e12
    for r in records:
        assert r["tokens_per_s"] > 0 and r["tokens_per_s_per_device"] == r["tokens_per_s"]  # one process
        assert r["mfu"] == pytest.approx(thr["flops_per_token"] * r["tokens_per_s_per_device"] / 2e12)
        assert r["peak_memory_gib"] is None  # CPU
    rates = [r["tokens_per_s"] for r in records]
    assert min(rates) <= thr["tokens_per_s"] <= max(rates)
    assert thr["mfu"] == pytest.approx(thr["flops_per_token"] * thr["tokens_per_s_per_device"] / 2e12)
