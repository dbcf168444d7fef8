"""Chat data: load records, normalise them to messages, tokenize with
assistant-only labels, split train/eval, and collate batches.

Accepted record formats (one per dataset):
  * ``messages``: a list of ``{"role", "content"}`` turns,
  * ``prompt`` + ``response``,
  * ``instruction`` (+ optional ``input``) + ``output`` (Alpaca style).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NamedTuple

import datasets
import torch

from .batches import IGNORE_INDEX
from .packing import pack_examples
from .records import DataError, Record, preview, read_json_file

logger = logging.getLogger(__name__)

BUILTIN_DATASET: Path = Path(__file__).resolve().parent / "assets" / "tiny_chat.jsonl"
ROLES = ("system", "user", "assistant")
EXPECTED_COLUMNS = (
    "expected 'messages' (list of {role, content}), or 'prompt'+'response', "
    "or 'instruction'(+'input')+'output'"
)
_JSON_SUFFIXES = (".json", ".jsonl")
# Characters of content rendered per token of max_length before tokenizing (see _tokenize_bounded).  Real
# tokenizers average about 4 characters per token on prose and rarely above 10 even on whitespace-heavy code;
# the byte tokenizer has at most 1.  16 leaves room so the retry is rare, while a 200 MB answer costs only
# 16 * max_length characters of rendering and tokenizing.
CHARS_PER_TOKEN = 16
# Tokens past max_length that a cut conversation must still have: the tokens next to the cut (a word cut in two,
# the template's end-of-turn marker) may differ from those of the whole conversation.
_MARGIN_TOKENS = 16


class ChatData(NamedTuple):
    """What :func:`build_datasets` returns: the splits and what happened to the records on the way."""

    train: datasets.Dataset
    eval: datasets.Dataset | None
    counts: dict[str, int]


# --------------------------------------------------------------------------
# records -> messages


def check_columns(columns: Iterable[str], where: str) -> None:
    """Raise DataError unless ``columns`` hold one of the accepted formats; ``where`` starts the message."""
    cols = set(columns)
    if "messages" in cols or {"prompt", "response"} <= cols or {"instruction", "output"} <= cols:
        return
    hint = ""
    if "prompt" in cols or "response" in cols:
        hint = f" (missing column {'response' if 'prompt' in cols else 'prompt'!r})"
    elif "instruction" in cols or "output" in cols:
        hint = f" (missing column {'output' if 'instruction' in cols else 'instruction'!r})"
    raise DataError(f"{where}: has columns {sorted(cols)}{hint}; {EXPECTED_COLUMNS}")


def _text(example: dict, field: str, optional: bool = False) -> str:
    value = example.get(field)
    if value is None and optional:
        return ""
    if not isinstance(value, str):
        raise DataError(f"{field!r} must be a string, got {preview(value)}")
    return value


def _message(i: int, m: Any) -> dict:
    """Validate ``messages[i]``; errors name the field as ``'messages'[i].role``."""
    field = f"'messages'[{i}]"
    if not isinstance(m, dict):
        raise DataError(f"{field} must be a {{role, content}} object, got {preview(m)}")
    role = m.get("role")
    if role not in ROLES:
        raise DataError(f"{field}.role is {preview(role)}; allowed roles: {', '.join(ROLES)}")
    if not isinstance(m.get("content"), str):
        raise DataError(f"{field}.content must be a string, got {preview(m.get('content'))}")
    return {"role": role, "content": m["content"]}


def to_messages(example: dict) -> list[dict]:
    """Normalise one record to a validated ``[{"role", "content"}, ...]`` list.

    Roles must be system/user/assistant, contents strings, and there must be
    at least one assistant turn (otherwise nothing would be trained on).
    """
    if "messages" in example:
        raw = example["messages"]
        if not isinstance(raw, list) or not raw:
            raise DataError(f"'messages' must be a non-empty list of {{role, content}} objects, got {preview(raw)}")
        messages = [_message(i, m) for i, m in enumerate(raw)]
    elif "prompt" in example and "response" in example:
        messages = [
            {"role": "user", "content": _text(example, "prompt")},
            {"role": "assistant", "content": _text(example, "response")},
        ]
    elif "instruction" in example and "output" in example:
        prompt = _text(example, "instruction")
        extra = _text(example, "input", optional=True)
        if extra.strip():
            prompt = f"{prompt}\n\n{extra}"
        messages = [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": _text(example, "output")},
        ]
    else:
        raise DataError(f"record has fields {sorted(example)}; {EXPECTED_COLUMNS}")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError("'messages' has no assistant turn; need at least one message with role 'assistant'")
    return messages


# --------------------------------------------------------------------------
# loading


def _local_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in _JSON_SUFFIXES and p.is_file())
        if not files:
            raise DataError(f"directory {str(path)!r} contains no .json or .jsonl files")
        return files
    if path.suffix not in _JSON_SUFFIXES:
        raise DataError(f"file {str(path)!r} has suffix {path.suffix!r}; allowed: .json, .jsonl")
    return [path]


def _hub_records(source: str, split: str) -> list[Record]:
    try:
        ds = datasets.load_dataset(source, split=split)
    except Exception as e:
        raise DataError(
            f"dataset {source!r} is neither a local .json/.jsonl file or directory "
            f"nor a reachable Hugging Face Hub dataset (split {split!r}): {e}"
        ) from e
    # A Hub dataset has one schema: check it once, before reading every row.
    check_columns(ds.column_names, f"dataset {source!r}")
    return [Record(row, f"dataset {source!r}, record {i}") for i, row in enumerate(ds, 1)]


def load_records(source: str | Path | None, split: str = "train") -> list[Record]:
    """Load raw records, each with its location, and check each has a usable set of columns.

    ``None`` is the built-in tiny chat set; an existing ``.json``/``.jsonl``
    file or a directory of them is read locally (``split`` is ignored), records
    located by file and 1-based line; anything else is taken as a Hugging Face
    Hub dataset name (needs network), records located by 1-based index.
    """
    path = BUILTIN_DATASET if source is None else Path(source)
    name = path.name if source is None else str(source)
    if path.exists():
        records = [r for f in _local_files(path) for r in read_json_file(f)]
        # Records need not share their keys (no common schema), so check each one.
        for record in records:
            check_columns(record.fields, record.where)
    elif path.suffix in _JSON_SUFFIXES:
        raise DataError(f"dataset file {name!r} does not exist")
    else:
        records = _hub_records(str(source), split)
    if not records:
        raise DataError(f"dataset {name!r} is empty (no records)")
    return records


# --------------------------------------------------------------------------
# tokenization


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def _assistant_char_spans(tokenizer, messages: list[dict], full: str) -> list[tuple[int, int]]:
    """Character spans of the assistant turns in ``full``.

    Works with any template, with or without ``{% generation %}`` markers:
    the rendering of ``messages[:i]`` plus the generation prompt must be a
    prefix of the rendering of ``messages[:i+1]``; what lies between is the
    reply, including the template's end-of-turn marker.
    """
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], add_generation_prompt=True)
        upto = _render(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if not (upto.startswith(before) and full.startswith(upto)):
            raise DataError(
                f"the tokenizer's chat_template is not prefix-stable at message {i} "
                "(rendering earlier turns changes when later turns are added), so "
                "assistant tokens cannot be located; use a template without that behaviour"
            )
        spans.append((len(before), len(upto)))
    return spans


def _tokenize_whole(messages: list[dict], tokenizer) -> tuple[list[int], list[int]]:
    """Token ids and labels of the whole rendered conversation (labels -100 outside assistant replies)."""
    full = _render(tokenizer, messages, add_generation_prompt=False)
    spans = _assistant_char_spans(tokenizer, messages, full)
    # Special tokens are already in the rendered text (e.g. bos), so do not add more.
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    labels = [
        tok if any(lo <= start < hi for lo, hi in spans) else IGNORE_INDEX
        for tok, (start, _end) in zip(ids, enc["offset_mapping"])
    ]
    return ids, labels


def _cut(messages: list[dict], budget: int) -> tuple[list[dict], bool]:
    """The leading messages whose contents fit in ``budget`` characters, the last one shortened to fit.

    Each turn also costs ``CHARS_PER_TOKEN`` (its role header is at least one token), so a record with
    countless tiny turns is bounded too.  Returns the kept messages and whether anything was left out.
    """
    kept = []
    for m in messages:
        if budget <= 0:
            return kept, True
        if len(m["content"]) > budget:
            return [*kept, {**m, "content": m["content"][:budget]}], True
        kept.append(m)
        budget -= len(m["content"]) + CHARS_PER_TOKEN
    return kept, False


def _tokenize_bounded(messages: list[dict], tokenizer, max_length: int) -> tuple[dict[str, list[int]], bool]:
    """:func:`tokenize_chat`'s row, and whether the conversation had more than ``max_length`` tokens.

    The work (rendering, tokenizing, offsets) is proportional to ``max_length``, not to the record: only the
    first ``max_length * CHARS_PER_TOKEN`` characters of content are rendered.  Cutting the text changes at most
    the last few tokens before the cut (a word cut in two, the template's closing marker), so when the cut text
    still gives ``_MARGIN_TOKENS`` more than ``max_length`` tokens the first ``max_length`` are exactly those of
    the whole conversation.  Otherwise (tokens longer than ``CHARS_PER_TOKEN`` characters on average) the
    budget doubles and the cut is tried again, ending at the whole conversation at worst.
    """
    budget = max_length * CHARS_PER_TOKEN
    while True:
        kept, cut = _cut(messages, budget)
        ids, labels = _tokenize_whole(kept, tokenizer)
        if not cut or len(ids) >= max_length + _MARGIN_TOKENS:
            break
        budget *= 2
    # A cut conversation reached max_length + _MARGIN_TOKENS tokens, so the whole one is longer too.
    truncated = len(ids) > max_length
    ids, labels = ids[:max_length], labels[:max_length]
    return {"input_ids": ids, "labels": labels, "attention_mask": [1] * len(ids)}, truncated


def tokenize_chat(messages: list[dict], tokenizer, max_length: int) -> dict[str, list[int]]:
    """Tokenize a conversation with loss only on the assistant replies.

    Returns ``input_ids``, ``attention_mask`` and ``labels`` (unshifted; the
    model shifts), truncated to ``max_length``.  ``labels`` is -100 except on
    tokens that start inside an assistant turn's content or its end-of-turn
    marker, so the model learns both the answer and when to stop.  The work is
    bounded by ``max_length``, however long the conversation (see
    :func:`_tokenize_bounded`).
    """
    return _tokenize_bounded(messages, tokenizer, max_length)[0]


# --------------------------------------------------------------------------
# datasets


def _check_int(field: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise DataError(f"{field} must be an integer >= {minimum}, got {value!r}")


def _check_eval_size(eval_size: Any) -> None:
    ok = (isinstance(eval_size, float) and (eval_size == 0 or 0 < eval_size < 1)) or (
        isinstance(eval_size, int) and not isinstance(eval_size, bool) and eval_size >= 0
    )
    if not ok:
        raise DataError(
            f"eval_size must be a fraction in (0, 1), an integer count >= 0, or 0 for no eval set; "
            f"got {eval_size!r}"
        )


def _eval_count(eval_size: int | float, n: int) -> int:
    count = max(1, round(eval_size * n)) if isinstance(eval_size, float) and eval_size else int(eval_size)
    if count >= n:
        raise DataError(
            f"eval_size={eval_size!r} leaves no training examples: only {n} usable examples; "
            f"use a smaller eval_size"
        )
    return count


def _conversations(records: list[Record]) -> list[list[dict]]:
    """Every record as messages; all are validated before any is tokenized, so bad data fails fast."""
    conversations = []
    for record in records:
        try:
            conversations.append(to_messages(record.fields))
        except DataError as e:
            raise DataError(f"{record.where}: {e}") from None
    return conversations


def _tokenize_records(
    records: list[Record], conversations: list[list[dict]], tokenizer, max_length: int
) -> tuple[list[dict], dict[str, int]]:
    """The rows that keep a supervised token within ``max_length``, and the counts (see :func:`build_datasets`)."""
    rows, truncated, dropped = [], 0, 0
    for record, messages in zip(records, conversations):
        try:
            row, was_truncated = _tokenize_bounded(messages, tokenizer, max_length)
        except DataError as e:
            raise DataError(f"{record.where}: {e}") from None
        truncated += was_truncated
        if any(label != IGNORE_INDEX for label in row["labels"]):
            rows.append(row)
        else:
            dropped += 1
    return rows, {"records": len(records), "truncated": truncated, "dropped": dropped}


def build_datasets(
    source: str | Path | None,
    tokenizer,
    max_length: int,
    eval_size: int | float = 0,
    seed: int = 0,
    packing: bool = False,
) -> ChatData:
    """Load, validate, tokenize and split a chat dataset.

    ``eval_size`` is a fraction in (0, 1) or an example count; 0 gives no eval
    set.  The split depends only on ``seed`` and the data.  ``packing`` packs
    the training split several examples to a row (see
    :mod:`sora_ds.data.packing`); the eval split stays one example per row.

    Returns ``ChatData(train, eval, counts)``; ``eval`` is None without an eval
    set.  ``counts`` has ``records`` (read), ``truncated`` (examples with more
    than ``max_length`` tokens, cut to ``max_length``), ``dropped`` (examples
    with no supervised token within ``max_length``, left out; usually also
    counted as truncated), ``train_examples`` and ``eval_examples`` (examples
    in each split, before packing).  Truncation and drops are logged as one
    warning.
    """
    # Check settings before the (possibly slow) load.
    _check_int("max_length", max_length, 2)
    _check_eval_size(eval_size)

    name = "builtin tiny_chat.jsonl" if source is None else str(source)
    records = load_records(source)
    rows, counts = _tokenize_records(records, _conversations(records), tokenizer, max_length)
    if not rows:
        raise DataError(
            f"dataset {name!r}: no example keeps an assistant token within max_length={max_length}; "
            "increase max_length"
        )
    if counts["truncated"] or counts["dropped"]:
        logger.warning(
            "dataset %r, max_length=%d: %d of %d examples were longer and truncated; "
            "%d with no assistant token left were dropped",
            name, max_length, counts["truncated"], counts["records"], counts["dropped"],
        )

    n_eval = _eval_count(eval_size, len(rows))
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    eval_idx, train_idx = sorted(order[:n_eval]), sorted(order[n_eval:])
    counts.update(train_examples=len(train_idx), eval_examples=n_eval)
    train_rows = [rows[i] for i in train_idx]
    if packing:
        train_rows = pack_examples(train_rows, max_length)
    train = datasets.Dataset.from_list(train_rows)
    evaluation = datasets.Dataset.from_list([rows[i] for i in eval_idx]) if n_eval else None
    return ChatData(train, evaluation, counts)


def collate(features: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of tokenized examples into ``long`` tensors.

    Packed rows (with ``position_ids``, see :mod:`sora_ds.data.packing`) get no ``attention_mask``; their padding is one
    more sequence (positions from 0) that carries no loss.
    """
    if not features:
        raise ValueError("collate needs at least one example")
    width = max(len(f["input_ids"]) for f in features)

    def pad(key: str, value: int) -> torch.Tensor:
        return torch.tensor(
            [list(f[key]) + [value] * (width - len(f[key])) for f in features], dtype=torch.long
        )

    batch = {"input_ids": pad("input_ids", pad_token_id), "labels": pad("labels", IGNORE_INDEX)}
    if "position_ids" in features[0]:
        batch["position_ids"] = torch.tensor(
            [list(f["position_ids"]) + list(range(width - len(f["position_ids"]))) for f in features], dtype=torch.long
        )
    else:
        batch["attention_mask"] = pad("attention_mask", 0)
    return batch
