"""The engine interface, dispatched per parameter: a DTensor is FSDP2's (:mod:`.fsdp`), a parameter with a ``ds_id``
is DeepSpeed ZeRO-3's (:mod:`.deepspeed`), anything else is whole on this process (both modules treat it so).
This is the only place that chooses between the engines."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch
from torch import nn

from . import deepspeed, fsdp


def _engine(param: torch.Tensor):
    return fsdp if fsdp.is_partitioned(param) else deepspeed


def is_partitioned(param: torch.Tensor) -> bool:
    return _engine(param).is_partitioned(param)


def local_shard(param: torch.Tensor) -> torch.Tensor:
    """The values of ``param`` this rank holds (ZeRO-3: its zero-padded partition; FSDP2: its rows; else all)."""
    return _engine(param).local_shard(param)


def local_numel(param: torch.Tensor) -> int:
    """How many of ``param``'s elements this rank holds (padding left out): summed over the ranks, ``numel`` once
    when sharded and once per rank otherwise."""
    return _engine(param).local_numel(param)


def stepped_values(t: torch.Tensor) -> torch.Tensor:
    """The values of a tensor the optimizer steps, to work on in place: FSDP2's DTensor -> its local rows; a ZeRO
    flat fp32 shard or a whole parameter -> itself (not :func:`local_shard`: DeepSpeed's flat shards may carry a
    ``ds_id`` without being partitioned parameters)."""
    return t.to_local() if fsdp.is_partitioned(t) else t


def optimizer_fragments(p: nn.Parameter, stepped: dict[int, torch.Tensor]):
    """See :func:`sora_ds.engine.deepspeed.optimizer_fragments`: ``(sharded, [(stepped tensor, offset in its local
    shard, offset in flattened p, count)])``; the local shard of a stepped tensor is :func:`stepped_values`."""
    return _engine(p).optimizer_fragments(p, stepped)


@contextlib.contextmanager
def gathered(params: Iterable[nn.Parameter]):
    """Full values of ``params`` inside the block, whichever engine shards each (read-only; a collective)."""
    params = list(params)
    with fsdp.gathered([p for p in params if fsdp.is_partitioned(p)]), \
            deepspeed.gathered([p for p in params if not fsdp.is_partitioned(p)]):
        yield


def _elements(params: Iterable[torch.Tensor]) -> tuple[int, int, int, int]:
    """(elements in full, elements on this rank, bytes in full, bytes on this rank)."""
    params = list(params)
    z = deepspeed._elements(p for p in params if not fsdp.is_partitioned(p))
    f = fsdp._elements(p for p in params if fsdp.is_partitioned(p))
    return tuple(a + b for a, b in zip(z, f))


def sharding_report(model: nn.Module, adapter: list[nn.Parameter]) -> dict[str, int]:
    """How much of the adapter (elements) and of the frozen base (bytes, packed 4-bit included) this rank holds;
    "on rank" equals the total when nothing is partitioned."""
    fsdp.reshard(model)  # what this rank holds between steps, not what an evaluation left gathered
    ids = {id(p) for p in adapter}
    a_total, a_local, _, _ = _elements(adapter)
    _, _, b_total, b_local = _elements(p for p in model.parameters() if id(p) not in ids)
    return {
        "adapter_elements": a_total,
        "adapter_elements_on_rank": a_local,
        "base_bytes": b_total,
        "base_bytes_on_rank": b_local,
    }
