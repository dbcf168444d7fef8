"""Chat data: load records, normalise them to messages, tokenize with
assistant-only labels, split train/eval, and collate batches.

Accepted record formats (one per dataset):
  * ``messages``: a list of ``{"role", "content"}`` turns,
  * ``prompt`` + ``response``,
  * ``instruction`` (+ optional ``input``) + ``output`` (Alpaca style),
  * ``conversations``: a list of ``{"from", "value"}`` turns (ShareGPT style; ``from`` is human/gpt/system, or
    user/assistant).
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NamedTuple

import datasets
import torch

from .answers import AnswerTokens, answer_span
from .batches import IGNORE_INDEX
from .packing import pack_examples
from .records import DataError, Record, preview, read_json_file

logger = logging.getLogger(__name__)

BUILTIN_DATASET: Path = Path(__file__).resolve().parent / "assets" / "tiny_chat.jsonl"
ROLES = ("system", "user", "assistant")
# ShareGPT's speaker names (and the chat role names, which some ShareGPT exports use) -> chat roles.
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant"}
EXPECTED_COLUMNS = (
    "expected 'messages' (list of {role, content}), or 'prompt'+'response', "
    "or 'instruction'(+'input')+'output', or 'conversations' (ShareGPT: list of {from, value})"
)
_JSON_SUFFIXES = (".json", ".jsonl")
# Characters of content rendered per token of max_length before tokenizing (see _keep_start).  Real
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
    counts: dict[str, Any]


# --------------------------------------------------------------------------
# records -> messages


def check_columns(columns: Iterable[str], where: str) -> None:
    """Raise DataError unless ``columns`` hold one of the accepted formats; ``where`` starts the message."""
    cols = set(columns)
    if cols & {"messages", "conversations"} or {"prompt", "response"} <= cols or {"instruction", "output"} <= cols:
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


# The two list formats of a conversation: column -> (role key, text key, role name -> chat role).
TURN_FORMATS = {
    "messages": ("role", "content", {r: r for r in ROLES}),
    "conversations": ("from", "value", SHAREGPT_ROLES),  # ShareGPT
}


def _turn(column: str, i: int, turn: Any) -> dict:
    """Validate ``record[column][i]`` and map it to a chat message; errors name the field, e.g. ``'messages'[1].role``
    or ``'conversations'[0].from``."""
    role_key, text_key, roles = TURN_FORMATS[column]
    field = f"'{column}'[{i}]"
    if not isinstance(turn, dict):
        raise DataError(f"{field} must be a {{{role_key}, {text_key}}} object, got {preview(turn)}")
    role = turn.get(role_key)
    if role not in roles:
        raise DataError(f"{field}.{role_key} is {preview(role)}; allowed: {', '.join(roles)}")
    if not isinstance(turn.get(text_key), str):
        raise DataError(f"{field}.{text_key} must be a string, got {preview(turn.get(text_key))}")
    return {"role": roles[role], "content": turn[text_key]}


def to_messages(example: dict) -> list[dict]:
    """Normalise one record to a validated ``[{"role", "content"}, ...]`` list.

    Roles must be system/user/assistant, contents strings, and there must be
    at least one assistant turn (otherwise nothing would be trained on).
    """
    column = next((c for c in TURN_FORMATS if c in example), None)
    if column is not None:
        raw = example[column]
        if not isinstance(raw, list) or not raw:
            role_key, text_key, _ = TURN_FORMATS[column]
            raise DataError(f"'{column}' must be a non-empty list of {{{role_key}, {text_key}}} objects, got "
                            f"{preview(raw)}")
        messages = [_turn(column, i, turn) for i, turn in enumerate(raw)]
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
        raise DataError("the conversation has no assistant turn; need at least one message with role 'assistant' "
                        "(ShareGPT: from 'gpt')")
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


def _encode(messages: list[dict], tokenizer) -> tuple[list[int], list[int], list[int]]:
    """Token ids, labels (-100 outside assistant replies) and each token's start character in the rendering."""
    full = _render(tokenizer, messages, add_generation_prompt=False)
    spans = _assistant_char_spans(tokenizer, messages, full)
    # Special tokens are already in the rendered text (e.g. bos), so do not add more.
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    starts = [start for start, _end in enc["offset_mapping"]]
    labels = [tok if any(lo <= start < hi for lo, hi in spans) else IGNORE_INDEX for tok, start in zip(ids, starts)]
    return ids, labels, starts


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


def _cut_left(messages: list[dict], budget: int) -> tuple[list[dict], int | None]:
    """``messages`` with only the last ``budget`` characters of content kept, and the index of the message cut.

    Earlier messages are emptied rather than dropped, so the template sees the same roles in the same order (some
    templates refuse a conversation that does not start with a user turn, others add a default system prompt when
    it does not start with one).  Past ``budget // CHARS_PER_TOKEN`` emptied turns, an even number of them is
    dropped after a leading system message, which keeps that order too and bounds a record of countless turns.
    """
    kept: list[dict] = []
    for i in range(len(messages) - 1, -1, -1):
        m = messages[i]
        if len(m["content"]) > budget:
            cut = {**m, "content": m["content"][len(m["content"]) - max(budget, 0):]}
            return [*_emptied(messages[:i], budget), cut, *kept[::-1]], i
        kept.append(m)
        budget -= len(m["content"]) + CHARS_PER_TOKEN
    return messages, None


def _emptied(messages: list[dict], budget: int) -> list[dict]:
    """``messages`` with empty contents, at most about ``budget // CHARS_PER_TOKEN`` of them (see :func:`_cut_left`)."""
    first = 1 if messages and messages[0]["role"] == "system" else 0
    extra = len(messages) - first - max(budget, 0) // CHARS_PER_TOKEN
    if extra > 0:  # an even number, and never all of an odd number: every later turn keeps its parity
        drop = min(extra + extra % 2, (len(messages) - first) // 2 * 2)
        messages = messages[:first] + messages[first + drop:]
    return [{**m, "content": ""} for m in messages]


def _chars_before_content(tokenizer, messages: list[dict], k: int) -> int:
    """Characters of the rendering before ``messages[k]``'s content, or a few more (never fewer): the common
    prefix of the rendering up to that message and the same with its content left out."""
    with_content = _render(tokenizer, messages[: k + 1], add_generation_prompt=False)
    without = _render(tokenizer, [*messages[:k], {**messages[k], "content": ""}], add_generation_prompt=False)
    return len(os.path.commonprefix([with_content, without]))


def _row(ids: list[int], labels: list[int]) -> dict[str, list[int]]:
    return {"input_ids": ids, "labels": labels, "attention_mask": [1] * len(ids)}


def _keep_start(messages: list[dict], tokenizer, max_length: int) -> tuple[dict[str, list[int]], bool]:
    """The first ``max_length`` tokens, and whether the conversation had more.

    Only the first ``max_length * CHARS_PER_TOKEN`` characters of content are rendered.  Cutting the text changes at
    most the last few tokens before the cut (a word cut in two, the template's closing marker), so when the cut text
    still gives ``_MARGIN_TOKENS`` more than ``max_length`` tokens the first ``max_length`` are exactly those of the
    whole conversation.  Otherwise (tokens longer than ``CHARS_PER_TOKEN`` characters on average) the budget doubles
    and the cut is tried again, ending at the whole conversation at worst.
    """
    budget = max_length * CHARS_PER_TOKEN
    while True:
        kept, cut = _cut(messages, budget)
        ids, labels, _ = _encode(kept, tokenizer)
        if not cut or len(ids) >= max_length + _MARGIN_TOKENS:
            break
        budget *= 2
    # A cut conversation reached max_length + _MARGIN_TOKENS tokens, so the whole one is longer too.
    return _row(ids[:max_length], labels[:max_length]), len(ids) > max_length


def _keep_answer(messages: list[dict], tokenizer, max_length: int) -> tuple[dict[str, list[int]], bool]:
    """The last assistant turn whole, with as much of the conversation before it as fits; and whether anything
    was cut.

    Tokens are taken from the left of the prompt, after the leading BOS token (kept when the rendering starts with
    it).  When the last answer (with what follows it) alone does not fit, the row keeps the beginning of the answer,
    after the last ``max_length // 4`` tokens of the prompt, so the answer still has its question.

    Work is bounded as in :func:`_keep_start`, around the start of the last answer: ``max_length *
    CHARS_PER_TOKEN`` characters of content on each side.  A cut changes only the tokens next to it (on the left:
    up to ``_MARGIN_TOKENS`` after the cut, whatever the template renders before it), so a row taken from the
    tokens away from the cuts is exactly the row of the whole conversation; otherwise the budget doubles.
    """
    answers = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not answers:  # nothing to keep: the row will carry no label
        return _keep_start(messages, tokenizer, max_length)
    last = answers[-1]
    budget = max_length * CHARS_PER_TOKEN
    while True:
        right, right_cut = _cut(messages[last:], budget)
        left, k = _cut_left(messages[:last], budget)
        window = [*left, *right]
        ids, labels, starts = _encode(window, tokenizer)
        # The tokens that are those of the whole conversation: [lo, hi).
        lo = 0
        if k is not None:
            k = len(left) - (last - k)  # the cut message's index in the window
            before = _chars_before_content(tokenizer, window, k)
            lo = sum(start < before for start in starts) + _MARGIN_TOKENS
        hi = len(ids) - _MARGIN_TOKENS if right_cut else len(ids)
        picked = _pick_answer_window(ids, labels, tokenizer.bos_token_id, max_length, lo, hi, k is not None, right_cut)
        if picked is not None:
            head, start, end = picked
            return _row(ids[:head] + ids[start:end], labels[:head] + labels[start:end]), (start, end) != (0, len(ids))
        budget *= 2


def _pick_answer_window(ids, labels, bos, max_length, lo, hi, left_cut, right_cut) -> tuple[int, int, int] | None:
    """``(head, start, end)``: the row is ``ids[:head] + ids[start:end]``; None when [lo, hi) cannot tell."""
    head = 1 if ids and ids[0] == bos else 0
    room = max_length - head
    supervised = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
    answer = supervised[-1] if supervised else len(ids)
    while answer > 0 and labels[answer - 1] != IGNORE_INDEX:
        answer -= 1  # the first token of the last supervised run
    if not right_cut and len(ids) - answer <= room:  # the answer and what follows fit
        start = len(ids) - room
        if start <= head and not left_cut:
            return 0, 0, len(ids)
        return (head, start, len(ids)) if start >= lo else None
    if hi - answer <= room:
        return None  # the answer may still fit: only the kept tokens after a wider cut can tell
    prompt = min(room // 4, answer - head)
    if left_cut and answer - room // 4 < lo:
        return None
    return head, answer - prompt, answer - prompt + room


TRUNCATIONS = {"keep_answer": _keep_answer, "keep_start": _keep_start}


def encode_chat(messages: list[dict], tokenizer, max_length: int,
                truncation: str = "keep_answer") -> tuple[dict[str, list[int]], bool]:
    """:func:`tokenize_chat`'s row, and whether the conversation had more than ``max_length`` tokens."""
    if truncation not in TRUNCATIONS:
        raise DataError(f"truncation={truncation!r} is not allowed; choose one of {list(TRUNCATIONS)}")
    return TRUNCATIONS[truncation](messages, tokenizer, max_length)


def tokenize_chat(messages: list[dict], tokenizer, max_length: int, truncation: str = "keep_answer") -> dict[str, list[int]]:
    """Tokenize a conversation with loss only on the assistant replies.

    Returns ``input_ids``, ``attention_mask`` and ``labels`` (unshifted; the
    model shifts), at most ``max_length`` tokens.  ``labels`` is -100 except on
    tokens that start inside an assistant turn's content or its end-of-turn
    marker, so the model learns both the answer and when to stop.

    A longer conversation is truncated on token ids, after rendering and
    tokenizing: ``keep_answer`` keeps the last assistant turn and cuts the
    prompt from the left (see :func:`_keep_answer`), ``keep_start`` keeps the
    first ``max_length`` tokens.  The work is bounded by ``max_length``,
    however long the conversation.
    """
    return encode_chat(messages, tokenizer, max_length, truncation)[0]


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
            f"eval_size={eval_size!r} leaves no training examples: only {n} records; "
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


def split_records(n: int, eval_size: int | float, seed: int) -> tuple[list[int], list[int]]:
    """Record indices of the train and eval splits, each in file order.  The split is made on records, before
    tokenizing, so it depends only on ``seed`` and the number of records (not on ``max_length`` or truncation)
    and each split can count what truncation did to it."""
    n_eval = _eval_count(eval_size, n)
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return sorted(order[n_eval:]), sorted(order[:n_eval])


def encode_record(record: Record, messages: list[dict], tokenizer, max_length: int,
                  truncation: str) -> tuple[dict[str, list[int]], bool]:
    """:func:`encode_chat` of one record, its errors located at the record."""
    try:
        return encode_chat(messages, tokenizer, max_length, truncation)
    except DataError as e:
        raise DataError(f"{record.where}: {e}") from None


def has_labels(row: dict[str, list[int]]) -> bool:
    return any(label != IGNORE_INDEX for label in row["labels"])


def _tokenize_split(records: list[Record], conversations: list[list[dict]], tokenizer, max_length: int,
                    truncation: str, answers: AnswerTokens | None = None) -> tuple[list[dict], dict[str, int]]:
    """The rows that keep a supervised token within ``max_length``, and the split's counts (see :func:`build_datasets`).
    With ``answers`` (the eval split) each row also holds its ``messages`` and the final answer's tokens
    (``answer_start``, ``answer_end``: see :mod:`sora_ds.data.answers`), for the task metrics."""
    rows, truncated, dropped = [], 0, 0
    for record, messages in zip(records, conversations):
        row, was_truncated = encode_record(record, messages, tokenizer, max_length, truncation)
        truncated += was_truncated
        if has_labels(row):
            if answers is not None:
                start, end, _ = answer_span(row["input_ids"], row["labels"], answers)
                row = {**row, "messages": messages, "answer_start": start, "answer_end": end}
            rows.append(row)
        else:
            dropped += 1
    return rows, {"examples": len(rows), "truncated": truncated, "dropped": dropped}


def _warn(name: str, split: str, counts: dict[str, int], max_length: int, truncation: str) -> None:
    if counts["truncated"] or counts["dropped"]:
        logger.warning(
            "dataset %r, %s split: %d of %d examples were longer than max_length=%d and truncated (truncation: %s); "
            "%d with no assistant token left were dropped",
            name, split, counts["truncated"], counts["examples"] + counts["dropped"], max_length, truncation,
            counts["dropped"],
        )


def build_datasets(
    source: str | Path | None,
    tokenizer,
    max_length: int,
    eval_size: int | float = 0,
    seed: int = 0,
    packing: bool = False,
    truncation: str = "keep_answer",
    split: str = "train",
    eval_source: str | Path | None = None,
) -> ChatData:
    """Load, validate, split and tokenize a chat dataset.

    ``eval_size`` is a fraction in (0, 1) or a count of records; 0 gives no
    eval set.  The split is made on records and depends only on ``seed`` and
    the data.  ``truncation`` is how an example longer than ``max_length`` is
    cut (see :func:`tokenize_chat`).  ``packing`` packs the training split
    several examples to a row (see :mod:`sora_ds.data.packing`); the eval
    split stays one example per row.  ``split`` is the hub dataset's split.

    Returns ``ChatData(train, eval, counts)``; ``eval`` is None without an eval
    set.  ``counts`` is ``{"records": read, "train": {...}, "eval": {...}}``,
    each split with ``examples`` (kept, before packing), ``truncated`` (longer
    than ``max_length``, cut) and ``dropped`` (no supervised token left after
    the cut, left out; also counted as truncated).  A split that had
    truncations or drops logs one warning.

    ``eval_source`` (a local file or folder, any accepted format) is the eval
    set instead of a split: every record of ``source`` trains (``eval_size``
    must then be 0) and ``counts["eval_records"]`` is the file's count.  Eval
    rows carry ``messages``, ``answer_start`` and ``answer_end`` besides the
    tokens (see :mod:`sora_ds.data.answers`).
    """
    # Check settings before the (possibly slow) load.
    _check_int("max_length", max_length, 2)
    _check_eval_size(eval_size)
    if truncation not in TRUNCATIONS:
        raise DataError(f"truncation={truncation!r} is not allowed; choose one of {list(TRUNCATIONS)}")

    if eval_source is not None and eval_size:
        raise DataError(f"eval_size={eval_size!r} with a separate eval set ({eval_source}): every record of the "
                        "dataset trains; set eval_size to 0")
    name = "builtin tiny_chat.jsonl" if source is None else str(source)
    records = load_records(source, split)
    conversations = _conversations(records)
    counts: dict[str, Any] = {"records": len(records)}
    parts = {part: ([records[i] for i in indices], [conversations[i] for i in indices])
             for part, indices in zip(("train", "eval"), split_records(len(records), eval_size, seed))}
    if eval_source is not None:  # validated whole before anything is tokenized, like the training records
        eval_records = load_records(eval_source)
        parts["eval"] = (eval_records, _conversations(eval_records))
        counts["eval_records"] = len(eval_records)
    splits = {}
    for part, (part_records, part_conversations) in parts.items():
        rows, counts[part] = _tokenize_split(part_records, part_conversations, tokenizer, max_length, truncation,
                                             AnswerTokens(tokenizer) if part == "eval" else None)
        where = str(eval_source) if part == "eval" and eval_source is not None else name
        _warn(where, part, counts[part], max_length, truncation)
        if part_records and not rows:
            other = " or use truncation: keep_answer" if truncation != "keep_answer" else ""
            raise DataError(f"dataset {where!r}: no {part} example keeps an assistant token within "
                            f"max_length={max_length} (truncation: {truncation}); increase max_length{other}")
        splits[part] = rows
    train_rows = pack_examples(splits["train"], max_length) if packing else splits["train"]
    evaluation = datasets.Dataset.from_list(splits["eval"]) if splits["eval"] else None
    return ChatData(datasets.Dataset.from_list(train_rows), evaluation, counts)


def eval_set(source: str | Path, tokenizer, max_length: int,
             truncation: str = "keep_answer") -> tuple[datasets.Dataset, dict[str, Any]]:
    """Every record of ``source`` (a local file or folder) as an eval row, as :func:`build_datasets` makes the rows of
    ``eval_source``, for evaluating an adapter without training; and the counts (``{"records", "eval": {...}}``)."""
    _check_int("max_length", max_length, 2)
    records = load_records(source)
    rows, counts = _tokenize_split(records, _conversations(records), tokenizer, max_length, truncation,
                                   AnswerTokens(tokenizer))
    _warn(str(source), "eval", counts, max_length, truncation)
    if not rows:
        raise DataError(f"dataset {str(source)!r}: no example keeps an assistant token within max_length={max_length} "
                        f"(truncation: {truncation}); increase max_length")
    return datasets.Dataset.from_list(rows), {"records": len(records), "eval": counts}


def training_examples(source: str | Path | None, tokenizer, max_length: int, eval_size: int | float = 0,
                      seed: int = 0, truncation: str = "keep_answer", split: str = "train"):
    """The training split's examples as :func:`build_datasets` makes them (before packing), one at a time, in file
    order: ``(where, row, truncated)``, dropped ones included (their row has no label).  Every record is validated
    first, as for training; only the examples asked for are tokenized."""
    _check_int("max_length", max_length, 2)
    _check_eval_size(eval_size)
    records = load_records(source, split)
    conversations = _conversations(records)
    for i in split_records(len(records), eval_size, seed)[0]:
        row, truncated = encode_record(records[i], conversations[i], tokenizer, max_length, truncation)
        yield records[i].where, row, truncated


def collate(features: list[dict], pad_token_id: int, flatten: bool = False) -> dict[str, torch.Tensor]:
    """Right-pad a list of tokenized examples into ``long`` tensors.

    Packed rows (with ``position_ids``, see :mod:`sora_ds.data.packing`) get no ``attention_mask``; their padding is one
    more sequence (positions from 0) that carries no loss. With ``flatten`` packed rows are instead concatenated into
    one row without padding (the layout of transformers' ``DataCollatorWithFlattening``): FlashAttention then runs
    per example from the restarting ``position_ids``, which transformers reads only from a batch of one row.
    Every row starts an example whose first label is masked, so nothing is predicted across a row boundary either.
    Unpacked examples are padded whatever ``flatten`` says.
    """
    if not features:
        raise ValueError("collate needs at least one example")
    if flatten and "position_ids" in features[0]:
        return {key: torch.tensor([[t for f in features for t in f[key]]], dtype=torch.long)
                for key in ("input_ids", "labels", "position_ids")}
    width = max(len(f["input_ids"]) for f in features)

    def pad(key: str, value: int) -> torch.Tensor:
        return torch.tensor(
            [list(f[key]) + [value] * (width - len(f[key])) for f in features], dtype=torch.long
        )

    batch = {"input_ids": pad("input_ids", pad_token_id), "labels": pad("labels", IGNORE_INDEX)}
    if "answer_start" in features[0]:  # eval rows: the final answer's tokens, for answer-only accuracy
        batch["answer_span"] = torch.tensor([[f["answer_start"], f["answer_end"]] for f in features], dtype=torch.long)
    if "position_ids" in features[0]:
        batch["position_ids"] = torch.tensor(
            [list(f["position_ids"]) + list(range(width - len(f["position_ids"]))) for f in features], dtype=torch.long
        )
    else:
        batch["attention_mask"] = pad("attention_mask", 0)
    return batch
