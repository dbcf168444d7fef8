"""bitsandbytes 4-bit / 8-bit base layers (QLoRA-style). bitsandbytes is imported only when a model uses it.

``Linear4bit`` and ``Linear8bitLt`` subclass ``nn.Linear``, so injection and :class:`GatedLoRALinear` need nothing
special beyond two facts kept here: the adapter's dtype, and how to get a float weight back for merging.
"""

from __future__ import annotations

import importlib.util
import logging

import torch
from torch import nn

from .deepspeed import is_partitioned

QUANTIZED_PARAM_TYPES = ("Params4bit", "Int8Params")

HUB_KERNEL_NOTICE = "Failed to load CPU gemm_4bit_forward from kernels-community"


class _OptionalHubKernelNotice(logging.Filter):
    """Drops one import-time warning of bitsandbytes (>= 0.50) on CPUs with AVX512-BF16: that the optional Hub kernel
    for its packed CPU layout could not be loaded because the ``kernels`` package is not installed.

    Why: that kernel only ever runs on weights bitsandbytes has repacked into its CPU layout, and sora_ds never lets
    a weight be repacked (:func:`pin_4bit_layout`), so the notice asks the user to install a package that would
    change nothing, on every rank of every run and in ``sora-ds generate``'s reply. Any other failure to load the
    kernel (``kernels`` installed but broken or offline) is still reported.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        cause = record.args[0] if isinstance(record.args, tuple) and record.args else None
        missing_package = isinstance(cause, ModuleNotFoundError) and cause.name == "kernels"
        return not (str(record.msg).startswith(HUB_KERNEL_NOTICE) and missing_package)


# Installed when sora_ds is imported, which is before anything of sora_ds imports bitsandbytes (it warns on import).
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_OptionalHubKernelNotice())


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
    if is_partitioned(weight) and weight.dtype.is_floating_point:
        return weight.dtype
    return torch.float32


def _cpu_repacked(layer: nn.Module) -> bool:
    return getattr(getattr(layer.weight, "quant_state", None), "packing_format_for_cpu", False)


def pin_4bit_layout(model: nn.Module) -> None:
    """Keep every bitsandbytes 4-bit weight of ``model`` in the layout it was quantized in, on every CPU.

    Why: on CPUs with AVX512-BF16, bitsandbytes (>= 0.49) repacks a ``Linear4bit`` weight *in place* into a kernel
    layout on its first forward in eval mode without grad, rounding its scales to bf16 on the way. Training
    forwards, ZeRO-3 partitions, merging and export then read the repacked bytes as the original codes: a mid-run
    eval silently corrupts the frozen base. We switch that repack off per module (``support_avx512bf16_for_cpu``,
    which bitsandbytes sets from the CPU's features), so eval runs the same dequantize-and-matmul as training on
    every CPU: slower on those CPUs, the same numbers everywhere. A weight that is already repacked (the model ran
    an eval forward before it reached us) cannot be put back exactly, so it is refused.
    """
    check_4bit_layout(model)
    for module in model.modules():
        if quantized_kind(module) == "4bit" and hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def check_4bit_layout(model: nn.Module) -> None:
    """Raise if any 4-bit weight is in bitsandbytes' CPU kernel layout: better a stop than silently wrong numbers."""
    packed = [n for n, m in model.named_modules() if quantized_kind(m) == "4bit" and _cpu_repacked(m)]
    if packed:
        raise RuntimeError(
            f"{len(packed)} 4-bit weights (e.g. {packed[:2]}) were repacked in place by bitsandbytes' AVX512-BF16 CPU "
            "eval kernel, so they no longer hold the codes they were quantized to (their scales were rounded to bf16). "
            "Reload the model and give it to sora_ds before running it in eval mode; sora_ds keeps the layout from then "
            "on (sora_ds.engine.quantized.pin_4bit_layout)"
        )


def dequantized_weight(layer: nn.Module) -> torch.Tensor:
    """The base weight as a float tensor (dequantized for bitsandbytes layers)."""
    kind = quantized_kind(layer)
    if kind is None:
        return layer.weight.data
    import bitsandbytes.functional as bnbf

    if kind == "4bit":
        check_4bit_layout(layer)
        return bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state).to(torch.float32)
    # LLM.int8 row-wise absmax quantization: w = q * SCB / 127, one scale per output row. The first forward moves
    # the scales from the weight to the layer's matmul state (bitsandbytes' init_8bit_state).
    scb = layer.weight.SCB if getattr(layer.weight, "SCB", None) is not None else layer.state.SCB
    return layer.weight.data.float() * scb.float().unsqueeze(1) / 127.0


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
