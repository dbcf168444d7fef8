"""compact: dead ranks removed, each module an ordinary LoRA of its own rank, outputs unchanged."""

from __future__ import annotations


import pytest
import torch
from torch import nn

from sora_ds import GatedLoRALinear, SoRAConfig, compact, inject, rank_report
from sora_ds.adapters.inject import adapter_layers
from tests.support import (
    build_decoder,
    logits,
    token_ids,
    trained_llama,
    zero_counts,
)

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("single_thread")]

QV_NAMES = [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
BERT_QV = [f"bert.encoder.layer.{i}.attention.self.{p}" for i in range(2) for p in ("query", "value")]


def test_compact_keeps_logits_and_prunes_ranks():
    model = trained_llama()
    zeros = zero_counts(model)
    total = 8 * len(zeros)
    # precondition: the strong lambda killed some but not all ranks, and some module is only partly pruned
    assert 0 < sum(zeros.values()) < total
    assert any(0 < z < 8 for z in zeros.values())
    dead = "model.layers.1.self_attn.v_proj"
    dead_base = model.get_submodule(dead).base_layer
    with torch.no_grad():
        model.get_submodule(dead).gate.zero_()
    kept = {n: int((m.gate != 0).sum()) for n, m in adapter_layers(model)}
    assert kept[dead] == 0
    assert rank_report(model) == {n: {"initial": 8, "kept": k} for n, k in kept.items()}

    ids = token_ids()
    ref = logits(model, ids)
    report = compact(model)
    assert report == {n: {"initial": 8, "kept": k} for n, k in kept.items()}
    out = logits(model, ids)
    assert (out - ref).abs().max().item() <= 1e-5

    assert type(model.get_submodule(dead)) is nn.Linear
    assert model.get_submodule(dead) is dead_base
    for name, k in kept.items():
        if name == dead:
            continue
        m = model.get_submodule(name)
        assert isinstance(m, GatedLoRALinear)
        assert m.gate is None
        assert m.r == k
        assert m.lora_A.shape == (k, 64)
        assert m.lora_B.shape == (m.out_features, k)
        assert m.scale == 16.0 / 8  # fixed by the initial rank
        assert m.lora_A.requires_grad and m.lora_B.requires_grad
    assert not any(n.endswith(".gate") for n, _ in model.named_parameters())
    # the report after compaction reads the compacted ranks
    assert rank_report(model) == {n: {"initial": 8, "kept": k} for n, k in kept.items() if n != dead}


def test_compact_fully_alive_module_folds_gate():
    model = build_decoder("llama").eval()
    inject(model, SoRAConfig(r=4, target_modules=["q_proj"], gate_init="normal", init_seed=0))
    with torch.no_grad():
        for _, m in adapter_layers(model):
            m.lora_B.normal_()
            m.gate.copy_(torch.tensor([0.5, -2.0, 1.5, 3.0]))
    name = "model.layers.0.self_attn.q_proj"
    m = model.get_submodule(name)
    expected_b = m.lora_B.detach() * torch.tensor([0.5, -2.0, 1.5, 3.0])
    ids = token_ids()
    ref = logits(model, ids)
    compact(model)
    assert torch.equal(m.lora_B.detach(), expected_b)
    assert (logits(model, ids) - ref).abs().max().item() <= 1e-5


