"""PyTorch FSDP2 awareness in one place (``torch.distributed.fsdp.fully_shard``): the second sharding engine, beside
:mod:`.deepspeed`, providing the same functions for DTensor parameters.

Under FSDP2 every parameter of a sharded module is a ``DTensor`` sharded on dim 0 (``torch.chunk`` rows: rank ``k``
holds rows ``[k * ceil(n / world), ...)``, unpadded); the optimizer steps those DTensors, so the element-wise work of
SoRA and AdaLoRA runs on ``p.to_local()``, this rank's rows, with no communication. Reading whole values
(:func:`gathered`) all-gathers only the parameters asked for (the adapter, never the base) and swaps them into their
modules for the block.

:func:`shard` is how sora-ds shards a model: ``fully_shard`` on every transformer block (``_no_split_modules``) and
on the root, which is what accelerate's ``fsdp2_prepare_model`` does with ``TRANSFORMER_BASED_WRAP``. sora-ds calls
it itself because accelerate 1.15 turns an FSDP config into FSDP only on GPU-like devices (``MULTI_GPU``, ...): on CPU
(gloo) the processes stay ``MULTI_CPU`` and accelerate would wrap the model in DDP instead.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable

import torch
from torch import nn

OWNERS = "_sora_ds_owners"  # attribute set on each sharded parameter: the (module, name) pairs that hold it


def is_partitioned(param: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(param, DTensor)


def local_shard(param: torch.Tensor) -> torch.Tensor:
    """This rank's rows of ``param`` (a view: in-place edits change the parameter)."""
    return param.to_local() if is_partitioned(param) else param.data


def local_numel(param: torch.Tensor) -> int:
    return local_shard(param).numel()


def shard_offset(param: torch.Tensor) -> int:
    """Where this rank's elements start in the flattened full ``param`` (dim-0 sharding keeps them contiguous)."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    _, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    return offset[0] * math.prod(param.shape[1:])


def optimizer_fragments(p: nn.Parameter, stepped: dict[int, torch.Tensor]):
    """FSDP2 steps the DTensor ``p`` itself: its one fragment is this rank's local rows (offsets into
    ``local_shard(p)`` and into the flattened full ``p``)."""
    count = local_numel(p)
    return True, ([(p, 0, shard_offset(p), count)] if count else [])


def shard(model: nn.Module, reshard_after_forward: bool = True, mp_policy=None) -> nn.Module:
    """``fully_shard`` every transformer block (the classes in ``model._no_split_modules``), then the root; in place.
    Each sharded parameter remembers which modules hold it (for :func:`gathered`)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kwargs = {"reshard_after_forward": reshard_after_forward, "mp_policy": mp_policy or MixedPrecisionPolicy()}
    blocks = set(getattr(model, "_no_split_modules", None) or ())
    for module in list(model.modules())[1:]:
        if type(module).__name__ in blocks:
            fully_shard(module, **kwargs)
    fully_shard(model, **{**kwargs, "reshard_after_forward": False})  # the root's leftovers stay gathered
    record_owners(model)
    return model


def reshard(model: nn.Module) -> None:
    """Back to the sharded parameters everywhere (local, no collective). FSDP2 keeps the root's parameters (embeddings,
    head) gathered after a forward that no backward follows, e.g. an evaluation."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def record_owners(model: nn.Module) -> None:
    """Note on each DTensor parameter the modules that hold it, so :func:`gathered` can swap in full values (call
    it after ``fully_shard`` if the model was sharded by someone else, e.g. accelerate)."""
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if is_partitioned(p):
                owners = p.__dict__.setdefault(OWNERS, [])
                if not any(m is module and n == name for m, n in owners):
                    owners.append((module, name))


@contextlib.contextmanager
def gathered(params: Iterable[nn.Parameter]):
    """Full values of the DTensor ``params`` in their modules inside the block (all-gathered, only these; read-only:
    the sharded parameters come back unchanged after it). A collective: every rank enters with the same params."""
    params = [p for p in params if is_partitioned(p)]
    if not params:
        yield
        return
    missing = [tuple(p.shape) for p in params if not p.__dict__.get(OWNERS)]
    if missing:
        raise RuntimeError(f"FSDP2 parameters of shapes {missing[:3]} have no recorded modules: call "
                           "sora_ds.engine.fsdp.record_owners(model) after fully_shard")
    full = [nn.Parameter(f, requires_grad=p.requires_grad) for p, f in zip(params, _full_tensors(params))]
    # What each module holds now (FSDP2 may hold an unsharded copy, e.g. the root's after an eval) is put back after.
    swapped = [(m, n, m._parameters[n]) for p in params for m, n in p.__dict__[OWNERS]]
    try:
        for (module, name, _), f in zip(swapped, (f for p, f in zip(params, full) for _ in p.__dict__[OWNERS])):
            module._parameters[name] = f
        yield
    finally:
        for module, name, held in swapped:
            module._parameters[name] = held


def _full_tensors(params: list[torch.Tensor]) -> list[torch.Tensor]:
    """The full values of dim-0-sharded DTensors, in one all-gather per dtype (instead of one per tensor): every rank
    sends its rows of all of them, each padded to ``ceil(rows / world)`` rows (``torch.chunk``'s split, FSDP2's)."""
    import torch.distributed as dist
    from torch.distributed.tensor import Shard

    if any(p.placements != (Shard(0),) for p in params):  # not FSDP2's layout: let DTensor gather each one
        return [p.full_tensor() for p in params]
    group = params[0].device_mesh.get_group()
    world = dist.get_world_size(group)
    out: list[torch.Tensor | None] = [None] * len(params)
    for dtype in {p.dtype for p in params}:
        index = [i for i, p in enumerate(params) if p.dtype == dtype]
        sizes = [math.ceil(params[i].shape[0] / world) * math.prod(params[i].shape[1:]) for i in index]
        mine = torch.cat([torch.nn.functional.pad(local_shard(params[i]).reshape(-1), (0, n - local_numel(params[i])))
                          for i, n in zip(index, sizes)])
        parts = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(parts, mine, group=group)
        every = torch.stack(parts)  # world x sum(sizes)
        offset = 0
        for i, n in zip(index, sizes):
            p = params[i]
            rows = every[:, offset:offset + n].reshape(-1, *p.shape[1:])
            out[i] = rows[: p.shape[0]].clone()
            offset += n
    return out


def _elements(params: Iterable[torch.Tensor]) -> tuple[int, int, int, int]:
    """(elements in full, elements on this rank, bytes in full, bytes on this rank)."""
    total = local = total_b = local_b = 0
    for p in params:
        full, mine, size = p.numel(), local_numel(p), p.element_size()
        total, local, total_b, local_b = total + full, local + mine, total_b + full * size, local_b + mine * size
    return total, local, total_b, local_b


def local_state(named: dict[str, torch.Tensor], optimizer) -> dict:
    """This rank's part of the trainable parameters ``named`` and of the optimizer's state, as plain tensors (for a
    per-rank ``torch.save``; the frozen base is never in it). DTensor optimizer states (AdamW's moments) are saved
    as their local rows and recorded, so :func:`load_local_state` turns them back into DTensors."""
    opt = optimizer.state_dict()
    dtensor_keys = []
    for index, state in list(opt["state"].items()):
        state = opt["state"][index] = dict(state)  # state_dict shares the live per-parameter dicts: copy first
        for key, value in list(state.items()):
            if is_partitioned(value):
                state[key] = value.to_local().clone()
                dtensor_keys.append((index, key))
    return {"params": {n: local_shard(p).clone() for n, p in named.items()}, "optimizer": opt,
            "dtensor_keys": dtensor_keys}


@torch.no_grad()
def load_local_state(named: dict[str, torch.Tensor], optimizer, saved: dict) -> None:
    """Inverse of :func:`local_state` on the same process count: local rows back into the parameters, the optimizer
    state back with its DTensor moments."""
    for n, p in named.items():
        local_shard(p).copy_(saved["params"][n])
    optimizer.load_state_dict(saved["optimizer"])
    inner = optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer
    params = [p for group in inner.param_groups for p in group["params"]]
    from torch.distributed.tensor import DTensor

    for index, key in saved["dtensor_keys"]:
        p = params[index]
        state = inner.state[p]
        state[key] = DTensor.from_local(state[key], p.device_mesh, p.placements, run_check=False, shape=p.shape,
                                        stride=p.stride())
