"""AdaLoRA's orthogonality penalty ``||Q Q^T - I||_F + ||P^T P - I||_F``, computed inside the layer's forward.

Why inside the forward, and why a custom autograd function: under ZeRO-3 a module's adapter is whole only while
the module runs; a penalty computed afterwards (as PEFT does, with one gather per matrix per step) pays a collective
per parameter. Computed in the forward it costs nothing extra to gather, but its backward must also run while the
adapter is gathered again. DeepSpeed re-gathers a module's parameters when the gradient reaches the module's
*output*; so the penalty is made an extra output of the same autograd node that passes the layer output through,
and its backward runs only once that output's gradient has arrived, with the parameters present.

The gradient is analytic: for ``M = Q Q^T - I`` (symmetric), ``d||M||_F / dQ = 2 M Q / ||M||_F``; for
``N = P^T P - I``, ``d||N||_F / dP = 2 P N / ||N||_F``.
"""

from __future__ import annotations

import torch
from torch import nn


def _wide(x: torch.Tensor) -> torch.Tensor:
    """At least fp32 (bf16 adapters under ZeRO-3), float64 kept; no copy when already so."""
    return x.detach().to(torch.promote_types(x.dtype, torch.float32))


def _gram_residual(x: torch.Tensor) -> torch.Tensor:
    """``x x^T - I`` for Q (r x in); pass ``P^T`` for P. The identity is subtracted in place on the diagonal."""
    gram = x @ x.transpose(0, 1)
    gram.diagonal().sub_(1.0)
    return gram


class _OrthPenalty(torch.autograd.Function):
    # A few tiny ops per adapted module and step, so the residuals and norms from the forward are kept for the
    # backward (r x r each) rather than recomputed.
    @staticmethod
    def forward(ctx, out, lora_A, lora_B):
        a, b = _wide(lora_A), _wide(lora_B)
        m, n = _gram_residual(a), _gram_residual(b.transpose(0, 1))
        norms = torch.stack((torch.linalg.matrix_norm(m), torch.linalg.matrix_norm(n)))
        ctx.save_for_backward(lora_A, lora_B, m, n, norms)
        return out.view_as(out), norms.sum().to(out.dtype if out.is_floating_point() else torch.float32)

    @staticmethod
    def backward(ctx, grad_out, grad_pen):
        lora_A, lora_B, m, n, norms = ctx.saved_tensors  # read once: checkpointing allows a single unpack
        grad_a = grad_b = None
        if grad_pen is not None:
            # d||M||_F/dQ = 2 M Q / ||M||_F (M symmetric); d||N||_F/dP = 2 P N / ||N||_F
            coef = (2 * grad_pen.to(norms.dtype)) / norms.clamp_min(1e-12)
            grad_a = (m @ _wide(lora_A)).mul_(coef[0]).to(lora_A.dtype)
            grad_b = (_wide(lora_B) @ n).mul_(coef[1]).to(lora_B.dtype)
        return grad_out, grad_a, grad_b


def with_orth_penalty(out: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor):
    """``(out, penalty)``: ``out`` unchanged, and the differentiable penalty of this module's Q (``lora_A``) and P
    (``lora_B``)."""
    return _OrthPenalty.apply(out, lora_A, lora_B)


def orth_loss(model: nn.Module, weight: float) -> torch.Tensor | float:
    """``weight * mean over adapted matrices`` of the penalties left by the last training forward (P and Q count as
    two matrices each, as in PEFT), to add to the loss before backward. Clears them, so a forward is counted once."""
    if weight == 0:  # SoRA runs, or AdaLoRA without the penalty (its layers then compute none): no module walk
        return 0.0
    pens, n = [], 0
    for m in model.modules():
        if getattr(m, "orth_penalty", False):  # adapter layers built with the penalty (no import of them: no cycle)
            n += 2
            if m.last_orth is not None:
                pens.append(m.last_orth)
                m.last_orth = None
    if not pens:
        return 0.0
    return weight * torch.stack([p.float() for p in pens]).sum() / n
