"""Export formats for serving engines, which engines load each one correctly, and what serving an adapter costs.

The compact export (:func:`sora_ds.export_peft`, format ``peft``) keeps each module at its kept rank through PEFT's
``rank_pattern``/``alpha_pattern``. Serving engines read less than PEFT does (see README "Serving the adapter"):

* vLLM reads only ``r`` and ``lora_alpha``, applies one scaling ``lora_alpha / r`` to every module and copies each
  module's A/B into zero-filled buffers of ``max_lora_rank`` (one of :data:`VLLM_MAX_LORA_RANKS`); it refuses
  ``modules_to_save``;
* SGLang refuses pattern entries that change a module's rank or alpha and copies exactly ``r`` rows per module;
* LoRAX/TGI-style loaders stack each module type's A/B across layers (so ranks must be equal within a type) and drop
  a whole module type when one layer has no weights for it.

The ``uniform`` format satisfies all of them: every module (a pruned one as zeros) is padded with zeros to one rank
``R``, its scale is folded into B, and ``r = lora_alpha = R`` so that any loader's ``lora_alpha / r`` is 1, as in
PEFT's own ``save_as_lora``. Zero rows of A and columns of B add nothing, so the outputs are the compact adapter's.
``vllm`` is ``uniform`` with ``R`` rounded up to a vLLM rank bucket.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import torch
from torch import nn

from ..engine.atomic import atomic_dir
from .export import PEFT_PREFIX, _global_rank, export_peft, peft_adapter, save_merged
from .inject import adapter_layers

# One line each: `sora-ds export --help` and README print these.
EXPORT_FORMATS = {
    "peft": "compact PEFT LoRA, each module at its kept rank (rank_pattern/alpha_pattern): PEFT loads it; vLLM only "
            "while all modules share one scale; SGLang and LoRAX refuse uneven ranks",
    "uniform": "every module zero-padded to the max kept rank, scale folded into B, r = lora_alpha; loads in PEFT, "
               "vLLM, SGLang and LoRAX/TGI",
    "vllm": "uniform, with the rank rounded up to a vLLM max_lora_rank bucket (1, 8, 16, 32, ..., 512)",
    "merged": "the adapter merged into the base weights: no LoRA at serving time (library and recipe: save_merged; "
              "command line: sora-ds merge)",
}
ADAPTER_FORMATS = ("peft", "uniform", "vllm")  # the formats written as a LoRA adapter folder
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vllm/config/lora.py: the allowed max_lora_rank
ENGINES = ("peft", "vllm", "sglang", "lorax")
SERVING_FILE = "serving.json"  # written beside the adapter: its format and the engines it is valid for

_LAYER = re.compile(r"\.(\d+)\.")


def vllm_max_lora_rank(rank: int) -> int:
    """The smallest vLLM ``max_lora_rank`` that holds ``rank``; a ValueError above vLLM's largest (512)."""
    for bucket in VLLM_MAX_LORA_RANKS:
        if bucket >= rank:
            return bucket
    raise ValueError(f"max kept rank {rank} is above vLLM's largest max_lora_rank {VLLM_MAX_LORA_RANKS[-1]}; "
                     "vLLM cannot serve this adapter (export 'uniform' for other engines, or 'merged')")


def module_names(state: dict[str, torch.Tensor]) -> list[str]:
    """The adapted modules of a PEFT LoRA state dict (full names, without PEFT's prefix)."""
    suffix = ".lora_A.weight"
    return sorted(k[len(PEFT_PREFIX):-len(suffix)] for k in state if k.endswith(suffix))


def _pattern_value(pattern: dict, name: str, default):
    """PEFT's rule: a pattern key applies to a module whose full name ends with it (as a regex, at a dot)."""
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?{key}$", name):
            return value
    return default


def module_scales(config: dict, names: list[str]) -> dict[str, float]:
    """Each module's ``alpha / rank`` as PEFT computes it from ``r``, ``lora_alpha`` and the patterns."""
    return {n: _pattern_value(config.get("alpha_pattern"), n, config["lora_alpha"])
            / _pattern_value(config.get("rank_pattern"), n, config["r"]) for n in names}


def sibling_shapes(shapes: dict[str, tuple[int, int]]) -> dict[str, tuple[int, int]]:
    """``shapes`` (module -> (in, out)) plus every module missing from a layer that its type has in another layer,
    with that type's shape: a pruned module left out of a compact adapter (whose folder no longer names it)."""
    layers, types = _by_type(shapes)
    filled = dict(shapes)
    for template, per_layer in types.items():
        shape = next(iter(per_layer.values()))
        for layer in layers:
            filled.setdefault(template.replace("{}", layer, 1), shape)
    return filled


def _by_type(values: dict[str, object]) -> tuple[set[str], dict[str, dict[str, object]]]:
    """The layer indices of module names, and per module type (the name with its layer index as ``{}``) the value
    of each layer that has it, from ``values`` (module -> value)."""
    layers, types = set(), {}
    for name, value in values.items():
        m = _LAYER.search(name)
        if m:
            layers.add(m.group(1))
            types.setdefault(_LAYER.sub(".{}.", name, count=1), {})[m.group(1)] = value
    return layers, types


def uniform_adapter(config: dict, state: dict[str, torch.Tensor], rank: int | None = None,
                    shapes: dict[str, tuple[int, int]] | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """The compact adapter ``(config, state)`` as one rank ``rank`` (default: its max rank) for every module.

    ``shapes`` (module -> (in, out)) adds modules with no weights (pruned ones) as zeros, so that loaders stacking a
    module type across layers find every layer. Each module's scale is folded into B and ``r = lora_alpha = rank``.
    """
    names = module_names(state)
    if not names:
        raise ValueError("the adapter has no LoRA modules")
    a_of = {n: state[f"{PEFT_PREFIX}{n}.lora_A.weight"] for n in names}
    b_of = {n: state[f"{PEFT_PREFIX}{n}.lora_B.weight"] for n in names}
    top = max(a.shape[0] for a in a_of.values())
    rank = top if rank is None else rank
    if rank < top:
        raise ValueError(f"rank {rank} is below the adapter's max rank {top}")
    scales = module_scales(config, names)
    dtype = next(iter(a_of.values())).dtype
    out = {k: v for k, v in state.items() if ".lora_A." not in k and ".lora_B." not in k}  # modules_to_save
    for name in sorted(set(names) | set(shapes or {})):
        if name in a_of:
            a, b = a_of[name], b_of[name]
            fan_in, fan_out = a.shape[1], b.shape[0]
        else:
            fan_in, fan_out = shapes[name]
            a = b = None
        padded_a = torch.zeros(rank, fan_in, dtype=dtype)
        padded_b = torch.zeros(fan_out, rank, dtype=dtype)
        if a is not None:
            padded_a[: a.shape[0]] = a
            # folded in float32: B's own dtype could round the product differently from the compact forward
            padded_b[:, : b.shape[1]] = (b.float() * scales[name]).to(dtype)
        out[f"{PEFT_PREFIX}{name}.lora_A.weight"] = padded_a
        out[f"{PEFT_PREFIX}{name}.lora_B.weight"] = padded_b
    uniform = {k: v for k, v in config.items() if k not in ("rank_pattern", "alpha_pattern")}
    uniform.update(r=rank, lora_alpha=rank, rank_pattern={}, alpha_pattern={}, target_modules=sorted(set(names) | set(shapes or {})))
    return uniform, out


def _tensor_shapes(state: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items()}


def compatibility(config: dict, shapes: dict[str, tuple[int, ...]]) -> dict[str, str]:
    """``{engine: verdict}`` for an adapter from its config and its tensor shapes (state key -> shape).

    A verdict starts with ``loads`` (the engine computes the trained outputs), ``refused`` (it raises on load) or
    ``wrong`` (it loads and computes something else, silently). The rules are those the tests' loader emulations
    (``tests/serving_loaders.py``) apply, read from each engine's source.
    """
    names = sorted(k[len(PEFT_PREFIX):-len(".lora_A.weight")] for k in shapes if k.endswith(".lora_A.weight"))
    ranks = {n: shapes[f"{PEFT_PREFIX}{n}.lora_A.weight"][0] for n in names}
    r, alpha = config["r"], config["lora_alpha"]
    scales = module_scales(config, names)
    uniform_scale = all(math.isclose(s, alpha / r, rel_tol=1e-6) for s in scales.values())
    to_save = bool(config.get("modules_to_save"))
    top = max(ranks.values(), default=0)
    verdicts = {"peft": "loads"}

    if to_save:
        verdicts["vllm"] = "refused: vLLM only supports modules_to_save being None"
    elif not uniform_scale:
        verdicts["vllm"] = ("wrong: vLLM drops rank_pattern/alpha_pattern and applies lora_alpha / r to every module, "
                            "but module scales differ; export 'uniform'")
    elif top > VLLM_MAX_LORA_RANKS[-1] or r > VLLM_MAX_LORA_RANKS[-1]:
        verdicts["vllm"] = f"refused: rank {max(top, r)} is above vLLM's largest max_lora_rank 512"
    else:
        verdicts["vllm"] = f"loads with max_lora_rank={vllm_max_lora_rank(max(r, top))}"

    overrides = [k for k, v in (config.get("rank_pattern") or {}).items() if v != r]
    overrides += [k for k, v in (config.get("alpha_pattern") or {}).items() if v != alpha]
    if overrides:
        verdicts["sglang"] = "refused: rank_pattern/alpha_pattern change module ranks or alphas; export 'uniform'"
    elif any(k != r for k in ranks.values()):
        verdicts["sglang"] = f"refused: SGLang copies exactly r={r} rows per module; export 'uniform'"
    elif to_save:
        verdicts["sglang"] = "wrong: SGLang loads only LoRA weights; the modules_to_save weights are dropped"
    else:
        verdicts["sglang"] = f"loads with max_lora_rank={r}"

    verdicts["lorax"] = _lorax_verdict(ranks, uniform_scale, to_save)
    return verdicts


def _lorax_verdict(ranks: dict[str, int], uniform_scale: bool, to_save: bool) -> str:
    layers, types = _by_type(ranks)
    for template, per_layer in sorted(types.items()):
        if len(set(per_layer.values())) > 1:
            return (f"refused: ranks differ within module type {template.rsplit('.', 1)[-1]} "
                    f"({sorted(set(per_layer.values()))}) and cannot be stacked; export 'uniform'")
    for template, per_layer in sorted(types.items()):
        if set(per_layer) != layers:
            return (f"wrong: module type {template.rsplit('.', 1)[-1]} is missing in layers "
                    f"{sorted(layers - set(per_layer), key=int)}, so it is dropped in every layer; export 'uniform'")
    if not uniform_scale:
        return "wrong: LoRAX applies lora_alpha / r to every module, but module scales differ; export 'uniform'"
    if to_save:
        return "wrong: LoRAX loads only lora_A/lora_B; the modules_to_save weights are dropped"
    return "loads"


def serving_record(fmt: str, config: dict, state: dict[str, torch.Tensor]) -> dict:
    """What :data:`SERVING_FILE` holds: the format, its rank, the vLLM ``max_lora_rank`` and the engine verdicts."""
    shapes = _tensor_shapes(state)
    ranks = [s[0] for k, s in shapes.items() if k.endswith(".lora_A.weight")]
    try:
        bucket = vllm_max_lora_rank(max(ranks + [config["r"]]))
    except ValueError:
        bucket = None
    return {"format": fmt, "r": config["r"], "max_rank": max(ranks), "vllm_max_lora_rank": bucket,
            "engines": compatibility(config, shapes)}


def describe(record: dict) -> str:
    """One line per engine, for people."""
    lines = [f"format {record['format']} (r={record['r']}, vLLM max_lora_rank={record['vllm_max_lora_rank']}):"]
    lines += [f"  {engine:7s} {verdict}" for engine, verdict in record["engines"].items()]
    return "\n".join(lines)


def in_format(fmt: str, config: dict, state: dict[str, torch.Tensor],
              shapes: dict[str, tuple[int, int]] | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """A compact adapter ``(config, state)`` converted to adapter format ``fmt`` (see :data:`ADAPTER_FORMATS`)."""
    if fmt == "peft":
        return config, state
    if fmt == "uniform":
        return uniform_adapter(config, state, shapes=shapes)
    if fmt == "vllm":
        top = max(state[f"{PEFT_PREFIX}{n}.lora_A.weight"].shape[0] for n in module_names(state))
        return uniform_adapter(config, state, rank=vllm_max_lora_rank(top), shapes=shapes)
    raise ValueError(f"format {fmt!r} is not an adapter format; choose one of {list(ADAPTER_FORMATS)}")


def read_adapter(folder: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(adapter_config.json as a dict, the safetensors state)`` of a PEFT LoRA folder."""
    from safetensors.torch import load_file

    folder = Path(folder)
    return json.loads((folder / "adapter_config.json").read_text()), load_file(folder / "adapter_model.safetensors")


def write_adapter(folder: Path, fmt: str, config: dict, state: dict[str, torch.Tensor]) -> dict:
    """Write ``config``, ``state`` and :data:`SERVING_FILE` into the existing ``folder``; returns the record."""
    from safetensors.torch import save_file

    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    state = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    save_file(state, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    record = serving_record(fmt, config, state)
    (folder / SERVING_FILE).write_text(json.dumps(record, indent=2))
    return record


def convert_adapter(source: str | os.PathLike, fmt: str, folder: Path) -> dict:
    """A compact adapter folder ``source`` written in format ``fmt`` into the existing ``folder`` (the command line's
    path: reads only adapter_config.json and safetensors). Pruned modules are restored as zeros where their type has
    weights in other layers (:func:`sibling_shapes`). Returns the :data:`SERVING_FILE` record."""
    config, state = read_adapter(source)
    shapes = {n: (state[f"{PEFT_PREFIX}{n}.lora_A.weight"].shape[1], state[f"{PEFT_PREFIX}{n}.lora_B.weight"].shape[0])
              for n in module_names(state)}
    config, state = in_format(fmt, config, state, sibling_shapes(shapes))
    return write_adapter(folder, fmt, config, state)


def _config_dict(lora_config) -> dict:
    """A PEFT LoraConfig as the JSON ``save_pretrained`` writes (sets as lists, enums as their values)."""
    return json.loads(json.dumps(lora_config.to_dict(), default=lambda v: sorted(v) if isinstance(v, set) else str(v)))


def export_format(model: nn.Module, fmt: str, out_dir: str | os.PathLike,
                  base_model_name_or_path: str | None = None, tokenizer=None) -> dict | None:
    """Write ``model``'s adapter in format ``fmt`` (:data:`EXPORT_FORMATS`) to ``out_dir``, atomically.

    Adapter formats: under ZeRO-3 every rank must call this (the adapter is gathered); only global rank 0 writes, and
    returns the :data:`SERVING_FILE` record (other ranks None). ``merged`` merges the adapter into ``model`` in place
    (single process only, see :func:`sora_ds.save_merged`) and returns None.
    """
    if fmt == "merged":
        save_merged(model, out_dir)
        return None
    if fmt not in ADAPTER_FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {list(EXPORT_FORMATS)}")
    if fmt == "peft":
        export_peft(model, out_dir, base_model_name_or_path, tokenizer)  # the writer checkpoints share
        return write_record(out_dir, fmt) if _global_rank() == 0 else None
    lora_config, state = peft_adapter(model, base_model_name_or_path)
    shapes = {name: (m.in_features, m.out_features) for name, m in adapter_layers(model)}
    if _global_rank() != 0:
        return None
    config, state = in_format(fmt, _config_dict(lora_config), state, shapes)
    with atomic_dir(Path(out_dir)) as tmp:
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        return write_adapter(tmp, fmt, config, state)


def write_record(folder: str | os.PathLike, fmt: str) -> dict:
    """Add :data:`SERVING_FILE` to an adapter folder already written; returns the record."""
    folder = Path(folder)
    record = serving_record(fmt, *read_adapter(folder))
    (folder / SERVING_FILE).write_text(json.dumps(record, indent=2))
    return record


def serving_cost(report: dict[str, dict[str, int]], shapes: dict[str, tuple[int, int]], bytes_per_param: int) -> dict:
    """What serving the adapter costs, from the rank report (module -> initial/kept rank) and module (in, out) shapes.

    ``adapter_bytes`` (A and B at ``bytes_per_param``) and ``flops_per_token``, each at three ranks: ``kept`` (every
    module at its kept rank: what a rank-aware forward such as PEFT's computes), ``padded`` (every adapted module at
    vLLM's ``max_lora_rank`` bucket of the max kept rank, pruned or not: what vLLM's kernels compute and its buffers
    hold) and ``unpruned`` (the LoRA of the same start rank). FLOPs = 2 x multiply-adds; one token through a rank-r
    module costs ``x A^T`` (r * in) plus ``(x A^T) B^T`` (r * out) multiply-adds.
    """
    kept = max((r["kept"] for r in report.values()), default=0)
    try:
        padded = vllm_max_lora_rank(max(kept, 1))
    except ValueError:
        padded = None

    def params(rank_of) -> int:
        return sum(rank_of(n, r) * (shapes[n][0] + shapes[n][1]) for n, r in report.items())

    at_kept = params(lambda n, r: r["kept"])
    at_initial = params(lambda n, r: r["initial"])
    at_padded = None if padded is None else params(lambda n, r: padded)
    return {
        "max_kept_rank": kept,
        "vllm_max_lora_rank": padded,
        "adapter_bytes": {"kept": at_kept * bytes_per_param, "padded": None if padded is None else at_padded * bytes_per_param,
                          "unpruned": at_initial * bytes_per_param},
        "flops_per_token": {"kept": 2 * at_kept, "padded": None if padded is None else 2 * at_padded,
                            "unpruned": 2 * at_initial},
    }
