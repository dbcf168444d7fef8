"""DeepSpeed ZeRO awareness in one place: every read of DeepSpeed's internals and of partitioned parameters is here.
Everything is a no-op on a model that DeepSpeed has not partitioned.

Under ZeRO-3 a parameter's ``.data`` on each rank holds only that rank's slice (size 0 outside the forward pass);
:func:`gathered` materialises the full tensors for reading, on every rank (it is a collective: all ranks must
enter it with the same parameters in the same order).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn

# The DeepSpeed versions the whole suite passed with (lowest and highest; scripts/dependency_bounds.md). AdaLoRA's
# allocation reads DeepSpeed internals (ZeRO-3: ``p._z3_optimizer`` with ``grad_position``, ``get_param_id`` and
# ``fp32_partitioned_groups_flat``; ZeRO-1/2: ``p._hp_mapping``), which change between releases without notice.
# 0.19.8 is also the first with DeepSpeed PR #8539: before it, GatheredParameters over many small tensors could return
# partly filled buffers on gloo (CPU), which made the ZeRO-3 kept-rank count wrong intermittently.
TESTED_DEEPSPEED = ("0.19.8", "0.19.8")
ALLOW_UNTESTED_DEEPSPEED = "SORA_DS_ALLOW_UNTESTED_DEEPSPEED"
ZERO3_INTERNALS = ("grad_position", "get_param_id", "fp32_partitioned_groups_flat")


class UnsupportedDeepSpeed(RuntimeError):
    """The installed DeepSpeed is outside the tested range, or lacks an internal sora_ds reads."""


def check_deepspeed_version(version: str | None = None) -> None:
    """Refuse, at start-up, a DeepSpeed outside ``TESTED_DEEPSPEED`` (set ``SORA_DS_ALLOW_UNTESTED_DEEPSPEED=1`` to
    try one anyway; :func:`check_deepspeed_internals` then still stops a run whose internals moved)."""
    from packaging.version import Version

    if version is None:
        import deepspeed

        version = deepspeed.__version__
    low, high = TESTED_DEEPSPEED
    if Version(low) <= Version(version.split("+")[0]) <= Version(high) or os.environ.get(ALLOW_UNTESTED_DEEPSPEED) == "1":
        return
    raise UnsupportedDeepSpeed(
        f"deepspeed {version} is outside the versions sora_ds is tested with ({low} to {high}): its ZeRO internals "
        f"may have moved. Install one in that range (pip install 'deepspeed>={low},<={high}'), or set "
        f"{ALLOW_UNTESTED_DEEPSPEED}=1 to try it"
    )


def check_deepspeed_internals(trainable: list[nn.Parameter], stage: int) -> None:
    """After ``accelerator.prepare``: the DeepSpeed internals AdaLoRA's allocation reads exist on the trainable
    parameters (a clear stop before the first step instead of an AttributeError inside it)."""
    if not stage or not trainable:
        return
    p = trainable[0]
    if stage == 3:
        z3 = getattr(p, "_z3_optimizer", None)
        missing = [a for a in ZERO3_INTERNALS if not hasattr(z3, a)] if z3 is not None else ["_z3_optimizer"]
    else:
        missing = [] if hasattr(p, "_hp_mapping") else ["_hp_mapping"]
    if missing:
        import deepspeed

        raise UnsupportedDeepSpeed(
            f"deepspeed {deepspeed.__version__} lacks the ZeRO-{stage} internals sora_ds reads ({missing}); "
            f"install a version from {TESTED_DEEPSPEED[0]} to {TESTED_DEEPSPEED[1]}"
        )


def launch_deepspeed_config(deepspeed_config: str | None = None) -> dict | None:
    """The DeepSpeed settings this process was launched with, read before accelerate is set up (as accelerate reads
    them): ``accelerate launch`` with DeepSpeed (its JSON, or only the ZeRO stage when it has none), else the recipe's
    ``deepspeed_config`` JSON (``deepspeed``/torchrun launchers); None without DeepSpeed."""
    import json
    from pathlib import Path

    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false") == "true":
        path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
        if path in ("none", "None", "") or not Path(path).is_file():  # a missing file: accelerate says so next
            return {"zero_optimization": {"stage": int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", 2))}}
        return json.loads(Path(path).read_text())
    return json.loads(Path(deepspeed_config).read_text()) if deepspeed_config else None


def zero_stage(accelerator) -> int:
    """The ZeRO stage accelerate runs DeepSpeed with; 0 without DeepSpeed."""
    plugin = accelerator.state.deepspeed_plugin
    return plugin.zero_stage if plugin is not None else 0


def is_partitioned(param: nn.Parameter) -> bool:
    return hasattr(param, "ds_id")


def local_shard(param: nn.Parameter) -> torch.Tensor:
    """The values of ``param`` this rank holds: its ZeRO-3 partition (zero-padded), else the whole tensor. For
    element-wise reductions that need no gather (e.g. counting non-zero gates across ranks)."""
    return param.ds_tensor if is_partitioned(param) else param.data


def local_numel(param: nn.Parameter) -> int:
    """How many of ``param``'s elements :func:`local_shard` holds (its zero padding left out): summed over the ranks
    this is ``numel`` once under ZeRO-3 and once per rank otherwise, the denominator for counts over shards."""
    if not is_partitioned(param):
        return param.numel()
    size = param.partition_numel()
    return max(0, min(size, param.ds_numel - dist.get_rank(group=param.ds_process_group) * size))


Fragment = tuple[torch.Tensor, int, int, int]  # (stepped tensor, offset in it, offset in flattened p, count)


def optimizer_fragments(p: nn.Parameter, stepped: dict[int, torch.Tensor]) -> tuple[bool, list[Fragment]]:
    """Where this rank's elements of ``p`` sit in the tensors its optimizer steps (``stepped``, by ``id``).

    Returns ``(sharded, fragments)``: ``sharded`` is True when DeepSpeed ZeRO steps flat shards instead of ``p``.
    One process or DDP: ``p`` itself. ZeRO-3: this rank's slice of ``p`` (elements ``[rank * ps, rank * ps + ps)``,
    zero-padded) inside its sub-group's flat fp32 tensor. ZeRO-1/2: a contiguous fragment of the flat buffer.
    """
    if id(p) in stepped:
        return False, [(p, 0, 0, p.numel())]
    if is_partitioned(p):
        ps = p.partition_numel()
        p_off = dist.get_rank(group=p.ds_process_group) * ps
        count = max(0, min(ps, p.ds_numel - p_off))
        # DeepSpeed's own record of where p's shard sits in its sub-group's flat fp32 tensor (the public
        # safe_get_local_fp32_param returns a copy when the optimizer is offloaded, which would hide the offset).
        z3 = p._z3_optimizer
        sub_group, t_off, _ = z3.grad_position[z3.get_param_id(p)]
        flat = z3.fp32_partitioned_groups_flat[sub_group]
        if count and id(flat) in stepped:
            return True, [(flat, t_off, p_off, count)]
        view = None
    elif getattr(p, "_hp_mapping", None) is not None:
        address = p._hp_mapping.lp_fragment_address
        p_off, count = address.start, address.numel
        view = p._hp_mapping.get_hp_fragment()
    elif hasattr(p, "_hp_mapping"):  # ZeRO-1/2, and no element of p on this rank
        return True, []
    else:
        raise RuntimeError(f"parameter of shape {tuple(p.shape)} is not stepped by this optimizer")
    if count == 0:
        return True, []
    for t in stepped.values() if view is not None else ():
        if t.untyped_storage().data_ptr() == view.untyped_storage().data_ptr():
            return True, [(t, (view.data_ptr() - t.data_ptr()) // t.element_size(), p_off, count)]
    raise RuntimeError(
        "AdaLoRA parameters are split across DeepSpeed optimizer sub-groups (or swapped to NVMe); raise "
        "zero_optimization.sub_group_size above the adapter size, or do not offload the optimizer to NVMe"
    )


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


def release_gathered(model) -> None:
    """ZeRO-3: partition again every parameter the engine still holds whole. A forward pass without a backward (an
    evaluation) leaves the layers DeepSpeed prefetched gathered, or still in flight, which holds memory that does not
    divide and makes a following :func:`gathered` fail ("Cannot partition a param in flight"). A no-op otherwise."""
    optimizer = getattr(model, "optimizer", None)
    if hasattr(optimizer, "empty_partition_cache"):  # the DeepSpeed engine under ZeRO-3
        model.empty_partition_cache()


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
