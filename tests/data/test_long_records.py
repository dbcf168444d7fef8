"""Records far longer than max_length: the work is bounded by max_length and the rows are exactly those of
tokenizing the whole conversation and truncating it, for each truncation."""

from __future__ import annotations

import json
import tracemalloc

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from sora_ds.data.chat import CHARS_PER_TOKEN, build_datasets, encode_chat, tokenize_chat
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
    "long prompt, short answer": [*chat(text(LONG), "first"), *chat(text(LONG, "dé日 "), "the answer")],
    "long prompt, long answer": chat(text(LONG), text(LONG, "answer ")),
    "user turn after the answer": [*chat(text(LONG), "a"), {"role": "user", "content": text(LONG)}],
    "many turns, long last answer": [*(m for i in range(150) for m in chat(f"q{i}", f"a{i}")), *chat("q", text(LONG))],
}


def strict_tokenizer() -> PreTrainedTokenizerFast:
    """Bytes, with a template like Mistral's and SmolLM2's: user and assistant turns must alternate (so cutting
    the prompt may not drop a turn), and a default system prompt when the first turn is not a system one."""
    tok = build_byte_tokenizer()
    tok.chat_template = (
        "{{ bos_token }}{% if messages[0]['role'] != 'system' %}<|system|>\nYou are helpful.<|end|>{% endif %}"
        "{% for m in messages %}{% if m['role'] != 'system' and (m['role'] == 'user') != (loop.index0 % 2 == "
        "(1 if messages[0]['role'] == 'system' else 0)) %}{{ raise_exception('roles must alternate') }}{% endif %}"
        "<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    )
    return tok


TOKENIZERS = {"bytes": build_byte_tokenizer, "words": word_tokenizer, "strict": strict_tokenizer}


def whole(messages, tok) -> dict[str, list[int]]:
    """The whole conversation's row: no cut (the budget is max_length * CHARS_PER_TOKEN characters)."""
    return tokenize_chat(messages, tok, 10**9)


def whole_then_truncated(messages, tok, max_length):
    """The keep_start reference: the whole row's first max_length tokens."""
    return {key: values[:max_length] for key, values in whole(messages, tok).items()}


def whole_then_answer_kept(messages, tok, max_length):
    """The keep_answer reference, on the whole row: bos, then the last max_length - 1 tokens when the last
    supervised run (and what follows) fits in them; else the last quarter of them before that run and its start."""
    row = whole(messages, tok)
    ids, labels = row["input_ids"], row["labels"]
    if len(ids) <= max_length:
        return row
    head = int(ids[0] == tok.bos_token_id)
    room = max_length - head
    answer = max(i for i, label in enumerate(labels) if label != -100 and (i == 0 or labels[i - 1] == -100))
    if len(ids) - answer <= room:
        start = len(ids) - room
    else:
        start = answer - min(room // 4, answer - head)
    return {key: values[:head] + values[start:start + room] for key, values in row.items()}


REFERENCES = {"keep_start": whole_then_truncated, "keep_answer": whole_then_answer_kept}


@pytest.mark.parametrize("name", CONVERSATIONS)
@pytest.mark.parametrize("make_tokenizer", TOKENIZERS.values(), ids=TOKENIZERS)
@pytest.mark.parametrize("truncation", REFERENCES)
def test_cut_conversation_gives_the_truncated_whole_one(name, make_tokenizer, truncation):
    tok = make_tokenizer()
    messages = CONVERSATIONS[name]
    if make_tokenizer is strict_tokenizer and name == "long question":
        messages = messages[1:]  # its system turn then user turns: the strict template needs them to alternate
    for max_length in (MAX_LENGTH, 3 * MAX_LENGTH):
        row, truncated = encode_chat(messages, tok, max_length, truncation)
        assert row == REFERENCES[truncation](messages, tok, max_length)
        assert truncated == (len(whole(messages, tok)["input_ids"]) > max_length)


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
    assert train[0] == whole_then_answer_kept(chat("q", answer[:LONG]), tok, MAX_LENGTH)
    assert counts == {"records": 2, "train": {"examples": 2, "truncated": 1, "dropped": 0},
                      "eval": {"examples": 0, "truncated": 0, "dropped": 0}}


def test_huge_prompt_uses_little_memory_with_keep_answer(tmp_path):
    tok = build_byte_tokenizer()
    question = text(20 * 2**20)
    path = tmp_path / "huge.jsonl"
    path.write_text(json.dumps({"messages": [*chat(question, "a1"), *chat(question, "a2")]}) + "\n")
    tracemalloc.start()
    try:
        train = build_datasets(path, tok, max_length=MAX_LENGTH).train
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 200 * 2**20
    short = question[-LONG:]
    assert train[0] == whole_then_answer_kept([*chat(short, "a1"), *chat(short, "a2")], tok, MAX_LENGTH)
