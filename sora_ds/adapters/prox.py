"""The proximal operator of the L1 norm (soft threshold), used to train SoRA gates.

Threshold conventions (``threshold_mode``):

* ``"lr_scaled"`` (default, textbook proximal SGD): ``tau = lr_t * lambda``, where ``lr_t`` is the gate group's
  learning rate at this step, so the shrink follows the LR schedule.
* ``"absolute"`` (the SoRA authors' released scripts): ``tau = lambda``, whatever the learning rate.

The operator is purely element-wise, so it gives the same answer on a whole gate vector and on any slice of it,
which is what lets it run on DeepSpeed's flat fp32 shards with no communication.
"""

from __future__ import annotations

import torch

THRESHOLD_MODES = ("lr_scaled", "absolute")


def threshold(lr: float, sparse_lambda: float, threshold_mode: str) -> float:
    """The shrink ``tau`` for one step under the given convention."""
    if threshold_mode == "lr_scaled":
        return lr * sparse_lambda
    if threshold_mode == "absolute":
        return sparse_lambda
    raise ValueError(f"threshold_mode must be one of {THRESHOLD_MODES}, got {threshold_mode!r}")


def soft_threshold(x: torch.Tensor, tau: float) -> torch.Tensor:
    """``sign(x) * max(|x| - tau, 0)``, exact: |x| <= tau gives 0, anything larger is shrunk by tau.

    Inputs narrower than fp32 are computed in fp32 and rounded once at the end, so a value just above ``tau`` is
    shrunk rather than lost to an intermediate rounding. Returns a new tensor of ``x``'s dtype.
    """
    if tau < 0:
        raise ValueError(f"soft-threshold tau must be >= 0, got {tau}")
    x32 = x.to(torch.promote_types(x.dtype, torch.float32))  # bf16/fp16 -> fp32; fp64 stays fp64
    out = torch.sign(x32) * torch.clamp(x32.abs() - tau, min=0.0)
    return out.to(x.dtype)


def soft_threshold_(tensors: list[torch.Tensor], tau: float) -> None:
    """In-place :func:`soft_threshold` of many tensors at once, as the optimizer applies it.

    fp32/fp64 tensors go through one batched ``x - clamp(x, -tau, tau)``: for ``|x| > tau`` that is ``x -+ tau``
    (one rounding, the same value as ``sign(x) * (|x| - tau)``), otherwise exactly 0. Narrower dtypes use the
    reference function, which computes in fp32 and rounds once.
    """
    if tau < 0:
        raise ValueError(f"soft-threshold tau must be >= 0, got {tau}")
    if tau == 0 or not tensors:
        return
    wide = [t for t in tensors if t.dtype in (torch.float32, torch.float64)]
    if wide:
        torch._foreach_sub_(wide, torch._foreach_clamp_max(torch._foreach_clamp_min(wide, -tau), tau))
    for t in tensors:
        if t.dtype not in (torch.float32, torch.float64):
            t.copy_(soft_threshold(t, tau))
