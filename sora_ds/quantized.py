"""bitsandbytes 4-bit / 8-bit base layers (QLoRA-style). bitsandbytes is imported only when a model uses it.

``Linear4bit`` and ``Linear8bitLt`` subclass ``nn.Linear``, so injection and :class:`SoRALinear` need nothing
special beyond two facts kept here: the adapter's dtype (the layer's compute dtype, not the packed storage dtype)
and how to get a float weight back for merging.
"""

from __future__ import annotations

import importlib.util
import warnings

import torch
from torch import nn

QUANTIZED_PARAM_TYPES = ("Params4bit", "Int8Params")


def quantized_kind(layer: nn.Module) -> str | None:
    """``"4bit"``, ``"8bit"`` or ``None`` (checked by type name, so bitsandbytes need not be importable)."""
    kind = type(getattr(layer, "weight", None)).__name__
    return {"Params4bit": "4bit", "Int8Params": "8bit"}.get(kind)


def adapter_dtype(layer: nn.Module) -> torch.dtype:
    """Float bases: the weight's dtype (ZeRO-3 does not convert parameters added after ``zero.Init``, so the adapter
    must match). Quantized bases: the layer's compute dtype (the weight dtype there is the packed storage)."""
    if quantized_kind(layer) is not None:
        return getattr(layer, "compute_dtype", None) or torch.float32
    dtype = layer.weight.dtype
    return dtype if dtype.is_floating_point else torch.float32


def dequantized_weight(layer: nn.Module) -> torch.Tensor:
    """The base weight as a float tensor (dequantized for bitsandbytes layers)."""
    kind = quantized_kind(layer)
    if kind is None:
        return layer.weight.data
    import bitsandbytes.functional as bnbf

    if kind == "4bit":
        return bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state).to(torch.float32)
    # LLM.int8 row-wise absmax quantization: w = q * SCB / 127, one scale per output row.
    return layer.weight.data.float() * layer.weight.SCB.float().unsqueeze(1) / 127.0


def plain_linear(layer: nn.Module, weight: torch.Tensor) -> nn.Linear:
    """A float ``nn.Linear`` with ``weight`` (and the layer's bias), replacing a quantized layer after a merge."""
    if quantized_kind(layer) is not None:
        warnings.warn(
            f"merging into a {quantized_kind(layer)} base layer: the base weight is dequantized and the merged "
            "layer is a full-precision nn.Linear",
            stacklevel=3,
        )
    out = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, dtype=weight.dtype)
    out.weight.data.copy_(weight)
    if layer.bias is not None:
        out.bias.data.copy_(layer.bias.data.to(weight.dtype))
    return out


def bitsandbytes_available() -> bool:
    return importlib.util.find_spec("bitsandbytes") is not None
