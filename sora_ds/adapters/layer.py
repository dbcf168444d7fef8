"""The adapter layer: a frozen linear layer plus a gated low-rank branch, for SoRA and AdaLoRA alike.

``y = W x + scale * B (g * (A x))`` with A: r x in, B: out x r, g: r. For AdaLoRA, A is Q, B is P and g is the
singular-value vector E. After :func:`sora_ds.compact` the gate is folded into B and dropped (``gate is None``): the
module is then an ordinary LoRA of its own, smaller rank.
"""

from __future__ import annotations

import math
import zlib

import torch
import torch.nn.functional as F
from torch import nn

from .orthogonal import with_orth_penalty
from ..engine.quantized import adapter_dtype

LAYER_INITS = ("normal", "ones", "adalora")


class GatedLoRALinear(nn.Module):
    """Wraps ``base_layer`` (kept frozen) with a gated low-rank branch.

    Adapter tensors are fp32, except under ZeRO-3 where they take the base's float dtype (see
    :func:`sora_ds.engine.quantized.adapter_dtype` for why). ``init``: ``"normal"`` / ``"ones"`` (SoRA: Kaiming-uniform A,
    B = 0, gate N(0, 1) or ones) or ``"adalora"`` (A, B ~ N(0, 0.02), gate = 0). With ``orth_penalty`` set, each
    training forward leaves ``||A A^T - I||_F + ||B^T B - I||_F`` in ``last_orth`` (see :mod:`sora_ds.adapters.orthogonal`).
    """

    def __init__(
        self,
        base_layer: nn.Module,
        r: int,
        scale: float,
        lora_dropout: float = 0.0,
        init: str = "normal",
        generator: torch.Generator | None = None,
        orth_penalty: bool = False,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.r = r
        self.initial_rank = r
        self.scale = scale
        for p in base_layer.parameters():
            p.requires_grad_(False)
        dtype = adapter_dtype(base_layer)
        device = base_layer.weight.device if base_layer.weight.device.type != "meta" else None
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, dtype=dtype, device=device))
        self.gate = nn.Parameter(torch.empty(r, dtype=dtype, device=device))
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.orth_penalty = orth_penalty
        self.last_orth: torch.Tensor | None = None
        self._init_branch(init, generator)

    @torch.no_grad()
    def _init_branch(self, init: str, generator: torch.Generator | None) -> None:
        if init not in LAYER_INITS:
            raise ValueError(f"init must be one of {LAYER_INITS}, got {init!r}")
        if init == "adalora":
            # AdaLoRA: P, Q ~ N(0, 0.02) and E = 0, so the branch starts as a no-op through E.
            self.lora_A.copy_(torch.randn(self.lora_A.shape, generator=generator) * 0.02)
            self.lora_B.copy_(torch.randn(self.lora_B.shape, generator=generator) * 0.02)
            self.gate.zero_()
            return
        # Kaiming-uniform A as nn.Linear does (bound 1/sqrt(in)); B = 0 so the branch starts as a no-op.
        bound = 1.0 / math.sqrt(self.in_features)
        a = torch.rand(self.lora_A.shape, generator=generator) * (2 * bound) - bound
        self.lora_A.copy_(a)
        if init == "normal":
            self.gate.copy_(torch.randn(self.gate.shape, generator=generator))
        else:
            self.gate.fill_(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        # B (g * (A x)) computed as (B g) (A x): the same products as the exported PEFT LoRA (whose B is
        # B[:, keep] * g[keep]), so an export differs only by the summation order of the dropped zero columns;
        # and out*r multiplies per step instead of tokens*r.
        h = F.linear(self.lora_dropout(x).to(self.lora_A.dtype), self.lora_A)
        out = result + (F.linear(h, self._gated_B()) * self.scale).to(result.dtype)
        if self.orth_penalty and self.training and self.gate is not None:
            out, self.last_orth = with_orth_penalty(out, self.lora_A, self.lora_B)
        return out

    def _gated_B(self) -> torch.Tensor:
        return self.lora_B if self.gate is None else self.lora_B * self.gate

    def delta_weight(self) -> torch.Tensor:
        """``scale * B diag(g) A``: what merging adds to the base weight (out x in)."""
        return (self._gated_B() @ self.lora_A) * self.scale

    def extra_repr(self) -> str:
        gated = "gated" if self.gate is not None else "compacted"
        return f"in={self.in_features}, out={self.out_features}, r={self.r}, scale={self.scale:g}, {gated}"


def module_generator(seed: int | None, name: str) -> torch.Generator | None:
    """A generator seeded by (seed, module name), so adapter init is independent of global RNG and rank."""
    if seed is None:
        return None
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
