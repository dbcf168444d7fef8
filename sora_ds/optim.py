"""One AdamW optimizer for SoRA: ordinary param groups, plus a flagged gate group that gets a proximal step.

DeepSpeed accepts a single client optimizer, so the gates cannot have an optimizer of their own (as in the
authors' code); they are a param group carrying ``sora_gate=True``, ``sparse_lambda`` and ``threshold_mode``.
Under ZeRO, DeepSpeed calls :meth:`SoRAAdamW.step` with each group's ``params`` replaced by a flat fp32 shard:
the soft threshold is element-wise, so it is exact on shards and needs no communication.
"""

from __future__ import annotations

import torch
from torch import nn

from .inject import branch_parameters, gate_parameters, sora_modules
from .prox import THRESHOLD_MODES, soft_threshold_, threshold


class SoRAAdamW(torch.optim.AdamW):
    """``torch.optim.AdamW`` followed, for groups flagged ``sora_gate``, by ``g <- soft_threshold(g, tau)``.

    ``tau`` follows the group's ``threshold_mode`` (see :mod:`sora_ds.prox`) using the group's current ``lr`` and
    ``sparse_lambda``; a scheduler changes ``sparse_lambda`` with :func:`set_sparse_lambda`.
    """

    @torch.no_grad()
    def step(self, closure=None):
        loss = super().step(closure)
        for group in self.param_groups:
            if group.get("sora_gate"):
                tau = threshold(group["lr"], group["sparse_lambda"], group["threshold_mode"])
                soft_threshold_(group["params"], tau)
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
) -> SoRAAdamW:
    """A :class:`SoRAAdamW` over every trainable parameter of ``model``.

    Groups: adapter A/B (with ``weight_decay``), other trainable parameters such as a classification head
    (``weight_decay`` on matrices only), and the gates (``weight_decay`` forced to 0: decay would fight the L1
    shrink and is not part of SoRA's objective).
    """
    if threshold_mode not in THRESHOLD_MODES:
        raise ValueError(f"threshold_mode must be one of {THRESHOLD_MODES}, got {threshold_mode!r}")
    if sparse_lambda < 0:
        raise ValueError(f"sparse_lambda must be >= 0, got {sparse_lambda}")
    if learning_rate <= 0:
        raise ValueError(f"learning_rate must be > 0, got {learning_rate}")
    gates = gate_parameters(model)
    if not gates and not any(True for _ in sora_modules(model)):
        raise ValueError("model has no SoRA layers; call sora_ds.inject(model, config) first")
    branch = [p for p in branch_parameters(model) if p.requires_grad]
    adapter_ids = {id(p) for p in branch} | {id(g) for g in gates}
    other = [p for p in model.parameters() if p.requires_grad and id(p) not in adapter_ids]
    groups = [
        {"params": branch, "weight_decay": weight_decay, "sora_gate": False},
        {"params": [p for p in other if p.ndim >= 2], "weight_decay": weight_decay, "sora_gate": False},
        {"params": [p for p in other if p.ndim < 2], "weight_decay": 0.0, "sora_gate": False},
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
    return SoRAAdamW(groups, lr=learning_rate, betas=betas, eps=eps, weight_decay=weight_decay, foreach=True)


def gate_l1_penalty(model: nn.Module, gate_l1: float) -> torch.Tensor | float:
    """``gate_l1 * sum_modules(sum|g| / numel(g))``: the optional L1 loss term of the SoRA authors' scripts."""
    if gate_l1 == 0:
        return 0.0
    return gate_l1 * sum(g.abs().sum() / g.numel() for g in gate_parameters(model))
