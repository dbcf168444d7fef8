"""Sequence packing: rows fill up, nothing is lost, and a packed example trains exactly as it would alone."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from sora_ds.data.chat import IGNORE_INDEX, build_datasets, collate
from sora_ds.data.packing import pack_examples
from sora_ds.data.tokenizer import build_byte_tokenizer
from sora_ds.recipe.train import train
from sora_ds.recipe.config import TINY_LLAMA, load_config

pytestmark = pytest.mark.unit


def rows(lengths):
    return [{"input_ids": [100 + i] * n, "labels": [IGNORE_INDEX] + [200 + i] * (n - 1)} for i, n in enumerate(lengths)]


def test_best_fit_decreasing_fills_rows_and_keeps_every_token():
    examples = rows([7, 3, 5, 2, 9, 4, 1, 6])
    packed = pack_examples(examples, max_length=10)
    assert [len(r["input_ids"]) for r in packed] == [10, 10, 10, 7]  # 37 tokens in 4 rows of 10
    assert sorted(t for r in packed for t in r["input_ids"]) == sorted(t for e in examples for t in e["input_ids"])
    for r in packed:
        starts = [j for j, p in enumerate(r["position_ids"]) if p == 0]
        assert all(r["labels"][j] == IGNORE_INDEX for j in starts)  # never predicted across a boundary
        assert len(r["labels"]) == len(r["position_ids"]) == len(r["input_ids"])
    with pytest.raises(ValueError, match=r"longer than max_length=4"):
        pack_examples(rows([5]), max_length=4)


def test_packed_examples_get_the_logits_they_get_alone():
    """position_ids restarting per example, no attention mask and no KV cache (as the recipe runs): block-diagonal
    attention and each example's own rotary positions. With a cache transformers skips the packed-sequence mask."""
    tok = build_byte_tokenizer()
    train_ds = build_datasets(None, tok, 64, 0, 0).train
    singles = [train_ds[i] for i in range(3)]
    packed = pack_examples([{"input_ids": s["input_ids"], "labels": s["labels"]} for s in singles], 200)
    assert len(packed) == 1
    cfg = {k: v for k, v in TINY_LLAMA.items() if k != "model_type"}
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), use_cache=False, **cfg)).eval()
    batch = collate(packed, pad_token_id=tok.pad_token_id)
    assert "attention_mask" not in batch
    with torch.no_grad():
        together = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0]
        offset = 0
        for i in range(3):  # a row keeps data order inside
            ids = torch.tensor([singles[i]["input_ids"]])
            alone = model(input_ids=ids).logits[0]
            torch.testing.assert_close(together[offset : offset + ids.shape[1]], alone, rtol=1e-4, atol=1e-5)
            offset += ids.shape[1]


def test_recipe_trains_packed(tmp_path):
    args = ["--max_steps", "4", "--log_every", "1", "--packing", "true", "--max_length", "256",
            "--output_dir", str(tmp_path)]
    model, summary = train(load_config(args))  # the SoRAConfig default targets: q_proj, v_proj
    assert model.config.use_cache is False  # else the packed rows would attend across examples
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(r["loss"] == r["loss"] and r["loss"] > 0 for r in records)  # finite, trained
    assert summary["final_eval_loss"] == summary["final_eval_loss"]
