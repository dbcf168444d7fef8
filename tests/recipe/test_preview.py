"""``sora-ds preview``: training examples as the model sees them, trained tokens marked, without loading a model."""

from __future__ import annotations

import pytest

from sora_ds.data.chat import BUILTIN_DATASET, tokenize_chat
from sora_ds.data.preview import marked_text
from sora_ds.data.tokenizer import build_byte_tokenizer
from sora_ds.recipe import cli
from tests.data.test_chat import chat

BUILTIN_LINE_1 = f"{BUILTIN_DATASET}, line 1"  # {"messages": [user "repeat: owl", assistant "owl owl"]}


def test_trained_runs_are_bracketed_or_green():
    tok = build_byte_tokenizer()
    row = tokenize_chat([*chat("hi", "yo"), *chat("more", "ok")], tok, 64)
    assert marked_text(row, tok) == ("<s><|user|>\nhi<|end|><|assistant|>\n⟦yo<|end|>⟧<|user|>\nmore<|end|>"
                                     "<|assistant|>\n⟦ok<|end|>⟧")
    assert marked_text(row, tok, color=True).endswith("<|assistant|>\n\x1b[1;32mok<|end|>\x1b[0m")


@pytest.fixture
def no_model(monkeypatch):
    """Any attempt to load or build a model fails the test."""
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("preview loaded a model")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_config", refuse)


def test_preview_prints_the_builtin_examples_after_truncation(capsys, no_model):
    assert cli.main(["preview", "-n", "2", "--max_length", "16"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == ("dataset built-in tiny_chat.jsonl, training split (eval_size 0.1, seed 42); max_length 16, "
                        "truncation keep_answer; chat template: the tokenizer's own")
    assert lines[1] == "trained tokens (label != -100) are marked ⟦like this⟧; everything else is context the loss ignores"
    # 25 tokens: bos kept, the prompt cut from the left until the answer fits
    assert lines[3:7] == [f"--- example 1, {BUILTIN_LINE_1}: 16 tokens, 8 trained, truncated to max_length=16 "
                          "(keep_answer)", "<s> owl<|end|><|assistant|>", "⟦owl owl<|end|>⟧", ""]
    assert lines[7].startswith("--- example 2, ") and len(lines) == 10


def test_preview_shows_dropped_examples_and_overrides(capsys, tmp_path, no_model):
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")
    assert cli.main(["preview", "-n", "1", "--max_length", "8", "--truncation", "keep_start",
                     "--chat_template", str(template), "--eval_size", "0"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith("truncation keep_start; chat template: the chat_template key")
    assert lines[3:] == [f"--- example 1, {BUILTIN_LINE_1}: 8 tokens, 0 trained, DROPPED: no trained token left "
                         "within max_length=8 (truncation: keep_start)", "user: re"]


def test_preview_errors_are_one_line(capsys, tmp_path):
    assert cli.main(["preview", "--max_lenth", "16"]) == 2
    assert capsys.readouterr().err == ("sora-ds preview: max_lenth (from command line) is not a config key for method: "
                                       "sora; did you mean ['max_length']?\n")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"conversations": [{"from": "bot", "value": "x"}]}\n')
    assert cli.main(["preview", "--dataset", str(bad)]) == 2
    assert capsys.readouterr().err == (f"sora-ds preview: {bad}, line 1: 'conversations'[0].from is 'bot'; allowed: "
                                       "human, gpt, system, user, assistant\n")
    with pytest.raises(SystemExit):
        cli.main(["report", "x", "--max_length", "16"])  # only preview takes config keys
