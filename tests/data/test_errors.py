"""Data errors name the file, the 1-based line and the field, and nothing is tokenized before all records pass."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest

from sora_ds.data.chat import DataError, build_datasets, load_records
from tests.data.test_chat import NoTokenizer, chat

GOOD = json.dumps({"prompt": "q", "response": "a"})


def write_lines(path: Path, lines: list[str | bytes]) -> Path:
    path.write_bytes(b"".join((line if isinstance(line, bytes) else line.encode()) + b"\n" for line in lines))
    return path


def error(source, tokenizer=None) -> str:
    """The DataError message of building ``source`` (nothing may be tokenized before the data is valid)."""
    with pytest.raises(DataError) as err:
        build_datasets(source, tokenizer or NoTokenizer(), max_length=64)
    return str(err.value)


def test_invalid_json_names_file_line_and_column(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [GOOD, GOOD, '{"prompt": "q" "response": "a"}'])
    msg = error(path)
    assert msg.startswith(f"{path}, line 3: invalid JSON: Expecting ',' delimiter (column 16)")


def test_blank_lines_are_skipped_but_counted(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [GOOD, "", "  ", GOOD, "{oops"])
    assert f"{path}, line 5: invalid JSON" in error(path)
    assert len(load_records(write_lines(tmp_path / "ok.jsonl", [GOOD, "", GOOD]))) == 2


def test_bytes_that_are_not_utf8(tmp_path):
    latin1 = json.dumps({"prompt": "caf\u00e9", "response": "a"}, ensure_ascii=False).encode("latin-1")
    path = write_lines(tmp_path / "d.jsonl", [GOOD, latin1])
    msg = error(path)
    assert msg.startswith(f"{path}, line 2: byte 0xe9 at column 16 (byte offset {len(GOOD) + 1 + 15} in the file)")
    assert "not valid UTF-8" in msg and "re-encode the file as UTF-8" in msg


def test_utf8_byte_order_mark_is_accepted(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [b"\xef\xbb\xbf" + GOOD.encode(), GOOD])
    assert len(load_records(path)) == 2


@pytest.mark.parametrize("line, got", [("[1, 2]", "list [1, 2]"), ('"text"', "str 'text'"), ("null", "NoneType None")])
def test_line_that_is_not_an_object(tmp_path, line, got):
    path = write_lines(tmp_path / "d.jsonl", [GOOD, line])
    assert error(path) == f"{path}, line 2: each line must be a JSON object ({{...}}), got {got}"


def test_bad_field_names_line_and_field(tmp_path):
    bad = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ["a"]}]}
    path = write_lines(tmp_path / "d.jsonl", [GOOD, GOOD, json.dumps({"messages": chat()}), json.dumps(bad)])
    assert error(path) == f"{path}, line 4: 'messages'[1].content must be a string, got ['a']"


def test_missing_column_names_the_line(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [GOOD, json.dumps({"prompt": "q", "answer": "a"})])
    msg = error(path)
    assert msg.startswith(f"{path}, line 2: has columns ['answer', 'prompt'] (missing column 'response')")


def test_records_with_different_keys_are_fine(tmp_path):
    rows = [{"prompt": "q", "response": "a"}, {"prompt": "q", "response": "a", "id": 7, "meta": {"x": [1]}},
            {"messages": chat()}]
    path = write_lines(tmp_path / "d.jsonl", [json.dumps(r) for r in rows])
    assert [r.fields for r in load_records(path)] == rows


def test_huge_values_are_shortened_in_messages(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [json.dumps({"prompt": "q", "response": ["x" * 10**6]})])
    msg = error(path)
    assert "'response' must be a string, got ['xxx" in msg and len(msg) < 300


def test_json_array_file_errors_and_record_lines(tmp_path):
    records = [{"prompt": "q", "response": "a"}, {"prompt": "q", "response": 5}]
    path = tmp_path / "d.json"
    path.write_text("\n" + json.dumps(records, indent=2))
    assert error(path) == f"{path}, line 7: 'response' must be a string, got 5"

    path.write_text('[\n  {"prompt": "q", "response": "a"},\n  {"prompt": "q",, "response": "a"}\n]\n')
    assert error(path).startswith(f"{path}, line 3: invalid JSON: Expecting property name")

    path.write_text('[{"prompt": "q", "response": "a"}\n{"prompt": "q", "response": "a"}]')
    assert error(path) == f"{path}, line 2: invalid JSON: Expecting ',' or ']' after an array element (column 1)"

    path.write_text('[{"prompt": "q", "response": "a"}]\n[]')
    assert error(path) == f"{path}, line 2: invalid JSON: Extra data after the array (column 1)"

    path.write_text('[{"prompt": "q", "response": "a"},\n 3]')
    assert error(path) == f"{path}, line 2: element 2 of the array must be a JSON object ({{...}}), got int 3"

    path.write_bytes(b'[{"prompt": "q",\n  "response": "\xff"}]')
    assert error(path).startswith(f"{path}, line 2: byte 0xff at column 16 (byte offset 32 in the file)")

    path.write_text("[]")
    assert "is empty" in error(path)


def test_json_file_with_one_object_per_line(tmp_path):
    path = write_lines(tmp_path / "d.json", [GOOD, GOOD])
    assert len(load_records(path)) == 2
    path.write_text(json.dumps({"prompt": "q", "response": "a"}, indent=2))
    assert "one JSON array of objects, or one object per line" in error(path)


def test_hub_records_are_numbered_from_one(monkeypatch):
    rows = [{"prompt": "q", "response": "a"}, {"prompt": "q", "response": None}]
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: datasets.Dataset.from_list(rows))
    assert error("someone/set") == "dataset 'someone/set', record 2: 'response' must be a string, got None"
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: datasets.Dataset.from_list([{"text": "x"}]))
    assert error("someone/set").startswith("dataset 'someone/set': has columns ['text']")
