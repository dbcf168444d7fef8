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


@contextlib.contextmanager
def without_zero_init(deepspeed_plugin):
    """Models built inside the block are built whole on this process, even with ZeRO-3 configured.

    transformers builds inside ``deepspeed.zero.Init`` whenever its global DeepSpeed config says stage 3 (accelerate's
    ``zero3_init_context_manager(False)`` re-registers the same stage-3 config, so it does not help); we unregister it
    for the block and register accelerate's object again after.
    """
    hf_config = getattr(deepspeed_plugin, "dschf", None)
    if hf_config is None:
        yield
        return
    from transformers.integrations import set_hf_deepspeed_config, unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        set_hf_deepspeed_config(hf_config)


def _elements(params: Iterable[nn.Parameter]) -> tuple[int, int, int, int]:
    """(elements in full, elements on this rank, bytes in full, bytes on this rank)."""
    total = local = total_b = local_b = 0
    for p in params:
        full = p.ds_numel if is_partitioned(p) else p.numel()
        mine = p.ds_tensor.numel() if is_partitioned(p) else full
        size = (p.ds_tensor if is_partitioned(p) else p).element_size()
        total, local, total_b, local_b = total + full, local + mine, total_b + full * size, local_b + mine * size
    return total, local, total_b, local_b


def sharding_report(model: nn.Module, adapter: list[nn.Parameter]) -> dict[str, int]:
    """How much of the adapter (elements) and of the frozen base (bytes, packed 4-bit included) this rank holds;
    "on rank" equals the total when nothing is partitioned."""
    ids = {id(p) for p in adapter}
    a_total, a_local, _, _ = _elements(adapter)
    _, _, b_total, b_local = _elements(p for p in model.parameters() if id(p) not in ids)
    return {
        "adapter_elements": a_total,
        "adapter_elements_on_rank": a_local,
        "base_bytes": b_total,
        "base_bytes_on_rank": b_local,
    }
