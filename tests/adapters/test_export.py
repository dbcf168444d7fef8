"""export_peft / save_merged: PEFT reloads the adapter (and merges it) to the trained model's outputs."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import BertForSequenceClassification, LlamaForCausalLM

from sora_ds import GatedLoRALinear, SoRAConfig, export_peft, inject, save_merged
from sora_ds.adapters.export import peft_adapter
from sora_ds.adapters.inject import adapter_layers
from tests.support import (
    build_bert,
    build_decoder,
    logits,
    token_ids,
    train_steps,
    trained_llama,
)

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("single_thread")]

QV_NAMES = [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
BERT_QV = [f"bert.encoder.layer.{i}.attention.self.{p}" for i in range(2) for p in ("query", "value")]


def _kill(model, name):
    with torch.no_grad():
        model.get_submodule(name).gate.zero_()


def test_export_peft_llama_round_trip(tmp_path):
    from peft import PeftModel

    base = build_decoder("llama").eval()
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
    kept = {n: int((m.gate != 0).sum()) for n, m in adapter_layers(model)}
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
    assert all(m.gate is not None for _, m in adapter_layers(model))
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


def test_export_peft_records_the_base_so_auto_peft_loads_it_alone(tmp_path):
    from peft import AutoPeftModelForCausalLM

    build_decoder("llama").save_pretrained(tmp_path / "base")
    model = LlamaForCausalLM.from_pretrained(tmp_path / "base").eval()
    inject(model, SoRAConfig(r=4, target_modules=["q_proj", "v_proj"], init_seed=0))
    torch.manual_seed(0)
    train_steps(model, 2, 0.3)
    export_peft(model, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tmp_path / "base")
    loaded = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter").eval()
    assert (logits(loaded, token_ids()) - logits(model, token_ids())).abs().max().item() <= 1e-5
    # an explicit path wins; a model built from a config records none
    export_peft(model, tmp_path / "named", base_model_name_or_path="org/model")
    assert json.loads((tmp_path / "named" / "adapter_config.json").read_text())["base_model_name_or_path"] == "org/model"
    built = build_decoder("llama")
    inject(built, SoRAConfig(r=4, target_modules=["q_proj"]))
    assert peft_adapter(built)[0].base_model_name_or_path is None


def test_export_peft_bert_modules_to_save_round_trip(tmp_path):
    from peft import PeftModel

    base = build_bert().eval()
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
    plain = build_decoder("llama").eval()
    with pytest.raises(ValueError, match="adapter_config"):
        peft_adapter(plain)
    model = build_decoder("llama").eval()
    inject(model, SoRAConfig(r=2, target_modules=["q_proj"], init_seed=0))
    for name, _ in list(adapter_layers(model)):
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
    assert not any(isinstance(m, GatedLoRALinear) for m in model.modules())
    assert not hasattr(model, "adapter_config")
    assert (logits(model, ids) - ref).abs().max().item() <= 1e-5
    loaded = LlamaForCausalLM.from_pretrained(out_dir).eval()
    assert set(loaded.state_dict()) == set(build_decoder("llama").eval().state_dict())
    assert not any("lora" in k or "gate" in k.split(".")[-1] for k in loaded.state_dict())
    out = logits(loaded, ids)
    assert (out - ref).abs().max().item() <= 1e-5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


