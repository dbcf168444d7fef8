"""How serving engines load a PEFT LoRA folder, emulated on CPU from their source code (no copied code).

Each ``load_<engine>(folder, base)`` reads the adapter folder the way that engine does (the keys it reads, the keys
it drops, its padding, its scaling, its refusals) and applies the result to ``base`` (a fresh copy of the base
model) with forward hooks: ``y += x A_e^T B_e^T`` with the engine's own A_e, B_e. An engine that refuses the folder
raises :class:`Refused`. The sources read (paths in each project's repository):

* vLLM: ``vllm/lora/peft_helper.py`` (PEFTHelper.from_dict keeps only its dataclass fields, so ``rank_pattern`` and
  ``alpha_pattern`` are dropped; ``vllm_lora_scaling_factor = lora_alpha / r``; ``_validate_features`` refuses
  ``modules_to_save`` and DoRA; ``validate_legal`` refuses ``r > max_lora_rank``), ``vllm/lora/models.py``
  (LoRALayerWeights.optimize folds the scaling into B) and the punica wrapper's ``set_lora`` (each module's A/B is
  copied into the first rows/columns of zero-filled ``max_lora_rank`` buffers); ``vllm/config/lora.py`` (the allowed
  ``max_lora_rank`` values).
* SGLang: ``python/sglang/srt/lora/lora_config.py`` (reads ``target_modules``, ``r``, ``lora_alpha``, ``use_dora``;
  on main, ``rank_overrides``/``alpha_overrides`` = pattern entries that differ from ``r``/``lora_alpha``, which
  admission refuses), ``lora.py`` (``scaling = lora_alpha / r``; only LoRA A/B of numbered layers and embed/lm_head
  LoRA weights are kept) and ``mem_pool.py`` (``load_lora_weight_to_buffer`` copies exactly ``r`` rows per module).
* LoRAX (TGI's multi-LoRA loader has the same shape): ``server/lorax_server/adapters/lora.py`` (LoraConfig.load reads
  ``r``, ``lora_alpha``, ``target_modules``, ``fan_in_fan_out``, ``use_rslora``; LoraWeights.load returns None, so the
  module type is not adapted at all, when one layer has no weights for it, folds ``lora_alpha / r`` into B and stacks
  the layers' A and B with ``torch.stack``; only ``lora_A``/``lora_B`` names are mapped) and
  ``server/lorax_server/utils/sgmv.py`` (``pad_rank`` pads only when the SGMV kernels are present; on CPU they are not,
  so unequal ranks within a type cannot be stacked).
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors.torch import load_file

PREFIX = "base_model.model."
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # written down here, not imported: the test's own copy
_LAYER = re.compile(r"\.(\d+)\.")


class Refused(Exception):
    """The engine raises on loading this adapter."""


def _lora_weights(folder: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    state = load_file(Path(folder) / "adapter_model.safetensors")
    names = [k[len(PREFIX):-len(".lora_A.weight")] for k in state if k.endswith(".lora_A.weight")]
    return {n: (state[f"{PREFIX}{n}.lora_A.weight"], state[f"{PREFIX}{n}.lora_B.weight"]) for n in names}


def _config(folder: Path) -> dict:
    return json.loads((Path(folder) / "adapter_config.json").read_text())


def _apply(base, deltas: dict[str, tuple[torch.Tensor, torch.Tensor]]):
    """``base`` with ``y += (x A^T) B^T`` on each named module (B already scaled), via forward hooks."""
    for name, (a, b) in deltas.items():
        def hook(module, args, output, a=a, b=b):
            return output + (args[0].to(a.dtype) @ a.T @ b.T).to(output.dtype)

        base.get_submodule(name).register_forward_hook(hook)
    return base.eval()


def load_peft(folder: Path, base):
    """PEFT itself: ``PeftModel.from_pretrained`` (every key honoured)."""
    from peft import PeftModel

    return PeftModel.from_pretrained(base, folder).eval()


def load_vllm(folder: Path, base, max_lora_rank: int | None = None):
    """vLLM: one scaling ``lora_alpha / r``, patterns dropped, A/B zero-padded to ``max_lora_rank``."""
    config = _config(folder)
    missing = {"r", "lora_alpha", "target_modules"} - set(config)
    if missing:
        raise Refused(f"Missing required configuration fields: {missing}")
    if config.get("modules_to_save"):
        raise Refused("vLLM only supports modules_to_save being None")
    if config.get("use_dora"):
        raise Refused("vLLM does not yet support DoRA")
    r, alpha = config["r"], config["lora_alpha"]
    max_lora_rank = max_lora_rank or min(b for b in VLLM_MAX_LORA_RANKS if b >= r)
    if max_lora_rank not in VLLM_MAX_LORA_RANKS:
        raise Refused(f"max_lora_rank {max_lora_rank} is not one of {VLLM_MAX_LORA_RANKS}")
    if r > max_lora_rank:
        raise Refused(f"LoRA rank {r} is greater than max_lora_rank {max_lora_rank}")
    scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    deltas = {}
    for name, (a, b) in _lora_weights(folder).items():
        if a.shape[0] > max_lora_rank:
            raise Refused(f"{name}: rank {a.shape[0]} does not fit max_lora_rank {max_lora_rank}")
        buf_a = torch.zeros(max_lora_rank, a.shape[1], dtype=a.dtype)
        buf_b = torch.zeros(b.shape[0], max_lora_rank, dtype=b.dtype)
        buf_a[: a.shape[0]] = a
        buf_b[:, : b.shape[1]] = b * scaling
        deltas[name] = (buf_a, buf_b)
    return _apply(base, deltas)


def sglang_parser():
    """SGLang's own ``LoRAConfig`` class when the sglang package is installed (loaded from its file, without
    importing sglang's GPU runtime), else None."""
    spec = importlib.util.find_spec("sglang")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "srt" / "lora" / "lora_config.py"
    if not path.is_file():
        return None
    module_spec = importlib.util.spec_from_file_location("_sglang_lora_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.LoRAConfig


def _sglang_overrides(parsed, hf_config: dict) -> tuple[dict, dict]:
    """The pattern entries that change a module's rank or alpha: the parser's own fields where it has them (SGLang
    main), else the same rule applied to what it parsed."""
    if hasattr(parsed, "rank_overrides"):
        return parsed.rank_overrides, parsed.alpha_overrides
    ranks = {k: v for k, v in (hf_config.get("rank_pattern") or {}).items() if v != parsed.r}
    alphas = {k: v for k, v in (hf_config.get("alpha_pattern") or {}).items() if v != parsed.lora_alpha}
    return ranks, alphas


def load_sglang(folder: Path, base, use_real_parser: bool = True):
    """SGLang: refuses rank/alpha overrides and any module whose rank is not ``r``; one scaling ``lora_alpha / r``;
    keeps only LoRA A/B (``modules_to_save`` weights are not loaded). With ``use_real_parser`` and sglang installed,
    SGLang's own LoRAConfig parses the folder."""
    parser = sglang_parser() if use_real_parser else None
    hf_config = _config(folder)
    if parser is not None:
        parsed = parser(str(folder))
    else:
        parsed = SimpleNamespace(r=hf_config["r"], lora_alpha=hf_config["lora_alpha"],  # the fields SGLang reads
                                 target_modules=hf_config["target_modules"], use_dora=hf_config.get("use_dora", False))
    if hf_config.get("peft_type", "").lower() != "lora":
        raise Refused("peft_type is not LORA")
    if parsed.use_dora:
        raise Refused("LoRA serving currently doesn't support DoRA adapters")
    rank_overrides, alpha_overrides = _sglang_overrides(parsed, hf_config)
    if rank_overrides or alpha_overrides:
        raise Refused(f"rank_pattern/alpha_pattern override r/lora_alpha: {rank_overrides} {alpha_overrides}")
    scaling = parsed.lora_alpha / parsed.r
    deltas = {}
    for name, (a, b) in _lora_weights(folder).items():
        if a.shape[0] != parsed.r:
            raise Refused(f"{name}: rank {a.shape[0]} cannot be copied as r={parsed.r} rows")
        deltas[name] = (a, b * scaling)
    return _apply(base, deltas)


def load_lorax(folder: Path, base):
    """LoRAX/TGI: per module type, every layer's A/B stacked (equal ranks), ``lora_alpha / r`` folded into B; a type
    that misses a layer is not adapted at all; non-LoRA weights are unused."""
    config = _config(folder)
    r, alpha = config["r"], config["lora_alpha"]
    scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    weights = _lora_weights(folder)
    types: dict[str, dict[str, str]] = {}
    for name in weights:
        m = _LAYER.search(name)
        types.setdefault(_LAYER.sub(".{}.", name, count=1), {})[m.group(1)] = name
    base_names = [n for n, _ in base.named_modules()]
    deltas = {}
    for template, per_layer in types.items():
        pattern = re.compile(re.escape(template).replace(r"\{\}", r"(\d+)") + "$")
        model_layers = {m.group(1) for n in base_names if (m := pattern.match(n))}
        if set(per_layer) != model_layers:
            continue  # LoraWeights.load returns None: this module type gets no adapter in any layer
        a_list = [weights[n][0] for n in per_layer.values()]
        if len({a.shape for a in a_list}) > 1:
            raise Refused(f"stack expects each tensor to be equal size: {[tuple(a.shape) for a in a_list]}")
        for name in per_layer.values():
            a, b = weights[name]
            deltas[name] = (a, b * scale)
    return _apply(base, deltas)


LOADERS = {"peft": load_peft, "vllm": load_vllm, "sglang": load_sglang, "lorax": load_lorax}
