"""Records far longer than max_length: the work is bounded by max_length and the rows are exactly those of
tokenizing the whole conversation and truncating it."""

from __future__ import annotations

import json
import tracemalloc

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from sora_ds.data.chat import CHARS_PER_TOKEN, build_datasets, tokenize_chat
from sora_ds.data.tokenizer import (
    BOS,
    CHAT_TEMPLATE,
    PAD,
    SPECIAL_TOKENS,
    build_byte_tokenizer,
)
from tests.data.test_chat import chat

MAX_LENGTH = 64
LONG = 5 * CHARS_PER_TOKEN * MAX_LENGTH  # characters: well past the first cut


def word_tokenizer() -> PreTrainedTokenizerFast:
    """One token per whitespace-separated word however long (all unknown): far more than CHARS_PER_TOKEN
    characters per token, so the first cut is too short and has to be widened."""
    backend = Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.add_special_tokens(SPECIAL_TOKENS)
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=PAD, bos_token=BOS, unk_token="<unk>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


def text(n: int, word: str = "lorem ipsum dolor ") -> str:
    return (word * (n // len(word) + 1))[:n]


CONVERSATIONS = {
    "long answer": chat("question", text(LONG)),
    "long question": [{"role": "system", "content": "sys"}, *chat(text(LONG), "a"), *chat("q2", "a2")],
    "long middle answer": [*chat("q", "short"), *chat("q2", text(LONG, "dé日 ")), *chat("q3", "a3")],
    "many short turns": [m for i in range(150) for m in chat(f"q{i}", f"answer {i}")],
    "words of 100 characters": chat("q", text(20 * LONG, "x" * 100 + " ")),
    "answer cut inside a word": chat("q", "a" * (CHARS_PER_TOKEN * MAX_LENGTH - 20) + " " + "b" * 200 + " end"),
}


def whole_then_truncated(messages, tok, max_length):
    """The reference: no cut (the budget is max_length * CHARS_PER_TOKEN characters), then truncation."""
    row = tokenize_chat(messages, tok, 10**9)
    return {key: values[:max_length] for key, values in row.items()}


@pytest.mark.parametrize("name", CONVERSATIONS)
@pytest.mark.parametrize("make_tokenizer", [build_byte_tokenizer, word_tokenizer], ids=["bytes", "words"])
def test_cut_conversation_gives_the_truncated_whole_one(name, make_tokenizer):
    tok = make_tokenizer()
    messages = CONVERSATIONS[name]
    for max_length in (MAX_LENGTH, 3 * MAX_LENGTH):
        assert tokenize_chat(messages, tok, max_length) == whole_then_truncated(messages, tok, max_length)


def test_huge_answer_uses_little_memory_and_is_counted(tmp_path):
    tok = build_byte_tokenizer()
    answer = text(20 * 2**20)
    path = tmp_path / "huge.jsonl"
    path.write_text(json.dumps({"prompt": "q", "response": answer}) + "\n" + json.dumps({"prompt": "q", "response": "a"}))
    tracemalloc.start()
    try:
        train, _, counts = build_datasets(path, tok, max_length=MAX_LENGTH)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # The file's bytes, the decoded line and the parsed answer (20 MB each); tokenizing 20 MB with offsets would
    # take gigabytes.
    assert peak < 200 * 2**20
    assert train[0] == whole_then_truncated(chat("q", answer[:LONG]), tok, MAX_LENGTH)
    assert counts == {"records": 2, "truncated": 1, "dropped": 0, "train_examples": 2, "eval_examples": 0}
