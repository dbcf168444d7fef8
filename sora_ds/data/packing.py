"""Sequence packing: several tokenized examples per row of ``max_length`` tokens, still trained one by one.

Rows are filled best-fit-decreasing (longest example first, into the fullest row it still fits), so padding is
rare and the result depends only on the data. Each packed row carries ``position_ids`` that restart at 0 for every
example and no ``attention_mask``: from these transformers builds a block-diagonal causal mask (any attention
implementation), so an example neither attends to nor is predicted from its neighbours, and its rotary positions
are those it has alone. The first label of every example is masked as well: under the causal shift it would be
predicted from the previous example's last token.
"""

from __future__ import annotations

import bisect

from .batches import IGNORE_INDEX


def pack_examples(rows: list[dict], max_length: int) -> list[dict]:
    """Pack rows with ``input_ids`` and ``labels`` (each at most ``max_length`` long) into rows of at most
    ``max_length`` tokens with ``input_ids``, ``labels`` and ``position_ids``."""
    too_long = [i for i, r in enumerate(rows) if len(r["input_ids"]) > max_length]
    if too_long:
        raise ValueError(f"examples {too_long[:5]} are longer than max_length={max_length}; truncate them first")
    order = sorted(range(len(rows)), key=lambda i: (-len(rows[i]["input_ids"]), i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, bin index), sorted: the fullest row with enough room comes first
    for i in order:
        size = len(rows[i]["input_ids"])
        at = bisect.bisect_left(free, (size, -1))
        if at < len(free):
            room, b = free.pop(at)
        else:
            room, b = max_length, len(bins)
            bins.append([])
        bins[b].append(i)
        if room - size > 0:
            bisect.insort(free, (room - size, b))
    packed = []
    for members in bins:
        ids, labels, positions = [], [], []
        for i in sorted(members):  # data order within a row
            n = len(rows[i]["input_ids"])
            ids += rows[i]["input_ids"]
            labels += [IGNORE_INDEX] + list(rows[i]["labels"][1:])
            positions += list(range(n))
        packed.append({"input_ids": ids, "labels": labels, "position_ids": positions})
    return packed
