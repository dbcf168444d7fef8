"""ZeRO-3 awareness in one place. Everything here is a no-op on a model that DeepSpeed has not partitioned.

Under ZeRO-3 a parameter's ``.data`` on each rank holds only that rank's slice (size 0 outside the forward pass);
:func:`gathered` materialises the full tensors for reading, on every rank (it is a collective: all ranks must
enter it with the same parameters in the same order).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

from torch import nn


def is_partitioned(param: nn.Parameter) -> bool:
    return hasattr(param, "ds_id")


@contextlib.contextmanager
def gathered(params: Iterable[nn.Parameter]):
    """Full values of ``params`` inside the block (read-only: edits would be overwritten from the fp32 master)."""
    params = [p for p in params if is_partitioned(p)]
    if not params:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield


def sharding_report(params: Iterable[nn.Parameter]) -> dict[str, int]:
    """Elements of ``params`` in full and held locally by this rank (equal when nothing is partitioned)."""
    total = local = 0
    for p in params:
        full = p.ds_numel if is_partitioned(p) else p.numel()
        total += full
        local += p.ds_tensor.numel() if is_partitioned(p) else full
    return {"adapter_elements": total, "adapter_elements_on_rank": local}
