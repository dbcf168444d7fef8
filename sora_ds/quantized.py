"""bitsandbytes 4-bit / 8-bit base layers (QLoRA-style). bitsandbytes is imported only when a model uses it.

``Linear4bit`` and ``Linear8bitLt`` subclass ``nn.Linear``, so injection and :class:`SoRALinear` need nothing
special beyond two facts kept here: the adapter's dtype, and how to get a float weight back for merging.
"""

from __future__ import annotations

import importlib.util

import torch
from torch import nn

QUANTIZED_PARAM_TYPES = ("Params4bit", "Int8Params")


def quantized_kind(layer: nn.Module) -> str | None:
    """``"4bit"``, ``"8bit"`` or ``None`` (checked by type name, so bitsandbytes need not be importable)."""
    kind = type(getattr(layer, "weight", None)).__name__
    return {"Params4bit": "4bit", "Int8Params": "8bit"}.get(kind)


def adapter_dtype(layer: nn.Module) -> torch.dtype:
    """fp32, as PEFT does: bf16/fp16 adapter weights would lose most AdamW updates to rounding (a gate at 1.0 does
    not move by 1e-4 in bf16). Under ZeRO-3 (a partitioned base weight) the adapter takes the base's float dtype
    instead: DeepSpeed does not convert parameters added after ``zero.Init``, and keeps fp32 masters itself. A
    packed 4-bit base is then stored in that dtype too (``bnb_4bit_quant_storage`` = ``torch_dtype``)."""
    weight = layer.weight
    if hasattr(weight, "ds_id") and weight.dtype.is_floating_point:
        return weight.dtype
    return torch.float32


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


def plain_linear(layer: nn.Module, weight: torch.Tensor, dtype: torch.dtype) -> nn.Linear:
    """A float ``nn.Linear`` of ``dtype`` with ``weight`` (and the layer's bias), on the layer's device."""
    out = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, dtype=dtype,
                    device=layer.weight.device)
    out.weight.data.copy_(weight)
    if layer.bias is not None:
        out.bias.data.copy_(layer.bias.data)
    return out


def bitsandbytes_available() -> bool:
    return importlib.util.find_spec("bitsandbytes") is not None
