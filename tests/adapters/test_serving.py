"""Every export format through every serving engine's loading rules (tests/serving_loaders.py): a format an engine
loads gives the trained model's logits, one it refuses is refused by the emulation too, and the verdicts written in
serving.json (sora_ds.adapters.serving.compatibility) are what the emulations do."""

from __future__ import annotations

import json

import pytest
import torch

from sora_ds import AdaLoRAConfig, SoRAConfig, inject
from sora_ds.adapters.inject import adapter_layers
from sora_ds.adapters.serving import (
    SERVING_FILE,
    compatibility,
    convert_adapter,
    export_format,
    serving_cost,
    vllm_max_lora_rank,
)
from sora_ds.adapters.compact import rank_report
from tests.serving_loaders import LOADERS, Refused, load_sglang, sglang_parser
from tests.support import build_bert, build_decoder, logits, token_ids, train_steps, trained_llama

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("single_thread")]

DEAD = "model.layers.1.self_attn.v_proj"


def _sora_pruned_module():
    """SoRA with uneven kept ranks and one module pruned whole."""
    model = trained_llama()
    with torch.no_grad():
        model.get_submodule(DEAD).gate.zero_()
    return model, lambda: build_decoder("llama").eval()


def _sora_equal_ranks():
    """No pruning: every module keeps rank 8, so even the compact export has one rank."""
    return trained_llama(lam=0.0), lambda: build_decoder("llama").eval()


def _per_module_scale():
    """One module with its own scale (what vLLM's single lora_alpha / r cannot express)."""
    model = trained_llama()
    model.get_submodule("model.layers.0.self_attn.q_proj").scale *= 2
    return model, lambda: build_decoder("llama").eval()


def _adalora():
    """AdaLoRA triplets after allocation: each module keeps a different number of singular values."""
    model = build_decoder("llama").eval()
    inject(model, AdaLoRAConfig(r=6, target_r=4, lora_alpha=12, target_modules=["q_proj", "v_proj"], init_seed=0))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for i, (_, m) in enumerate(adapter_layers(model)):
            m.gate.copy_(torch.randn(6, generator=g))
            m.gate[: i + 1] = 0  # keeps 5, 4, 3, 2
            m.lora_A.mul_(20)  # AdaLoRA's N(0, 0.02) init alone barely moves the logits
    return model, lambda: build_decoder("llama").eval()


def _modules_to_save():
    """A BERT classifier whose head is trained in full beside the adapter."""
    model = build_bert().eval()
    inject(model, SoRAConfig(r=4, lora_alpha=8, target_modules=r".*\.(query|value)", modules_to_save=["classifier"],
                             init_seed=0))
    torch.manual_seed(0)
    train_steps(model, 3, 0.2, labels=torch.tensor([0, 1, 1, 0]), lr=5e-2)
    return model, lambda: build_bert().eval()


# What each engine does with each format (the first word of the verdict): README "Serving the adapter" cites these.
CASES = {
    "sora_pruned_module": (_sora_pruned_module, {
        "peft": {"peft": "loads", "vllm": "loads", "sglang": "refused", "lorax": "refused"},
        "uniform": dict.fromkeys(LOADERS, "loads"), "vllm": dict.fromkeys(LOADERS, "loads")}),
    "sora_equal_ranks": (_sora_equal_ranks, {
        "peft": dict.fromkeys(LOADERS, "loads"),
        "uniform": dict.fromkeys(LOADERS, "loads"), "vllm": dict.fromkeys(LOADERS, "loads")}),
    "per_module_scale": (_per_module_scale, {
        "peft": {"peft": "loads", "vllm": "wrong", "sglang": "refused", "lorax": "refused"},
        "uniform": dict.fromkeys(LOADERS, "loads"), "vllm": dict.fromkeys(LOADERS, "loads")}),
    "adalora": (_adalora, {
        "peft": {"peft": "loads", "vllm": "loads", "sglang": "refused", "lorax": "refused"},
        "uniform": dict.fromkeys(LOADERS, "loads"), "vllm": dict.fromkeys(LOADERS, "loads")}),
    "modules_to_save": (_modules_to_save, {
        "peft": {"peft": "loads", "vllm": "refused", "sglang": "refused", "lorax": "refused"},
        "uniform": {"peft": "loads", "vllm": "refused", "sglang": "wrong", "lorax": "wrong"},
        "vllm": {"peft": "loads", "vllm": "refused", "sglang": "wrong", "lorax": "wrong"}}),
}


def _check_engine(folder, make_base, ref, ids, engine: str, verdict: str) -> None:
    """The emulation of ``engine`` does what ``verdict`` says: refuses, or loads with the trained logits (<= 1e-4),
    or loads with other logits."""
    if verdict.startswith("refused"):
        with pytest.raises(Refused):
            LOADERS[engine](folder, make_base())
        return
    diff = (logits(LOADERS[engine](folder, make_base()), ids) - ref).abs().max().item()
    if verdict.startswith("loads"):
        assert diff <= 1e-4, (engine, verdict, diff)
    else:
        assert diff > 1e-4, (engine, verdict, diff)


@pytest.mark.parametrize("fmt", ["peft", "uniform", "vllm"])
@pytest.mark.parametrize("case", list(CASES))
def test_format_through_every_engine(tmp_path, case, fmt):
    build, expected = CASES[case]
    model, make_base = build()
    ids = token_ids()
    ref = logits(model, ids)
    assert (ref - logits(make_base(), ids)).abs().max().item() > 1e-3  # the adapter does something

    folder = tmp_path / fmt
    record = export_format(model, fmt, folder)
    assert json.loads((folder / SERVING_FILE).read_text()) == record
    assert {e: v.split(":")[0].split(" ")[0] for e, v in record["engines"].items()} == expected[fmt]
    for engine, verdict in record["engines"].items():
        _check_engine(folder, make_base, ref, ids, engine, verdict)
    if fmt != "peft":
        config = json.loads((folder / "adapter_config.json").read_text())
        assert config["r"] == config["lora_alpha"] and not config["rank_pattern"] and not config["alpha_pattern"]


@pytest.mark.parametrize("fmt", ["uniform", "vllm"])
def test_convert_compact_folder_equals_export_from_model(tmp_path, fmt):
    """`sora-ds export --format` converts the compact folder (no model): the pruned module comes back as zeros
    from its siblings, and the files equal the export from the model."""
    from safetensors.torch import load_file

    model, _ = _sora_pruned_module()
    export_format(model, "peft", tmp_path / "compact")
    direct = export_format(model, fmt, tmp_path / "direct")
    (tmp_path / "converted").mkdir()
    converted = convert_adapter(tmp_path / "compact", fmt, tmp_path / "converted")
    assert converted == direct
    a, b = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("direct", "converted"))
    assert a.keys() == b.keys() and f"base_model.model.{DEAD}.lora_A.weight" in a
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not a[f"base_model.model.{DEAD}.lora_B.weight"].any()


def test_vllm_rank_buckets():
    assert [vllm_max_lora_rank(r) for r in (1, 2, 8, 9, 300, 320, 321, 512)] == [1, 8, 8, 16, 320, 320, 512, 512]
    with pytest.raises(ValueError, match="512"):
        vllm_max_lora_rank(513)


def test_vllm_format_pads_to_the_bucket(tmp_path):
    model, _ = _sora_pruned_module()
    record = export_format(model, "vllm", tmp_path / "v")
    top = max(r["kept"] for r in rank_report(model).values())
    assert record["r"] == vllm_max_lora_rank(top) and record["engines"]["vllm"] == f"loads with max_lora_rank={record['r']}"


def test_merged_format_is_plain_weights(tmp_path):
    from transformers import LlamaForCausalLM

    model, _ = _sora_pruned_module()
    ids = token_ids()
    ref = logits(model, ids)
    assert export_format(model, "merged", tmp_path / "merged") is None
    assert (logits(LlamaForCausalLM.from_pretrained(tmp_path / "merged"), ids) - ref).abs().max().item() <= 1e-4


def test_compatibility_rules_from_config_only():
    """The verdicts need only the config and tensor shapes (no weights): uneven ranks, patterns, modules_to_save."""
    p = "base_model.model.model.layers.{}.self_attn.q_proj.lora_{}.weight"
    shapes = {p.format(0, "A"): (4, 64), p.format(0, "B"): (64, 4), p.format(1, "A"): (2, 64), p.format(1, "B"): (64, 2)}
    config = {"r": 4, "lora_alpha": 8, "rank_pattern": {"layers.1.self_attn.q_proj": 2},
              "alpha_pattern": {"layers.1.self_attn.q_proj": 4}}
    got = compatibility(config, shapes)
    assert got["vllm"] == "loads with max_lora_rank=8"
    assert got["sglang"].startswith("refused") and got["lorax"].startswith("refused")
    assert compatibility({**config, "modules_to_save": ["lm_head"]}, shapes)["vllm"].startswith("refused")


def test_serving_cost_counts():
    report = {"a": {"initial": 8, "kept": 3}, "b": {"initial": 8, "kept": 0}}
    shapes = {"a": (64, 32), "b": (64, 64)}
    cost = serving_cost(report, shapes, bytes_per_param=4)
    assert cost["max_kept_rank"] == 3 and cost["vllm_max_lora_rank"] == 8
    assert cost["flops_per_token"] == {"kept": 2 * 3 * 96, "padded": 2 * 8 * (96 + 128), "unpruned": 2 * 8 * (96 + 128)}
    assert cost["adapter_bytes"]["kept"] == 4 * 3 * 96


def test_real_sglang_parser(tmp_path):
    """SGLang's own LoRAConfig (pip install --no-deps sglang) parses both formats; the compact one with uneven ranks
    is refused, the uniform one loads with the trained logits."""
    parser = sglang_parser()
    if parser is None:
        pytest.skip("sglang is not installed (pip install --no-deps sglang)")
    model, make_base = _sora_pruned_module()
    ids = token_ids()
    ref = logits(model, ids)
    for fmt in ("peft", "uniform"):
        export_format(model, fmt, tmp_path / fmt)
        parsed = parser(str(tmp_path / fmt))
        assert (parsed.r, parsed.lora_alpha) == tuple(json.loads((tmp_path / fmt / "adapter_config.json").read_text())[k]
                                                      for k in ("r", "lora_alpha"))
    with pytest.raises(Refused):
        load_sglang(tmp_path / "peft", make_base(), use_real_parser=True)
    got = logits(load_sglang(tmp_path / "uniform", make_base(), use_real_parser=True), ids)
    assert (got - ref).abs().max().item() <= 1e-4
