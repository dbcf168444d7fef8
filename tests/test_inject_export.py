"""Injection, compaction, PEFT export / merge round trips and atomic directory writes, on tiny models."""

import copy
import json

import pytest
import torch
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from sora_ds import SoRAConfig, SoRALinear, TargetError, compact, export_peft, inject, rank_report, save_merged
from sora_ds.atomic import atomic_dir
from sora_ds.export import peft_adapter
from sora_ds.inject import sora_modules
from sora_ds.optim import build_optimizer

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("single_thread")]


DECODER_KW = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)
DECODERS = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
}
QV_NAMES = [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
BERT_QV = [f"bert.encoder.layer.{i}.attention.self.{p}" for i in range(2) for p in ("query", "value")]


def tiny_decoder(kind: str = "llama", seed: int = 0):
    cfg_cls, model_cls = DECODERS[kind]
    torch.manual_seed(seed)
    return model_cls(cfg_cls(**DECODER_KW)).eval()


def tiny_bert(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, num_labels=2
    )
    return BertForSequenceClassification(cfg).eval()


def token_ids(seed: int = 123, batch: int = 2, length: int = 12) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 128, (batch, length), generator=g)


@torch.no_grad()
def logits(model, ids) -> torch.Tensor:
    model.eval()
    return model(input_ids=ids).logits.detach().clone()


def adapter_param_ids(model) -> set[int]:
    return {id(p) for _, m in sora_modules(model) for p in (m.lora_A, m.lora_B, m.gate) if p is not None}


def train_steps(model, steps: int, lam: float, *, labels=None, lr: float = 1e-2, mode: str = "absolute"):
    opt = build_optimizer(model, learning_rate=lr, sparse_lambda=lam, threshold_mode=mode)
    ids = token_ids(7, batch=4, length=10)
    model.train()
    for _ in range(steps):
        if labels is None:
            loss = model(input_ids=ids, labels=ids).loss
        else:
            loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    return model


def trained_llama(steps: int = 3, lam: float = 0.3, r: int = 8):
    """A tiny Llama with q/v SoRA branches after a few steps of strong absolute-lambda training."""
    model = tiny_decoder("llama")
    inject(model, SoRAConfig(r=r, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_seed=0))
    torch.manual_seed(0)
    train_steps(model, steps, lam)
    return model


def zero_counts(model) -> dict[str, int]:
    return {n: int((m.gate == 0).sum()) for n, m in sora_modules(model)}


# ------------------------------------------------------------------ inject


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2"])
def test_inject_decoders_by_suffix(kind):
    model = tiny_decoder(kind)
    names = inject(model, SoRAConfig(r=4, target_modules=["q_proj", "v_proj"], init_seed=0))
    assert names == QV_NAMES
    assert [n for n, _ in sora_modules(model)] == QV_NAMES
    for name in QV_NAMES:
        m = model.get_submodule(name)
        assert isinstance(m, SoRALinear)
        assert isinstance(m.base_layer, nn.Linear)
        assert m.lora_A.shape == (4, 64)
        assert m.gate.shape == (4,)
        assert m.lora_B.shape == (m.base_layer.out_features, 4)
        assert torch.count_nonzero(m.lora_B) == 0
    assert model.get_submodule("model.layers.0.self_attn.v_proj").out_features == 32  # 2 kv heads x 16
    assert not isinstance(model.get_submodule("model.layers.0.self_attn.k_proj"), SoRALinear)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == adapter_param_ids(model)
    assert len(trainable) == 12
    assert model.sora_config.r == 4


def test_inject_bert_by_regex_with_classifier():
    model = tiny_bert()
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
    model = tiny_bert()
    with pytest.raises(TargetError):
        inject(model, SoRAConfig(target_modules=r"query"))
    assert not any(isinstance(m, SoRALinear) for m in model.modules())


def test_suffix_matches_whole_components_only():
    model = tiny_decoder("llama")
    with pytest.raises(TargetError) as info:
        inject(model, SoRAConfig(target_modules=["proj"]))  # q_proj ends in "proj" but not ".proj"
    assert "q_proj" in str(info.value)


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2"])
def test_b_zero_gives_base_logits(kind):
    base = tiny_decoder(kind)
    model = copy.deepcopy(base)
    inject(model, SoRAConfig(r=4, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"], init_seed=3))
    ids = token_ids()
    assert torch.equal(logits(model, ids), logits(base, ids))


def test_b_zero_gives_base_logits_bert():
    base = tiny_bert()
    model = copy.deepcopy(base)
    inject(model, SoRAConfig(r=4, target_modules=r".*\.(query|value)", modules_to_save=["classifier"], init_seed=3))
    ids = token_ids()
    assert torch.equal(logits(model, ids), logits(base, ids))


def test_target_error_when_nothing_matches_lists_linear_suffixes():
    model = tiny_decoder("llama")
    with pytest.raises(TargetError) as info:
        inject(model, SoRAConfig(target_modules=["query", "value"]))
    msg = str(info.value)
    assert "LlamaForCausalLM" in msg
    for suffix in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"):
        assert suffix in msg
    assert isinstance(info.value, ValueError)
    assert not any(isinstance(m, SoRALinear) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())  # nothing was frozen either


def test_target_error_regex_matching_nothing():
    model = tiny_bert()
    with pytest.raises(TargetError) as info:
        inject(model, SoRAConfig(target_modules=r".*\.q_proj"))
    msg = str(info.value)
    assert "query" in msg and "classifier" in msg


def test_target_error_regex_matching_only_non_linear():
    model = tiny_decoder("llama")
    with pytest.raises(TargetError, match="non-linear") as info:
        inject(model, SoRAConfig(target_modules=r"model\.layers\.\d+\.self_attn"))
    assert "model.layers.0.self_attn" in str(info.value)


def test_partially_unmatched_entry_names_the_entry():
    model = tiny_decoder("llama")
    with pytest.raises(TargetError) as info:
        inject(model, SoRAConfig(target_modules=["q_proj", "query_key_value"]))
    msg = str(info.value)
    assert "['query_key_value']" in msg
    assert "['q_proj'" not in msg  # the matched entry is not reported as unmatched
    assert not any(isinstance(m, SoRALinear) for m in model.modules())


def test_double_inject_raises():
    model = tiny_decoder("llama")
    inject(model, SoRAConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(TargetError, match="already"):
        inject(model, SoRAConfig(r=2, target_modules=["v_proj"]))
    assert [n for n, _ in sora_modules(model)] == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]


def test_bad_modules_to_save_raises_and_leaves_model_untouched():
    """A bad ``modules_to_save`` entry must be reported before the model is changed.

    FAILS at the time of writing: inject() wraps the targets and freezes the model before validating
    modules_to_save, so the error leaves a half-injected model that a corrected retry then refuses.
    """
    model = tiny_decoder("llama")
    with pytest.raises(TargetError, match="'score'"):
        inject(model, SoRAConfig(target_modules=["q_proj"], modules_to_save=["score"]))
    assert not any(isinstance(m, SoRALinear) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    inject(model, SoRAConfig(target_modules=["q_proj"]))  # the corrected retry works


def test_init_seed_independent_of_global_rng():
    base = tiny_decoder("llama")
    m1, m2 = copy.deepcopy(base), copy.deepcopy(base)
    cfg = SoRAConfig(r=4, target_modules=["q_proj", "v_proj"], init_seed=1234)
    torch.manual_seed(1)
    inject(m1, cfg)
    torch.manual_seed(999)
    torch.rand(17)
    inject(m2, cfg)
    mods1, mods2 = dict(sora_modules(m1)), dict(sora_modules(m2))
    for name in QV_NAMES:
        assert torch.equal(mods1[name].lora_A, mods2[name].lora_A)
        assert torch.equal(mods1[name].gate, mods2[name].gate)
    # per-module streams: different modules get different draws
    assert not torch.equal(mods1[QV_NAMES[0]].lora_A, mods1[QV_NAMES[2]].lora_A)
    # a different seed gives a different adapter
    m3 = copy.deepcopy(base)
    inject(m3, SoRAConfig(r=4, target_modules=["q_proj", "v_proj"], init_seed=1235))
    assert not torch.equal(dict(sora_modules(m3))[QV_NAMES[0]].lora_A, mods1[QV_NAMES[0]].lora_A)


def test_without_init_seed_follows_global_rng():
    base = tiny_decoder("llama")
    m1, m2 = copy.deepcopy(base), copy.deepcopy(base)
    cfg = SoRAConfig(r=4, target_modules=["q_proj"])
    torch.manual_seed(1)
    inject(m1, cfg)
    torch.manual_seed(2)
    inject(m2, cfg)
    name = "model.layers.0.self_attn.q_proj"
    assert not torch.equal(m1.get_submodule(name).lora_A, m2.get_submodule(name).lora_A)


def test_gate_init_ones_and_init_bounds():
    model = tiny_decoder("llama")
    inject(model, SoRAConfig(r=4, target_modules=["q_proj"], gate_init="ones", init_seed=0))
    for _, m in sora_modules(model):
        assert torch.equal(m.gate.detach(), torch.ones(4))
        assert m.lora_A.abs().max().item() <= 1 / 64**0.5
        assert m.scale == 16.0 / 4


# ------------------------------------------------------------------ compaction


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
    kept = {n: int((m.gate != 0).sum()) for n, m in sora_modules(model)}
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
        assert isinstance(m, SoRALinear)
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
    model = tiny_decoder("llama")
    inject(model, SoRAConfig(r=4, target_modules=["q_proj"], gate_init="normal", init_seed=0))
    with torch.no_grad():
        for _, m in sora_modules(model):
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


# ------------------------------------------------------------------ PEFT export


def _kill(model, name):
    with torch.no_grad():
        model.get_submodule(name).gate.zero_()


def test_export_peft_llama_round_trip(tmp_path):
    from peft import PeftModel

    base = tiny_decoder("llama")
    base_dir = tmp_path / "base"
    base.save_pretrained(base_dir)
    ids = token_ids()
    base_logits = logits(base, ids)

    model = base
    inject(model, SoRAConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_seed=0))
    torch.manual_seed(0)
    train_steps(model, 3, 0.3)
    dead = "model.layers.1.self_attn.v_proj"
    _kill(model, dead)
    kept = {n: int((m.gate != 0).sum()) for n, m in sora_modules(model)}
    assert any(0 < k < 8 for k in kept.values())
    ref = logits(model, ids)
    assert (ref - base_logits).abs().max().item() > 1e-4  # the adapter does something

    adapter_dir = tmp_path / "adapter"
    adapter_dir.mkdir()
    (adapter_dir / "stale.txt").write_text("old")
    assert export_peft(model, adapter_dir) == adapter_dir
    assert not (adapter_dir / "stale.txt").exists()  # replaced atomically, as a whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "base"]
    # export does not change the model
    assert all(m.gate is not None for _, m in sora_modules(model))
    assert (logits(model, ids) - ref).abs().max().item() == 0

    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    live = {n: k for n, k in kept.items() if k > 0}
    assert sorted(cfg["target_modules"]) == sorted(live)
    assert dead not in cfg["target_modules"]
    rank_pattern = {k.replace("\\", ""): v for k, v in cfg["rank_pattern"].items()}
    assert rank_pattern == live
    alpha_pattern = {k.replace("\\", ""): v for k, v in cfg["alpha_pattern"].items()}
    for n, k in live.items():
        assert alpha_pattern[n] / k == pytest.approx(16 / 8)
    assert cfg["task_type"] == "CAUSAL_LM"
    assert cfg["r"] == max(live.values())

    loaded = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base_dir), adapter_dir).eval()
    # PEFT built each module with the exported rank
    for n, k in live.items():
        lora_mod = loaded.base_model.model.get_submodule(n)
        assert lora_mod.lora_A["default"].weight.shape == (k, 64)
    assert not hasattr(loaded.base_model.model.get_submodule(dead), "lora_A")
    out = logits(loaded, ids)
    assert (out - ref).abs().max().item() <= 1e-5


def test_export_peft_bert_modules_to_save_round_trip(tmp_path):
    from peft import PeftModel

    base = tiny_bert()
    base_dir = tmp_path / "base"
    base.save_pretrained(base_dir)
    ids = token_ids()
    base_logits = logits(base, ids)

    model = base
    inject(
        model,
        SoRAConfig(r=4, lora_alpha=8, target_modules=r".*\.(query|value)", modules_to_save=["classifier"], init_seed=0),
    )
    head_before = model.classifier.weight.detach().clone()
    labels = torch.tensor([0, 1, 1, 0])
    torch.manual_seed(0)
    train_steps(model, 3, 0.2, labels=labels, lr=5e-2)
    assert not torch.equal(model.classifier.weight.detach(), head_before)  # the head was trained
    ref = logits(model, ids)
    assert (ref - base_logits).abs().max().item() > 1e-4

    adapter_dir = tmp_path / "adapter"
    export_peft(model, adapter_dir)
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert cfg["task_type"] == "SEQ_CLS"
    assert "classifier" in cfg["modules_to_save"]

    loaded = PeftModel.from_pretrained(BertForSequenceClassification.from_pretrained(base_dir), adapter_dir).eval()
    # the trained classifier must come back (through PEFT's modules_to_save wrapper)
    loaded_head = loaded.base_model.model.classifier
    active = loaded_head.modules_to_save["default"] if hasattr(loaded_head, "modules_to_save") else loaded_head
    torch.testing.assert_close(active.weight.detach(), model.classifier.weight.detach(), rtol=0, atol=0)
    torch.testing.assert_close(active.bias.detach(), model.classifier.bias.detach(), rtol=0, atol=0)
    out = logits(loaded, ids)
    assert (out - ref).abs().max().item() <= 1e-5


def test_peft_adapter_errors():
    plain = tiny_decoder("llama")
    with pytest.raises(ValueError, match="sora_config"):
        peft_adapter(plain)
    model = tiny_decoder("llama")
    inject(model, SoRAConfig(r=2, target_modules=["q_proj"], init_seed=0))
    for name, _ in list(sora_modules(model)):
        _kill(model, name)
    with pytest.raises(ValueError, match="pruned"):
        peft_adapter(model)


def test_save_merged_round_trip(tmp_path):
    model = trained_llama()
    _kill(model, "model.layers.0.self_attn.q_proj")
    ids = token_ids()
    ref = logits(model, ids)
    out_dir = tmp_path / "merged"
    assert save_merged(model, out_dir) == out_dir
    # merged in place: plain transformers model, no SoRA left
    assert not any(isinstance(m, SoRALinear) for m in model.modules())
    assert not hasattr(model, "sora_config")
    assert (logits(model, ids) - ref).abs().max().item() <= 1e-5
    loaded = LlamaForCausalLM.from_pretrained(out_dir).eval()
    assert set(loaded.state_dict()) == set(tiny_decoder("llama").state_dict())
    assert not any("lora" in k or "gate" in k.split(".")[-1] for k in loaded.state_dict())
    out = logits(loaded, ids)
    assert (out - ref).abs().max().item() <= 1e-5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


# ------------------------------------------------------------------ atomic_dir


def _listing(d):
    return sorted(p.name for p in d.iterdir())


def test_atomic_dir_success_replaces_old_content(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with atomic_dir(target) as tmp:
        assert tmp.parent == target.parent
        assert tmp != target
        assert (target / "old.txt").read_text() == "old"  # old content still in place during the write
        (tmp / "new.txt").write_text("new")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "x.bin").write_bytes(b"\x00\x01")
    assert _listing(target) == ["new.txt", "sub"]
    assert (target / "new.txt").read_text() == "new"
    assert (target / "sub" / "x.bin").read_bytes() == b"\x00\x01"
    assert _listing(tmp_path) == ["out"]  # no temp or .old directory left


def test_atomic_dir_exception_keeps_old_content(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_dir(target) as tmp:
            (tmp / "partial.txt").write_text("half")
            raise RuntimeError("boom")
    assert _listing(target) == ["old.txt"]
    assert (target / "old.txt").read_text() == "old"
    assert _listing(tmp_path) == ["out"]


def test_atomic_dir_keyboard_interrupt_cleans_up(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(target) as tmp:
            (tmp / "partial.txt").write_text("half")
            raise KeyboardInterrupt
    assert _listing(target) == ["old.txt"]
    assert _listing(tmp_path) == ["out"]


def test_atomic_dir_new_target_and_failed_new_target(tmp_path):
    target = tmp_path / "nested" / "out"
    with pytest.raises(ValueError):
        with atomic_dir(target) as tmp:
            (tmp / "a").write_text("a")
            raise ValueError("fail")
    assert not target.exists()
    assert _listing(tmp_path / "nested") == []
    with atomic_dir(target) as tmp:
        (tmp / "a").write_text("a")
    assert _listing(target) == ["a"]
    assert _listing(tmp_path / "nested") == ["out"]


def test_atomic_dir_removes_stale_old_dir(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "v1").write_text("1")
    stale = tmp_path / ".out.old"
    stale.mkdir()
    (stale / "junk").write_text("junk")
    with atomic_dir(target) as tmp:
        (tmp / "v2").write_text("2")
    assert _listing(target) == ["v2"]
    assert _listing(tmp_path) == ["out"]
