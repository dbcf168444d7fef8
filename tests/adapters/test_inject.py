"""inject: which layers get adapter branches, the errors when targets are wrong, and the branch initialisation."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from sora_ds import GatedLoRALinear, SoRAConfig, TargetError, inject
from sora_ds.adapters.inject import adapter_layers
from tests.support import (
    adapter_param_ids,
    build_bert,
    build_decoder,
    logits,
    token_ids,
)

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("single_thread")]

QV_NAMES = [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
BERT_QV = [f"bert.encoder.layer.{i}.attention.self.{p}" for i in range(2) for p in ("query", "value")]


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2"])
def test_inject_decoders_by_suffix(kind):
    model = build_decoder(kind).eval()
    names = inject(model, SoRAConfig(r=4, target_modules=["q_proj", "v_proj"], init_seed=0))
    assert names == QV_NAMES
    assert [n for n, _ in adapter_layers(model)] == QV_NAMES
    for name in QV_NAMES:
        m = model.get_submodule(name)
        assert isinstance(m, GatedLoRALinear)
        assert isinstance(m.base_layer, nn.Linear)
        assert m.lora_A.shape == (4, 64)
        assert m.gate.shape == (4,)
        assert m.lora_B.shape == (m.base_layer.out_features, 4)
        assert torch.count_nonzero(m.lora_B) == 0
    assert model.get_submodule("model.layers.0.self_attn.v_proj").out_features == 32  # 2 kv heads x 16
    assert not isinstance(model.get_submodule("model.layers.0.self_attn.k_proj"), GatedLoRALinear)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == adapter_param_ids(model)
    assert len(trainable) == 12
    assert model.adapter_config.r == 4


def test_inject_bert_by_regex_with_classifier():
    model = build_bert().eval()
    names = inject(
        model, SoRAConfig(r=4, target_modules=r".*\.(query|value)", modules_to_save=["classifier"], init_seed=0)
    )
    assert names == BERT_QV
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    expected = adapter_param_ids(model) | {id(model.classifier.weight), id(model.classifier.bias)}
    assert trainable == expected
    assert not model.bert.pooler.dense.weight.requires_grad
    assert not model.bert.embeddings.word_embeddings.weight.requires_grad


def test_regex_is_full_match_not_search():
    model = build_bert().eval()
    with pytest.raises(TargetError):
        inject(model, SoRAConfig(target_modules=r"query"))
    assert not any(isinstance(m, GatedLoRALinear) for m in model.modules())


def test_suffix_matches_whole_components_only():
    model = build_decoder("llama").eval()
    with pytest.raises(TargetError) as info:
        inject(model, SoRAConfig(target_modules=["proj"]))  # q_proj ends in "proj" but not ".proj"
    assert "q_proj" in str(info.value)


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2"])
def test_b_zero_gives_base_logits(kind):
    base = build_decoder(kind).eval()
    model = copy.deepcopy(base)
    inject(model, SoRAConfig(r=4, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"], init_seed=3))
    ids = token_ids()
    assert torch.equal(logits(model, ids), logits(base, ids))


def test_b_zero_gives_base_logits_bert():
    base = build_bert().eval()
    model = copy.deepcopy(base)
    inject(model, SoRAConfig(r=4, target_modules=r".*\.(query|value)", modules_to_save=["classifier"], init_seed=3))
    ids = token_ids()
    assert torch.equal(logits(model, ids), logits(base, ids))


def test_target_error_when_nothing_matches_lists_linear_suffixes():
    model = build_decoder("llama").eval()
    with pytest.raises(TargetError) as info:
        inject(model, SoRAConfig(target_modules=["query", "value"]))
    msg = str(info.value)
    assert "LlamaForCausalLM" in msg
    for suffix in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"):
        assert suffix in msg
    assert isinstance(info.value, ValueError)
    assert not any(isinstance(m, GatedLoRALinear) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())  # nothing was frozen either


def test_target_error_regex_matching_nothing():
    model = build_bert().eval()
    with pytest.raises(TargetError) as info:
        inject(model, SoRAConfig(target_modules=r".*\.q_proj"))
    msg = str(info.value)
    assert "query" in msg and "classifier" in msg


def test_target_error_regex_matching_only_non_linear():
    model = build_decoder("llama").eval()
    with pytest.raises(TargetError, match="non-linear") as info:
        inject(model, SoRAConfig(target_modules=r"model\.layers\.\d+\.self_attn"))
    assert "model.layers.0.self_attn" in str(info.value)


def test_partially_unmatched_entry_names_the_entry():
    model = build_decoder("llama").eval()
    with pytest.raises(TargetError) as info:
        inject(model, SoRAConfig(target_modules=["q_proj", "query_key_value"]))
    msg = str(info.value)
    assert "['query_key_value']" in msg
    assert "['q_proj'" not in msg  # the matched entry is not reported as unmatched
    assert not any(isinstance(m, GatedLoRALinear) for m in model.modules())


def test_double_inject_raises():
    model = build_decoder("llama").eval()
    inject(model, SoRAConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(TargetError, match="already"):
        inject(model, SoRAConfig(r=2, target_modules=["v_proj"]))
    assert [n for n, _ in adapter_layers(model)] == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]


def test_bad_modules_to_save_raises_and_leaves_model_untouched():
    """A bad ``modules_to_save`` entry must be reported before the model is changed.

    FAILS at the time of writing: inject() wraps the targets and freezes the model before validating
    modules_to_save, so the error leaves a half-injected model that a corrected retry then refuses.
    """
    model = build_decoder("llama").eval()
    with pytest.raises(TargetError, match="'score'"):
        inject(model, SoRAConfig(target_modules=["q_proj"], modules_to_save=["score"]))
    assert not any(isinstance(m, GatedLoRALinear) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    inject(model, SoRAConfig(target_modules=["q_proj"]))  # the corrected retry works


def test_init_seed_independent_of_global_rng():
    base = build_decoder("llama").eval()
    m1, m2 = copy.deepcopy(base), copy.deepcopy(base)
    cfg = SoRAConfig(r=4, target_modules=["q_proj", "v_proj"], init_seed=1234)
    torch.manual_seed(1)
    inject(m1, cfg)
    torch.manual_seed(999)
    torch.rand(17)
    inject(m2, cfg)
    mods1, mods2 = dict(adapter_layers(m1)), dict(adapter_layers(m2))
    for name in QV_NAMES:
        assert torch.equal(mods1[name].lora_A, mods2[name].lora_A)
        assert torch.equal(mods1[name].gate, mods2[name].gate)
    # per-module streams: different modules get different draws
    assert not torch.equal(mods1[QV_NAMES[0]].lora_A, mods1[QV_NAMES[2]].lora_A)
    # a different seed gives a different adapter
    m3 = copy.deepcopy(base)
    inject(m3, SoRAConfig(r=4, target_modules=["q_proj", "v_proj"], init_seed=1235))
    assert not torch.equal(dict(adapter_layers(m3))[QV_NAMES[0]].lora_A, mods1[QV_NAMES[0]].lora_A)


def test_without_init_seed_follows_global_rng():
    base = build_decoder("llama").eval()
    m1, m2 = copy.deepcopy(base), copy.deepcopy(base)
    cfg = SoRAConfig(r=4, target_modules=["q_proj"])
    torch.manual_seed(1)
    inject(m1, cfg)
    torch.manual_seed(2)
    inject(m2, cfg)
    name = "model.layers.0.self_attn.q_proj"
    assert not torch.equal(m1.get_submodule(name).lora_A, m2.get_submodule(name).lora_A)


def test_gate_init_ones_and_init_bounds():
    model = build_decoder("llama").eval()
    inject(model, SoRAConfig(r=4, target_modules=["q_proj"], gate_init="ones", init_seed=0))
    for _, m in adapter_layers(model):
        assert torch.equal(m.gate.detach(), torch.ones(4))
        assert m.lora_A.abs().max().item() <= 1 / 64**0.5
        assert m.scale == 16.0 / 4


