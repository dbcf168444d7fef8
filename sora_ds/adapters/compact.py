"""Prune dead ranks: an adapter layer whose gate entry is exactly zero contributes nothing through that rank.

``compact`` drops those rows of A and columns of B and folds the gate into B (``B' = B[:, keep] * g[keep]``);
the result is an ordinary LoRA of per-module rank with the same outputs, since the scale stays ``alpha / r_init``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .inject import replace_module, adapter_layers
from .layer import GatedLoRALinear
from ..engine import gathered


@dataclass(frozen=True)
class PrunedBranch:
    """The plain-LoRA form of one module: ``delta W = scale * B @ A``, rank ``A.shape[0]`` (possibly 0)."""

    lora_A: torch.Tensor  # kept x in
    lora_B: torch.Tensor  # out x kept, gate folded in
    scale: float
    initial_rank: int

    @property
    def rank(self) -> int:
        return self.lora_A.shape[0]


def pruned_branch(module: GatedLoRALinear) -> PrunedBranch:
    """The compacted tensors of one module (detached copies; the module is unchanged). Reads full tensors: under
    ZeRO-3 call it inside :func:`sora_ds.engine.deepspeed.gathered` (as :func:`pruned_branches` does)."""
    a, b = module.lora_A.detach(), module.lora_B.detach()
    if module.gate is None:
        return PrunedBranch(a.clone(), b.clone(), module.scale, module.initial_rank)
    g = module.gate.detach()
    keep = g != 0
    return PrunedBranch(a[keep].clone(), (b[:, keep] * g[keep]).clone(), module.scale, module.initial_rank)


def adapter_tensors(modules: list[GatedLoRALinear]) -> list[nn.Parameter]:
    return [p for m in modules for p in (m.lora_A, m.lora_B, m.gate) if p is not None]


def pruned_branches(model: nn.Module) -> dict[str, PrunedBranch]:
    """Every module's compacted tensors; under ZeRO-3 the adapter (only) is gathered in one batched exchange."""
    modules = dict(adapter_layers(model))
    with gathered(adapter_tensors(list(modules.values()))):
        return {name: pruned_branch(m) for name, m in modules.items()}


def rank_report(model: nn.Module) -> dict[str, dict[str, int]]:
    """``{module: {"initial": r_init, "kept": nonzero gates}}`` without changing the model. Under ZeRO-3 all gates
    are gathered in one batched exchange (a collective: every rank calls it)."""
    modules = dict(adapter_layers(model))
    with gathered([m.gate for m in modules.values() if m.gate is not None]):
        return {
            name: {"initial": m.initial_rank, "kept": m.r if m.gate is None else int((m.gate.detach() != 0).sum())}
            for name, m in modules.items()
        }


@torch.no_grad()
def compact(model: nn.Module) -> dict[str, dict[str, int]]:
    """Turn every adapter layer into a plain LoRA of its kept rank, in place; a module with no rank left becomes its
    base layer again. Returns the rank report (initial and kept rank per module). Single-process models only:
    under ZeRO-3, export from the gathered adapter with :func:`sora_ds.export_peft` instead.
    """
    branches = pruned_branches(model)  # one gather serves both the report and the new tensors
    for name, module in list(adapter_layers(model)):
        branch = branches[name]
        if branch.rank == 0:
            replace_module(model, name, module.base_layer)
            continue
        module.lora_A = nn.Parameter(branch.lora_A, requires_grad=module.lora_A.requires_grad)
        module.lora_B = nn.Parameter(branch.lora_B, requires_grad=module.lora_B.requires_grad)
        module.gate = None
        module.r = branch.rank
    return {name: {"initial": b.initial_rank, "kept": b.rank} for name, b in branches.items()}
