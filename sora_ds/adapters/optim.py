"""One AdamW optimizer for SoRA and AdaLoRA: ordinary param groups, plus flagged groups with extra work per step.

DeepSpeed accepts a single client optimizer, so the gates cannot have an optimizer of their own (as in the
authors' code); they are a param group carrying ``sora_gate=True``, ``sparse_lambda`` and ``threshold_mode``.
Under ZeRO, DeepSpeed calls :meth:`AdapterAdamW.step` with each group's ``params`` replaced by a flat fp32 shard;
under FSDP2 the params are DTensors, stepped on their local rows. The soft threshold is element-wise, so it is exact
on shards and needs no communication.

AdaLoRA's Q, P and E form one group flagged ``adalora=True``, handed after each update to the optimizer's
:class:`sora_ds.adapters.allocator.RankAllocator` (importance scores, global budget, masks), for the same reason: only there
are the gradients and the fp32 master both at hand under ZeRO.
"""

from __future__ import annotations

import torch
from torch import nn

from .allocator import RankAllocator
from .config import AdaLoRAConfig
from .inject import branch_parameters, gate_parameters, adapter_layers
from .prox import THRESHOLD_MODES, soft_threshold_, threshold
from ..engine import stepped_values


class AdapterAdamW(torch.optim.AdamW):
    """``torch.optim.AdamW`` followed, for groups flagged ``sora_gate``, by ``g <- soft_threshold(g, tau)``, and for
    a group flagged ``adalora``, by :meth:`RankAllocator.after_update` of ``rank_allocator``.

    ``tau`` follows the group's ``threshold_mode`` (see :mod:`sora_ds.adapters.prox`) using the group's current ``lr`` and
    ``sparse_lambda``; a scheduler changes ``sparse_lambda`` with :func:`set_sparse_lambda`.
    """

    rank_allocator: RankAllocator | None = None

    @torch.no_grad()
    def step(self, closure=None):
        loss = super().step(closure)
        for group in self.param_groups:
            if group.get("sora_gate"):
                tau = threshold(group["lr"], group["sparse_lambda"], group["threshold_mode"])
                # On this rank's values (FSDP2 steps DTensors: their local rows), so no collective.
                soft_threshold_([stepped_values(p) for p in group["params"]], tau)
            elif group.get("adalora") and group["params"]:  # ZeRO-3 steps one sub-group at a time
                self.rank_allocator.after_update(self, group)
        return loss


def set_sparse_lambda(optimizer: torch.optim.Optimizer, value: float) -> None:
    """Set lambda on every gate group (works through accelerate's and DeepSpeed's optimizer wrappers)."""
    for group in optimizer.param_groups:
        if group.get("sora_gate"):
            group["sparse_lambda"] = value


def build_optimizer(
    model: nn.Module,
    learning_rate: float = 1e-3,
    weight_decay: float = 0.0,
    sparse_lambda: float = 0.0,
    threshold_mode: str = "lr_scaled",
    gate_learning_rate: float | None = None,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    fused: bool = False,
) -> AdapterAdamW:
    """A :class:`AdapterAdamW` over every trainable parameter of ``model``.

    Groups for SoRA: adapter A/B (with ``weight_decay``), other trainable parameters such as a classification head
    (``weight_decay`` on matrices only), and the gates (``weight_decay`` forced to 0: decay would fight the L1
    shrink and is not part of SoRA's objective). For a model injected with an :class:`~sora_ds.AdaLoRAConfig`
    the adapter is one ``adalora`` group (Q, P, E with ``weight_decay``, as PEFT's AdaLoRA trains them) driven by a
    :class:`~sora_ds.adapters.allocator.RankAllocator`; ``sparse_lambda``, ``threshold_mode`` and ``gate_learning_rate`` do
    not apply.

    ``fused``: torch's fused AdamW kernel (one kernel for the whole update; CUDA, and CPU since torch 2.4) instead
    of the ``foreach`` one. The proximal step on the gates and AdaLoRA's allocator run after it either way, on the
    updated values (:meth:`AdapterAdamW.step`).
    """
    if learning_rate <= 0:
        raise ValueError(f"learning_rate must be > 0, got {learning_rate}")
    kernel = {"fused": True} if fused else {"foreach": True}  # torch refuses both together
    config = getattr(model, "adapter_config", None)
    if isinstance(config, AdaLoRAConfig):
        allocator = RankAllocator(list(adapter_layers(model)), config)
        adapter = allocator.parameters()
        groups = [{"params": adapter, "weight_decay": weight_decay, "adalora": True},
                  *_other_groups(model, {id(p) for p in adapter}, weight_decay)]
        optimizer = AdapterAdamW([g for g in groups if g["params"]], lr=learning_rate, betas=betas, eps=eps, **kernel)
        optimizer.rank_allocator = allocator
        return optimizer
    if threshold_mode not in THRESHOLD_MODES:
        raise ValueError(f"threshold_mode must be one of {THRESHOLD_MODES}, got {threshold_mode!r}")
    if sparse_lambda < 0:
        raise ValueError(f"sparse_lambda must be >= 0, got {sparse_lambda}")
    gates = gate_parameters(model)
    if not gates and not any(True for _ in adapter_layers(model)):
        raise ValueError("model has no adapter layers; call sora_ds.inject(model, config) first")
    branch = [p for p in branch_parameters(model) if p.requires_grad]
    groups = [
        {"params": branch, "weight_decay": weight_decay, "sora_gate": False},
        *_other_groups(model, {id(p) for p in branch} | {id(g) for g in gates}, weight_decay),
        {
            "params": gates,
            "weight_decay": 0.0,
            "sora_gate": True,
            "sparse_lambda": sparse_lambda,
            "threshold_mode": threshold_mode,
            "lr": gate_learning_rate if gate_learning_rate is not None else learning_rate,
        },
    ]
    groups = [g for g in groups if g["params"]]
    # foreach: one batched kernel per op over all tensors (torch picks it on CUDA already, not on CPU), which
    # matters here because SoRA adds many tiny gate tensors.
    return AdapterAdamW(groups, lr=learning_rate, betas=betas, eps=eps, weight_decay=weight_decay, **kernel)


def _other_groups(model: nn.Module, adapter_ids: set[int], weight_decay: float) -> list[dict]:
    """Trainable parameters beside the adapter (e.g. a classification head): weight decay on matrices only."""
    other = [p for p in model.parameters() if p.requires_grad and id(p) not in adapter_ids]
    return [
        {"params": [p for p in other if p.ndim >= 2], "weight_decay": weight_decay, "sora_gate": False},
        {"params": [p for p in other if p.ndim < 2], "weight_decay": 0.0, "sora_gate": False},
    ]


def unwrap_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The :class:`AdapterAdamW` inside accelerate's and DeepSpeed's optimizer wrappers."""
    while not isinstance(optimizer, AdapterAdamW) and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


def adalora_budget(optimizer: torch.optim.Optimizer) -> int | None:
    """The current AdaLoRA triplet budget (None for SoRA), through accelerate's and DeepSpeed's wrappers."""
    allocator = getattr(unwrap_optimizer(optimizer), "rank_allocator", None)
    return None if allocator is None else allocator.budget


def gate_l1_penalty(model: nn.Module, gate_l1: float) -> torch.Tensor | float:
    """``gate_l1 * sum_modules(sum|g| / numel(g))``: the optional L1 loss term of the SoRA authors' scripts."""
    if gate_l1 == 0:
        return 0.0
    return gate_l1 * sum(g.abs().sum() / g.numel() for g in gate_parameters(model))
