"""Tests for the byte tokenizer, the built-in chat data and the data loader."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch
from transformers import AutoTokenizer

from sora_ds.data.chat import (
    BUILTIN_DATASET,
    TRUNCATIONS,
    DataError,
    build_datasets,
    collate,
    encode_chat,
    load_records,
    split_records,
    to_messages,
    tokenize_chat,
)
from sora_ds.data.tokenizer import END_OF_TURN, SPECIAL_TOKENS, build_byte_tokenizer

from tests.support import REPO
TEXTS = ["hello world", "  leading spaces", "tabs\tand\nnewlines\n", "héllo wörld 🎉 日本", ""]


@pytest.fixture(scope="module")
def tok():
    return build_byte_tokenizer()


def chat(q: str = "hi", a: str = "yo") -> list[dict]:
    return [{"role": "user", "content": q}, {"role": "assistant", "content": a}]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def supervised_spans(row: dict) -> list[list[int]]:
    """Maximal runs of label != -100, as token lists."""
    spans, current = [], []
    for label in row["labels"]:
        if label == -100:
            if current:
                spans.append(current)
            current = []
        else:
            current.append(label)
    return spans + ([current] if current else [])


class NoTokenizer:
    """Fails loudly if anything tries to tokenize."""

    def __getattr__(self, name):
        raise AssertionError(f"tokenizer used ({name}) before the data was validated")

    def __call__(self, *args, **kwargs):
        raise AssertionError("tokenizer called before the data was validated")


# ---------------------------------------------------------------- tokenizer


def test_tokenizer_vocab_and_special_tokens(tok):
    assert len(tok) <= 280
    assert len(tok) == 256 + len(SPECIAL_TOKENS)
    ids = tok.convert_tokens_to_ids(SPECIAL_TOKENS)
    assert len(set(ids)) == len(SPECIAL_TOKENS)
    assert (tok.pad_token, tok.bos_token, tok.eos_token) == ("<pad>", "<s>", "</s>")
    assert tok.pad_token_id != tok.eos_token_id
    # A special token in text is one token, not its bytes.
    assert tok(END_OF_TURN, add_special_tokens=False)["input_ids"] == [tok.convert_tokens_to_ids(END_OF_TURN)]


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_round_trip_one_token_per_byte(tok, text):
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text.encode("utf-8"))  # no merges, no prefix space
    assert tok.decode(ids) == text


def test_tokenizer_is_deterministic_and_adds_no_prefix_space(tok):
    again = build_byte_tokenizer()
    assert tok.get_vocab() == again.get_vocab()
    assert tok("a", add_special_tokens=False)["input_ids"] == tok.convert_tokens_to_ids(["a"])


def test_tokenizer_save_load_round_trip(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert len(loaded) == len(tok)
    assert loaded.get_vocab() == tok.get_vocab()
    assert loaded.chat_template == tok.chat_template
    assert (loaded.pad_token_id, loaded.bos_token_id, loaded.eos_token_id) == (
        tok.pad_token_id, tok.bos_token_id, tok.eos_token_id)
    for text in TEXTS:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert loaded(text, add_special_tokens=False)["input_ids"] == ids
        assert loaded.decode(ids) == text
    msgs = chat()
    assert loaded.apply_chat_template(msgs, tokenize=False) == tok.apply_chat_template(msgs, tokenize=False)


def test_chat_template_render(tok):
    msgs = [{"role": "system", "content": "Be brief."}] + chat("hi", "yo")
    assert tok.apply_chat_template(msgs, tokenize=False) == (
        "<s><|system|>\nBe brief.<|end|><|user|>\nhi<|end|><|assistant|>\nyo<|end|>")
    assert tok.apply_chat_template(msgs[:2], tokenize=False, add_generation_prompt=True) == (
        "<s><|system|>\nBe brief.<|end|><|user|>\nhi<|end|><|assistant|>\n")


# ------------------------------------------------------------- tokenize_chat


def test_labels_cover_exactly_assistant_content_and_end_token(tok):
    msgs = [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo there"},
        {"role": "user", "content": "more"},
        {"role": "assistant", "content": "ok"},
    ]
    row = tokenize_chat(msgs, tok, max_length=128)
    assert row["input_ids"] == tok.apply_chat_template(msgs, return_dict=False)
    assert row["attention_mask"] == [1] * len(row["input_ids"])
    for label, tid in zip(row["labels"], row["input_ids"]):
        assert label in (-100, tid)
    assert [tok.decode(s) for s in supervised_spans(row)] == ["yo there<|end|>", "ok<|end|>"]


def test_labels_generic_template_without_generation_markers(tok):
    """A Llama-3-like template (headers, trim, no {% generation %})."""
    template = (
        "{{ bos_token }}{% for m in messages %}<|system|>{{ m['role'] }}\n\n"
        "{{ m['content'] | trim }}<|end|>{% endfor %}"
        "{% if add_generation_prompt %}<|system|>assistant\n\n{% endif %}"
    )
    msgs = chat("question?", "  answer ") + [{"role": "user", "content": "q2"},
                                             {"role": "assistant", "content": "a2"}]
    row = tokenize_chat(msgs, _with_template(tok, template), max_length=128)
    assert [tok.decode(s) for s in supervised_spans(row)] == ["answer<|end|>", "a2<|end|>"]


def _with_template(tok, template):
    other = build_byte_tokenizer()
    other.chat_template = template
    return other


def test_template_that_rewrites_history_is_rejected(tok):
    unstable = "{{ messages | length }}" + tok.chat_template
    with pytest.raises(DataError, match="prefix-stable"):
        tokenize_chat(chat(), _with_template(tok, unstable), max_length=128)


def ids(tok, *pieces) -> list[int]:
    """Token ids of ``pieces``: special token names as one token each, any other string one token per byte."""
    return [i for p in pieces for i in ([tok.convert_tokens_to_ids(p)] if p in SPECIAL_TOKENS else
                                        tok(p, add_special_tokens=False)["input_ids"])]


def test_keep_start_cuts_the_end(tok):
    row = tokenize_chat(chat("q" * 20, "a" * 20), tok, max_length=30, truncation="keep_start")
    assert len(row["input_ids"]) == len(row["labels"]) == len(row["attention_mask"]) == 30
    # bos, <|user|>, \n, 20 q, <|end|>, <|assistant|>, \n -> 26 prompt tokens; 4 answer tokens left
    assert row["input_ids"] == ids(tok, "<s>", "<|user|>", "\n" + "q" * 20, "<|end|>", "<|assistant|>", "\n" + "aaaa")
    assert supervised_spans(row) == [ids(tok, "aaaa")]


def test_keep_answer_keeps_bos_and_the_answer_and_cuts_the_prompt_from_the_left(tok):
    row = tokenize_chat(chat("q" * 20, "a" * 20), tok, max_length=30)
    assert row["input_ids"] == ids(tok, "<s>", "qqqqq", "<|end|>", "<|assistant|>", "\n" + "a" * 20, "<|end|>")
    assert supervised_spans(row) == [ids(tok, "a" * 20, "<|end|>")]
    assert row["attention_mask"] == [1] * 30


def test_keep_answer_cuts_older_turns_and_keeps_their_labels_inside_the_window(tok):
    msgs = [{"role": "system", "content": "s" * 30}, *chat("q1", "a1"), *chat("q2", "answer")]
    row = tokenize_chat(msgs, tok, max_length=24)
    assert row["input_ids"] == ids(tok, "<s>", "\nq1", "<|end|>", "<|assistant|>", "\na1", "<|end|>", "<|user|>",
                                   "\nq2", "<|end|>", "<|assistant|>", "\nanswer", "<|end|>")
    assert [tok.decode(s) for s in supervised_spans(row)] == ["a1<|end|>", "answer<|end|>"]


def test_keep_answer_keeps_the_beginning_of_an_answer_too_long_to_fit(tok):
    row, truncated = encode_chat(chat("question", "a" * 100), tok, max_length=30)
    # room 29 after bos: the last 29 // 4 = 7 prompt tokens, then the first 22 answer tokens
    assert row["input_ids"] == ids(tok, "<s>", "tion", "<|end|>", "<|assistant|>", "\n" + "a" * 22)
    assert truncated


def test_keep_answer_without_bos_in_the_template(tok):
    no_bos = _with_template(tok, tok.chat_template.replace("{{ bos_token }}", ""))
    row = tokenize_chat(chat("q" * 20, "a" * 20), no_bos, max_length=30)
    assert row["input_ids"] == ids(tok, "qqqqqq", "<|end|>", "<|assistant|>", "\n" + "a" * 20, "<|end|>")


def test_short_conversations_are_not_truncated(tok):
    for truncation in TRUNCATIONS:
        row, truncated = encode_chat(chat("q", "a"), tok, 64, truncation)
        assert (row["input_ids"], truncated) == (tok.apply_chat_template(chat("q", "a"), return_dict=False), False)
    with pytest.raises(DataError, match="truncation='keep_end' is not allowed; choose one of.*keep_answer"):
        encode_chat(chat(), tok, 64, "keep_end")


def test_examples_truncated_to_no_supervision_are_dropped(tok, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "x" * 50, "response": "y"},
                                               {"prompt": "short", "response": "ok"}])
    train, evaluation, counts = build_datasets(path, tok, max_length=20, eval_size=0, seed=0, truncation="keep_start")
    assert evaluation is None
    assert len(train) == 1
    assert counts == {"records": 2, "train": {"examples": 1, "truncated": 1, "dropped": 1},
                      "eval": {"examples": 0, "truncated": 0, "dropped": 0}}
    assert tok.decode(train[0]["input_ids"]).startswith("<s><|user|>\nshort")
    with pytest.raises(DataError, match="no train example keeps an assistant token within max_length=4 "
                                        r"\(truncation: keep_start\); increase max_length or use truncation: keep_answer"):
        build_datasets(path, tok, max_length=4, eval_size=0, seed=0, truncation="keep_start")
    # keep_answer keeps both: the long prompt is cut from the left
    counts = build_datasets(path, tok, max_length=20, eval_size=0, seed=0).counts
    assert counts["train"] == {"examples": 2, "truncated": 1, "dropped": 0}


def test_truncation_and_drops_are_counted_and_logged_per_split(tok, tmp_path, caplog):
    rows = [{"prompt": "x" * 50, "response": "y"}, {"prompt": "q", "response": "z" * 50},
            {"prompt": "a", "response": "b"}, {"prompt": "c" * 50, "response": "d"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    assert split_records(4, 1, seed=0) == ([0, 1, 3], [2])
    with caplog.at_level("WARNING", logger="sora_ds.data.chat"):
        train, evaluation, counts = build_datasets(path, tok, max_length=20, eval_size=1, seed=0,
                                                   truncation="keep_start")
    assert counts == {"records": 4, "train": {"examples": 1, "truncated": 3, "dropped": 2},
                      "eval": {"examples": 1, "truncated": 0, "dropped": 0}}
    assert (len(train), len(evaluation)) == (1, 1)
    [warning] = caplog.messages
    assert warning == (f"dataset {str(path)!r}, train split: 3 of 3 examples were longer than max_length=20 and "
                       "truncated (truncation: keep_start); 2 with no assistant token left were dropped")

    caplog.clear()
    rows[2] = {"prompt": "a" * 50, "response": "b"}
    write_jsonl(path, rows)
    with caplog.at_level("WARNING", logger="sora_ds.data.chat"):
        counts = build_datasets(path, tok, max_length=20, eval_size=1, seed=0).counts
    assert counts == {"records": 4, "train": {"examples": 3, "truncated": 3, "dropped": 0},
                      "eval": {"examples": 1, "truncated": 1, "dropped": 0}}
    assert [m.split(":")[0] for m in caplog.messages] == [f"dataset {str(path)!r}, train split",
                                                         f"dataset {str(path)!r}, eval split"]

    caplog.clear()
    with caplog.at_level("WARNING", logger="sora_ds.data.chat"):
        counts = build_datasets(path, tok, max_length=128).counts
    assert (counts["train"]["truncated"], counts["train"]["dropped"], caplog.messages) == (0, 0, [])


# ------------------------------------------------------------------- formats


def test_to_messages_formats():
    assert to_messages({"messages": chat("a", "b")}) == chat("a", "b")
    assert to_messages({"prompt": "a", "response": "b"}) == chat("a", "b")
    assert to_messages({"instruction": "a", "output": "b"}) == chat("a", "b")
    assert to_messages({"instruction": "a", "input": "", "output": "b"}) == chat("a", "b")
    assert to_messages({"instruction": "a", "input": None, "output": "b"}) == chat("a", "b")
    assert to_messages({"instruction": "do", "input": "this", "output": "b"}) == chat("do\n\nthis", "b")
    sharegpt = [{"from": "system", "value": "s"}, {"from": "human", "value": "a"}, {"from": "gpt", "value": "b"},
                {"from": "user", "value": "c"}, {"from": "assistant", "value": "d"}]
    assert to_messages({"conversations": sharegpt}) == [{"role": "system", "content": "s"}, *chat("a", "b"),
                                                        *chat("c", "d")]


@pytest.mark.parametrize("rows", [
    [{"messages": chat("a", "b")}, {"messages": chat("c", "d")}],
    [{"prompt": "a", "response": "b"}, {"prompt": "c", "response": "d"}],
    [{"instruction": "a", "input": "", "output": "b"}, {"instruction": "c", "input": "", "output": "d"}],
    [{"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]},
     {"conversations": [{"from": "user", "value": "c"}, {"from": "assistant", "value": "d"}]}],
])
def test_build_datasets_from_each_format(tok, tmp_path, rows):
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    train = build_datasets(str(path), tok, max_length=64, eval_size=0, seed=0).train
    expected = [tokenize_chat(chat("a", "b"), tok, 64), tokenize_chat(chat("c", "d"), tok, 64)]
    assert [dict(r) for r in train] == expected


def test_load_json_array_file_and_directory(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([{"prompt": "a", "response": "b"}]))
    write_jsonl(tmp_path / "b.jsonl", [{"prompt": "c", "response": "d"}])
    (tmp_path / "notes.txt").write_text("ignored")
    assert len(load_records(tmp_path / "a.json")) == 1
    records = load_records(tmp_path)
    assert sorted(r.fields["prompt"] for r in records) == ["a", "c"]
    assert [r.where for r in records] == [f"{tmp_path / 'a.json'}, line 1", f"{tmp_path / 'b.jsonl'}, line 1"]


# -------------------------------------------------------------------- errors


def test_missing_columns_error_before_tokenization(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"text": "hello", "label": 1}])
    with pytest.raises(DataError) as err:
        build_datasets(path, NoTokenizer(), max_length=64, eval_size=0, seed=0)
    msg = str(err.value)
    assert "bad.jsonl" in msg and "'text'" in msg and "'label'" in msg
    assert "'messages'" in msg and "'prompt'+'response'" in msg and "'output'" in msg


def test_half_a_format_names_the_missing_column(tmp_path):
    path = write_jsonl(tmp_path / "half.jsonl", [{"prompt": "hello"}])
    with pytest.raises(DataError, match="missing column 'response'"):
        load_records(path)


@pytest.mark.parametrize("content", ["", "\n  \n"])
def test_empty_file(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match="empty.jsonl.*empty"):
        load_records(path)


def test_missing_local_file_and_unreachable_hub_dataset(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="does not exist"):
        load_records(tmp_path / "nope.jsonl")

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match="'someone/some-set'.*neither a local.*nor a reachable"):
        load_records("someone/some-set")


def test_bad_role_fails_before_tokenization(tmp_path):
    rows = [{"messages": chat()}, {"messages": [{"role": "bot", "content": "hi"},
                                                {"role": "assistant", "content": "yo"}]}]
    path = write_jsonl(tmp_path / "roles.jsonl", rows)
    with pytest.raises(DataError) as err:
        build_datasets(path, NoTokenizer(), max_length=64, eval_size=0, seed=0)
    msg = str(err.value)
    assert "roles.jsonl, line 2:" in msg and "'messages'[0].role is 'bot'" in msg and "assistant" in msg


def test_bad_sharegpt_turn_names_file_line_and_field(tmp_path):
    good = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    for turn, field in [({"from": "bot", "value": "a"}, "'conversations'[1].from is 'bot'; allowed: human, gpt, "
                                                        "system, user, assistant"),
                        ({"from": "gpt", "value": None}, "'conversations'[1].value must be a string, got None"),
                        ("hi", "'conversations'[1] must be a {from, value} object, got 'hi'")]:
        path = write_jsonl(tmp_path / "sharegpt.jsonl", [good, {"conversations": [good["conversations"][0], turn]}])
        with pytest.raises(DataError) as err:
            build_datasets(path, NoTokenizer(), max_length=64)
        assert str(err.value) == f"{path}, line 2: {field}"
    path = write_jsonl(tmp_path / "sharegpt.jsonl", [{"conversations": [{"from": "human", "value": "q"}]}])
    with pytest.raises(DataError, match=r"line 1: the conversation has no assistant turn.*\(ShareGPT: from 'gpt'\)"):
        build_datasets(path, NoTokenizer(), max_length=64)


def test_no_assistant_turn():
    with pytest.raises(DataError, match="no assistant turn.*role 'assistant'"):
        to_messages({"messages": [{"role": "user", "content": "hi"}]})


@pytest.mark.parametrize("example, field", [
    ({"prompt": "a", "response": None}, "'response'"),
    ({"instruction": 3, "output": "b"}, "'instruction'"),
    ({"messages": [{"role": "user", "content": 5}]}, r"'messages'\[0\]\.content"),
    ({"messages": []}, "'messages'"),
])
def test_bad_field_values(example, field):
    with pytest.raises(DataError, match=field):
        to_messages(example)


@pytest.mark.parametrize("eval_size", [1.0, 1.5, -0.1, -1, "0.1", True, None])
def test_bad_eval_size(eval_size):
    with pytest.raises(DataError, match="eval_size"):
        build_datasets(None, NoTokenizer(), max_length=64, eval_size=eval_size, seed=0)


def test_eval_size_leaving_no_train_data(tok, tmp_path):
    path = write_jsonl(tmp_path / "two.jsonl", [{"prompt": "a", "response": "b"}] * 2)
    with pytest.raises(DataError, match="eval_size"):
        build_datasets(path, tok, max_length=64, eval_size=2, seed=0)


@pytest.mark.parametrize("max_length", [0, 1, 1.5, None, True])
def test_bad_max_length(max_length):
    with pytest.raises(DataError, match="max_length"):
        build_datasets(None, NoTokenizer(), max_length=max_length, eval_size=0, seed=0)


# -------------------------------------------------------------------- splits


def test_split_is_deterministic_and_disjoint(tok, tmp_path):
    rows = [{"prompt": f"q{i}", "response": f"a{i}"} for i in range(20)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)

    def split(eval_size, seed):
        train, evaluation, _ = build_datasets(path, tok, 64, eval_size, seed)
        return [tok.decode(r["input_ids"]) for r in train], [tok.decode(r["input_ids"]) for r in evaluation]

    train, evaluation = split(0.25, seed=1)
    assert (len(train), len(evaluation)) == (15, 5)
    assert sorted(train + evaluation) == sorted(
        tok.apply_chat_template(chat(r["prompt"], r["response"]), tokenize=False) for r in rows)
    assert split(0.25, seed=1) == (train, evaluation)
    assert split(0.25, seed=2)[1] != evaluation
    assert len(split(3, seed=1)[1]) == 3
    assert len(split(0.01, seed=1)[1]) == 1  # a positive fraction gives at least one example


# ------------------------------------------------------------------- collate


def test_collate_right_pads(tok):
    a = tokenize_chat(chat("hi", "yo"), tok, 64)
    b = tokenize_chat(chat("a longer question", "yo"), tok, 64)
    batch = collate([a, b], pad_token_id=tok.pad_token_id)
    n, m = len(a["input_ids"]), len(b["input_ids"])
    assert n < m
    for key in ("input_ids", "attention_mask", "labels"):
        assert batch[key].shape == (2, m) and batch[key].dtype == torch.long
    assert batch["input_ids"][0].tolist() == a["input_ids"] + [tok.pad_token_id] * (m - n)
    assert batch["attention_mask"][0].tolist() == [1] * n + [0] * (m - n)
    assert batch["labels"][0].tolist() == a["labels"] + [-100] * (m - n)
    assert batch["input_ids"][1].tolist() == b["input_ids"]


# ------------------------------------------------------------------- builtin


def test_builtin_dataset_loads_and_fits(tok):
    records = load_records(None)
    assert 600 <= len(records) <= 1000
    assert {tuple(r.fields) for r in records} == {("messages",)}
    for record in records:
        messages = to_messages(record.fields)
        assert len(tokenize_chat(messages, tok, 10**6)["input_ids"]) <= 128
    train, evaluation, counts = build_datasets(None, tok, max_length=128, eval_size=0.1, seed=0)
    assert len(train) + len(evaluation) == len(records)  # nothing dropped at 128
    assert counts == {"records": len(records), "train": {"examples": len(train), "truncated": 0, "dropped": 0},
                      "eval": {"examples": len(evaluation), "truncated": 0, "dropped": 0}}


def test_generator_reproduces_shipped_file(tmp_path):
    out = tmp_path / "tiny_chat.jsonl"
    subprocess.run([sys.executable, str(REPO / "scripts" / "make_tiny_chat.py"), "--out", str(out)],
                   check=True, capture_output=True)
    assert out.read_bytes() == BUILTIN_DATASET.read_bytes()
