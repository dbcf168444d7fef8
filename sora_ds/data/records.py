"""Read local JSON / JSON-lines files into plain records that remember where they came from.

Our own reader rather than ``datasets.load_dataset("json")``: its errors name neither the file nor the line, and it
builds an Arrow table that needs every record to share one schema.  Here a record is a plain ``dict`` plus its
location, so any later error can say ``data.jsonl, line 12: ...``.
"""

from __future__ import annotations

import json
import re
import reprlib
from pathlib import Path
from typing import Any, NamedTuple

_BOM = "\ufeff"
_JSON_WHITESPACE = re.compile(r"[ \t\n\r]*")
# Error messages must stay readable when a field holds megabytes: show values shortened.
_PREVIEW = reprlib.Repr()
_PREVIEW.maxstring = _PREVIEW.maxother = 80


class DataError(ValueError):
    """A problem with the user's data or data settings, explained for humans."""


class Record(NamedTuple):
    """One raw record and where it is, e.g. ``"data/train.jsonl, line 12"`` or ``"dataset 'org/set', record 3"``."""

    fields: dict
    where: str


def preview(value: Any) -> str:
    """``repr(value)`` with long strings and containers elided (it never builds the full repr)."""
    return _PREVIEW.repr(value)


def read_json_file(path: Path) -> list[Record]:
    """The records of a ``.jsonl`` file, or of a ``.json`` file holding either one array of objects or JSON lines.

    Raises DataError naming the file, the 1-based line and what is wrong.
    """
    if path.suffix == ".json" and _first_char(path) == b"[":
        return _read_array(path)
    return _read_lines(path)


def _first_char(path: Path) -> bytes:
    """The first byte that is not whitespace (or a UTF-8 byte-order mark), b"" for a blank file."""
    with path.open("rb") as f:
        while chunk := f.read(1 << 16):
            stripped = chunk.lstrip(b" \t\r\n\xef\xbb\xbf")
            if stripped:
                return stripped[:1]
    return b""


def _decode(raw: bytes, path: Path, first_line: int = 1, offset: int = 0) -> str:
    """``raw`` as UTF-8; it starts on line ``first_line``, at byte ``offset`` of the file (for the message)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = first_line + raw.count(b"\n", 0, e.start)
        column = e.start - raw.rfind(b"\n", 0, e.start)
        raise DataError(
            f"{path}, line {line}: byte 0x{raw[e.start]:02x} at column {column} (byte offset {offset + e.start} "
            f"in the file) is not valid UTF-8; re-encode the file as UTF-8 "
            f"(e.g. iconv -f latin1 -t utf-8 in.jsonl > out.jsonl)"
        ) from None


def _as_record(value: Any, where: str, what: str) -> Record:
    if not isinstance(value, dict):
        raise DataError(f"{where}: {what} must be a JSON object ({{...}}), got {type(value).__name__} {preview(value)}")
    return Record(value, where)


def _read_lines(path: Path) -> list[Record]:
    """One JSON object per line; blank lines are skipped but still counted."""
    hint = " (a .json file must hold one JSON array of objects, or one object per line)" if path.suffix == ".json" else ""
    records, offset = [], 0
    with path.open("rb") as f:
        for number, raw in enumerate(f, 1):
            line = _decode(raw, path, number, offset)
            offset += len(raw)
            if number == 1:
                line = line.removeprefix(_BOM)
            if not line.strip():
                continue
            where = f"{path}, line {number}"
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: invalid JSON: {e.msg} (column {e.colno}){hint}") from None
            records.append(_as_record(value, where, "each line"))
    return records


def _read_array(path: Path) -> list[Record]:
    """A whole-file JSON array; each record is located at the line where its object starts."""
    text = _decode(path.read_bytes(), path).removeprefix(_BOM)
    try:
        return _array_elements(text, path)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}, line {e.lineno}: invalid JSON: {e.msg} (column {e.colno})") from None


def _array_elements(text: str, path: Path) -> list[Record]:
    """Walk ``[a, b, ...]`` element by element (json.loads would lose where each element starts).

    Syntax errors are raised as json.JSONDecodeError, which computes their line and column.
    """
    decoder = json.JSONDecoder()
    pos = _skip_whitespace(text, 0) + 1  # past the "[" that read_json_file saw
    records, line, counted = [], 1, 0
    pos = _skip_whitespace(text, pos)
    if text.startswith("]", pos):
        return _check_end(text, pos + 1, records)
    while True:
        value, end = decoder.raw_decode(text, pos)
        line, counted = line + text.count("\n", counted, pos), pos
        records.append(_as_record(value, f"{path}, line {line}", f"element {len(records) + 1} of the array"))
        pos = _skip_whitespace(text, end)
        if text.startswith("]", pos):
            return _check_end(text, pos + 1, records)
        if not text.startswith(",", pos):
            raise json.JSONDecodeError("Expecting ',' or ']' after an array element", text, pos)
        pos = _skip_whitespace(text, pos + 1)


def _skip_whitespace(text: str, pos: int) -> int:
    return _JSON_WHITESPACE.match(text, pos).end()


def _check_end(text: str, pos: int, records: list[Record]) -> list[Record]:
    pos = _skip_whitespace(text, pos)
    if pos != len(text):
        raise json.JSONDecodeError("Extra data after the array", text, pos)
    return records
