"""Put SoRA or AdaLoRA branches into a transformers model, and find them again.

Adapter parameters are always found through the :class:`GatedLoRALinear` modules themselves, never by matching
parameter names, so renames in transformers cannot silently drop a gate from the proximal step.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from torch import nn

from .config import AdapterConfig, AdaLoRAConfig
from .layer import GatedLoRALinear, module_generator
from ..engine.quantized import pin_4bit_layout


class TargetError(ValueError):
    """A target-module spec that matches nothing, or matches a module that cannot be adapted."""


def matches_target(name: str, targets: list[str] | str) -> bool:
    """Suffix list: match whole dotted components (``q_proj`` matches ``...self_attn.q_proj``). String: full regex."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def is_adaptable(module: nn.Module) -> bool:
    """Layers an adapter can wrap. bitsandbytes ``Linear4bit`` / ``Linear8bitLt`` subclass ``nn.Linear`` and are included."""
    return isinstance(module, nn.Linear)


def linear_module_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if is_adaptable(m)]


def _describe_linears(model: nn.Module) -> str:
    names = linear_module_names(model)
    suffixes = sorted({n.rsplit(".", 1)[-1] for n in names})
    return f"its linear modules end in {suffixes} (e.g. {names[:3]})"


def inject(model: nn.Module, config: AdapterConfig) -> list[str]:
    """Replace every targeted linear layer of ``model`` by a :class:`GatedLoRALinear`, in place.

    ``config`` is a :class:`~sora_ds.SoRAConfig` or an :class:`~sora_ds.AdaLoRAConfig` (same layer, different
    init; AdaLoRA layers also compute the orthogonality penalty). Freezes every other parameter except those of
    ``config.modules_to_save`` (e.g. a classification head).
    Returns the adapted module names. Raises :class:`TargetError` if a target matches nothing.
    """
    if any(isinstance(m, GatedLoRALinear) for m in model.modules()):
        raise TargetError("model already has adapter layers; inject() once per model")
    chosen, to_save = select_targets(model, config)
    pin_4bit_layout(model)  # an eval must never repack the frozen 4-bit base in place (see quantized.py)
    for p in model.parameters():
        p.requires_grad_(False)
    orth = isinstance(config, AdaLoRAConfig) and config.orth_reg_weight > 0
    for name, module in chosen:
        wrapped = GatedLoRALinear(
            module,
            r=config.r,
            scale=config.scale,
            lora_dropout=config.lora_dropout,
            init=config.layer_init,
            generator=module_generator(config.init_seed, name),
            orth_penalty=orth,
        )
        replace_module(model, name, wrapped)
    for m in to_save:
        for p in m.parameters():
            p.requires_grad_(True)
    model.adapter_config = config  # the export needs alpha, dropout and modules_to_save
    return [n for n, _ in chosen]


def select_targets(model: nn.Module, config: AdapterConfig) -> tuple[list[tuple[str, nn.Module]], list[nn.Module]]:
    """The linear layers ``config.target_modules`` selects and the ``modules_to_save``; :class:`TargetError` if a
    target matches nothing. Reads only module names and types, so a weightless (meta-device) copy of the model
    answers the same, before any weight is loaded."""
    chosen = [(n, m) for n, m in model.named_modules() if n and matches_target(n, config.target_modules)]
    unsupported = [n for n, m in chosen if not is_adaptable(m)]
    chosen = [(n, m) for n, m in chosen if is_adaptable(m)]
    if not chosen:
        extra = f"; it matched only non-linear modules {unsupported[:5]}" if unsupported else ""
        raise TargetError(
            f"target_modules={config.target_modules!r} matches no linear module of {type(model).__name__}{extra}; "
            f"{_describe_linears(model)}"
        )
    if isinstance(config.target_modules, list):
        unmatched = [t for t in config.target_modules if not any(matches_target(n, [t]) for n, _ in chosen)]
        if unmatched:
            raise TargetError(
                f"target_modules entries {unmatched} match no linear module of {type(model).__name__}; "
                f"{_describe_linears(model)}"
            )
    return chosen, _modules_to_save(model, config.modules_to_save)


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where the submodule called ``name`` (dotted path) is."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def _modules_to_save(model: nn.Module, names: list[str]) -> list[nn.Module]:
    found = []
    for target in names:
        hits = [m for n, m in model.named_modules() if n and matches_target(n, [target])]
        if not hits:
            raise TargetError(f"modules_to_save entry {target!r} matches no module of {type(model).__name__}")
        found += hits
    return found


def adapter_layers(model: nn.Module) -> Iterator[tuple[str, GatedLoRALinear]]:
    """(name, module) for every adapter layer (GatedLoRALinear), in model order. Names are those of the wrapped base layers."""
    for name, module in model.named_modules():
        if isinstance(module, GatedLoRALinear):
            yield name, module


def gate_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [m.gate for _, m in adapter_layers(model) if m.gate is not None]


def branch_parameters(model: nn.Module) -> list[nn.Parameter]:
    """A and B of every branch (the non-gate adapter parameters)."""
    return [p for _, m in adapter_layers(model) for p in (m.lora_A, m.lora_B)]
