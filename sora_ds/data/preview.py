"""A tokenized example as text, with the tokens the loss is taken on marked: what ``sora-ds preview`` prints."""

from __future__ import annotations

from itertools import groupby

from .batches import IGNORE_INDEX

BRACKETS = ("\u27e6", "\u27e7")  # ⟦ ⟧: rare in real text, so a mark is not mistaken for data
GREEN, RESET = "\x1b[1;32m", "\x1b[0m"


def marked_text(row: dict, tokenizer, color: bool = False) -> str:
    """``row``'s tokens decoded as they are (special tokens and template text included), each run of trained tokens
    (label != -100) wrapped in ⟦ ⟧, or in green when ``color``."""
    opening, closing = (GREEN, RESET) if color else BRACKETS
    parts = []
    pairs = zip(row["input_ids"], row["labels"])
    for trained, run in groupby(pairs, key=lambda pair: pair[1] != IGNORE_INDEX):
        text = tokenizer.decode([token for token, _ in run], skip_special_tokens=False,
                                clean_up_tokenization_spaces=False)
        parts.append(f"{opening}{text}{closing}" if trained else text)
    return "".join(parts)


def describe(where: str, row: dict, truncated: bool, max_length: int, truncation: str) -> str:
    """One example's header line: where it comes from, its tokens, trained tokens and what truncation did."""
    trained = sum(label != IGNORE_INDEX for label in row["labels"])
    if not trained:
        fate = f"DROPPED: no trained token left within max_length={max_length} (truncation: {truncation})"
    elif truncated:
        fate = f"truncated to max_length={max_length} ({truncation})"
    else:
        fate = "not truncated"
    return f"{where}: {len(row['input_ids'])} tokens, {trained} trained, {fate}"
