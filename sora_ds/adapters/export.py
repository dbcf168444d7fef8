"""Export a trained SoRA or AdaLoRA model as a standard PEFT LoRA adapter, or merged into full weights.

The adapter directory is what ``peft.PeftModel.from_pretrained(base, dir)`` loads: per-module ranks go in
``rank_pattern``, and ``alpha_pattern = scale * rank`` so that PEFT's ``lora_alpha / r`` equals SoRA's fixed
``alpha / r_init``. Dead modules are left out of ``target_modules`` entirely.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import torch
from torch import nn

from ..engine.atomic import atomic_dir
from .compact import pruned_branches
from .inject import matches_target, replace_module, adapter_layers
from .layer import GatedLoRALinear
from ..engine.quantized import dequantized_weight, plain_linear, quantized_kind
from ..engine import gathered

PEFT_PREFIX = "base_model.model."


def _task_type(model: nn.Module) -> str | None:
    name = type(model).__name__
    for suffix, task in (("ForCausalLM", "CAUSAL_LM"), ("ForSequenceClassification", "SEQ_CLS")):
        if name.endswith(suffix):
            return task
    return None


def _modules_to_save_state(model: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    state = {}
    for module_name, module in model.named_modules():
        if module_name and matches_target(module_name, names):
            params = dict(module.named_parameters())
            with gathered(params.values()):
                for pname, p in params.items():
                    state[f"{PEFT_PREFIX}{module_name}.{pname}"] = p.detach().clone()
    return state


def _loaded_from(model: nn.Module) -> str | None:
    """The folder or hub id transformers loaded ``model`` from (``config._name_or_path``); None for a model built
    from a config, whose path is empty."""
    return getattr(getattr(model, "config", None), "_name_or_path", None) or None


def peft_adapter(model: nn.Module, base_model_name_or_path: str | None = None):
    """``(LoraConfig, state_dict)`` of the pruned adapter. Collective under ZeRO-3 (call on every rank).

    ``base_model_name_or_path`` defaults to where the model was loaded from, so that
    ``peft.AutoPeftModelForCausalLM.from_pretrained(adapter_dir)`` finds the base with no other argument."""
    from peft import LoraConfig

    cfg = getattr(model, "adapter_config", None)
    if cfg is None:
        raise ValueError("model has no adapter_config; it was not prepared with sora_ds.inject()")
    branches = {n: b for n, b in pruned_branches(model).items() if b.rank > 0}
    if not branches:
        raise ValueError("every adapter rank of the model is pruned (all gates are zero); there is no adapter to export")
    state: dict[str, torch.Tensor] = {}
    for name, b in branches.items():
        state[f"{PEFT_PREFIX}{name}.lora_A.weight"] = b.lora_A.contiguous()
        state[f"{PEFT_PREFIX}{name}.lora_B.weight"] = b.lora_B.contiguous()
    state.update(_modules_to_save_state(model, cfg.modules_to_save))
    max_rank = max(b.rank for b in branches.values())
    scale = next(iter(branches.values())).scale
    # Full names, regex-escaped: PEFT matches pattern keys as regexes anchored at a dotted suffix.
    lora_config = LoraConfig(
        r=max_rank,
        lora_alpha=scale * max_rank,
        target_modules=sorted(branches),
        rank_pattern={re.escape(n): b.rank for n, b in branches.items()},
        alpha_pattern={re.escape(n): b.scale * b.rank for n, b in branches.items()},
        lora_dropout=cfg.lora_dropout,
        bias="none",
        modules_to_save=list(cfg.modules_to_save) or None,
        task_type=_task_type(model),
        base_model_name_or_path=base_model_name_or_path or _loaded_from(model),
    )
    return lora_config, state


def export_peft(model: nn.Module, out_dir: str | os.PathLike, base_model_name_or_path: str | None = None,
                tokenizer=None) -> Path:
    """Write the pruned adapter as a PEFT LoRA directory (``adapter_config.json`` + safetensors), atomically; with
    ``tokenizer``, its files too (what serving the adapter needs besides the base, as the Trainer saves them).

    Under ZeRO-3 every rank must call this (the adapter is gathered); only global rank 0 writes.
    """
    from safetensors.torch import save_file

    lora_config, state = peft_adapter(model, base_model_name_or_path)
    out_dir = Path(out_dir)
    if _global_rank() == 0:
        with atomic_dir(out_dir) as tmp:
            lora_config.save_pretrained(tmp)
            state = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
            save_file(state, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
    return out_dir


def merge_adapters(model: nn.Module) -> nn.Module:
    """Add every branch's ``scale * B diag(g) A`` into its base weight and put the base layers back, in place.
    A quantized (bitsandbytes) base layer is dequantized and becomes an ``nn.Linear`` in the model's float dtype
    (with a warning)."""
    modules = list(adapter_layers(model))
    if any(quantized_kind(m.base_layer) for _, m in modules):
        warnings.warn("merging into a quantized base: its weights are dequantized and the merged layers are "
                      "full-precision nn.Linear", stacklevel=2)
    float_dtype = getattr(model, "dtype", torch.float32)
    for name, module in modules:
        base = module.base_layer
        with gathered([module.lora_A, module.lora_B, module.gate, base.weight]), torch.no_grad():
            if quantized_kind(base) is None:
                base.weight += module.delta_weight().to(base.weight.dtype)
                merged = base
            else:
                weight = dequantized_weight(base)
                merged = plain_linear(base, weight + module.delta_weight().to(weight.dtype), float_dtype)
        replace_module(model, name, merged)
    if hasattr(model, "adapter_config"):
        del model.adapter_config
    return model


def save_merged(model: nn.Module, out_dir: str | os.PathLike) -> Path:
    """Merge the adapters into the base weights (in place: the model is plain afterwards) and save it with
    ``save_pretrained``, atomically. A quantized base is dequantized first (with a warning): the merged model is
    full precision, since an adapter delta cannot be added to 4-bit or 8-bit codes without re-quantizing."""
    if any(isinstance(m, GatedLoRALinear) for m in model.modules()):
        merge_adapters(model)
    if getattr(model, "hf_quantizer", None) is not None or any(quantized_kind(m) for m in model.modules()):
        warnings.warn("save_merged: the quantized base is dequantized; the merged model is full precision", stacklevel=2)
        model = model.dequantize()
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
    return out_dir


def _global_rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
