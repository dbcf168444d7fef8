"""The final answer of a chat example, as a task metric sees it.

Token accuracy over every supervised token counts the template's end-of-turn marker and the newline after it, which
any model gets right: on a one-token label it reports ~0.87 for a model that always says the majority label. The
metrics here look only at the final assistant answer:

* :func:`answer_span`: the answer's tokens in a tokenized row (the last supervised run, less its trailing special and
  whitespace-only tokens), for answer-only token accuracy;
* :func:`prompt_ids`: what a server feeds the model to generate that answer (the turns before it and the template's
  generation prompt), for generation;
* :func:`choice_rows`: the same conversation with each candidate answer as the final turn, for scoring candidates;
* :func:`normalize`: the comparison of a generated or picked answer with the reference.
"""

from __future__ import annotations

import unicodedata

from .batches import IGNORE_INDEX
from .records import DataError


def normalize(text: str) -> str:
    """The exact-match normalisation: Unicode NFKC, case folded, every whitespace run one space, ends stripped
    (``" Great\\n"`` and ``"great"`` match; ``"great!"`` does not)."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


class AnswerTokens:
    """Which token ids trail an answer without being part of it: special tokens (end-of-turn, EOS) and tokens that
    decode to whitespace only (the newline many templates put after the marker). Decodes are cached per id."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
        self.special = set(tokenizer.all_special_ids) | {i for i, t in added.items() if getattr(t, "special", False)}
        self._blank: dict[int, bool] = {}

    def trailing(self, token_id: int) -> bool:
        if token_id in self.special:
            return True
        if token_id not in self._blank:
            self._blank[token_id] = not self.tokenizer.decode([token_id]).strip()
        return self._blank[token_id]


def last_supervised_run(labels: list[int]) -> tuple[int, int]:
    """``(start, end)`` of the last run of supervised labels (the final assistant turn); ``start == end`` if none."""
    end = len(labels)
    while end and labels[end - 1] == IGNORE_INDEX:
        end -= 1
    start = end
    while start and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    return start, end


def answer_span(ids: list[int], labels: list[int], tokens: AnswerTokens) -> tuple[int, int, int]:
    """``(start, end, turn_end)``: the final answer is ``ids[start:end]``; ``ids[end:turn_end]`` is what the template
    closes the turn with (supervised too, so the model learns to stop). ``start == end`` when the row has no answer
    token (an empty answer, or one cut away by truncation)."""
    start, turn_end = last_supervised_run(labels)
    end = turn_end
    while end > start and tokens.trailing(ids[end - 1]):
        end -= 1
    return start, end, turn_end


def final_answer(messages: list[dict]) -> tuple[int, str]:
    """The index and content of the last assistant message (the reference answer)."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return last, messages[last]["content"]


def prompt_ids(messages: list[dict], tokenizer, max_length: int) -> list[int]:
    """The tokens a server feeds the model to answer the final assistant turn: the turns before it rendered with the
    generation prompt. Longer than ``max_length``: its last ``max_length`` tokens, after the leading BOS (kept)."""
    last, _ = final_answer(messages)
    text = tokenizer.apply_chat_template(messages[:last], tokenize=False, add_generation_prompt=True)
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if len(ids) > max_length:
        head = 1 if ids[0] == tokenizer.bos_token_id else 0
        ids = ids[:head] + ids[len(ids) - (max_length - head):]
    return ids


def choice_rows(messages: list[dict], choices: list[str], encode) -> list[dict]:
    """One row per candidate: the conversation up to the final assistant turn, with the candidate as that turn.
    ``encode(messages)`` tokenizes as training does (``encode_chat`` with the run's max_length and truncation). Each
    row gets ``score_start``/``score_end``: the candidate's tokens and the end-of-turn marker, whose summed
    log-likelihood is the candidate's score (the marker makes "yes" and "yes, but" differ by more than a prefix)."""
    last, _ = final_answer(messages)
    rows = []
    for choice in choices:
        row = encode([*messages[:last], {"role": "assistant", "content": choice}])
        start, end = last_supervised_run(row["labels"])
        if start == end:
            raise DataError(f"candidate {choice!r} of eval_choices keeps no token within max_length; increase "
                            "max_length")
        rows.append({**row, "score_start": start, "score_end": end})
    return rows
