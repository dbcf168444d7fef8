"""The precision the base is held in under DeepSpeed, made to agree with ``torch_dtype`` before anything is loaded.

DeepSpeed keeps the model's weights in the precision of its own mixed-precision mode, whatever dtype they were
loaded in: ZeRO-3's ``zero.Init`` casts every parameter as it partitions it (to float32 when neither ``bf16`` nor
``fp16`` is enabled), and the engine casts the module to bf16/fp16 when one is (every stage). So, left alone,
``torch_dtype: bfloat16`` without ``mixed_precision: bf16`` under ZeRO-3 held the base in float32 (twice the memory,
without a word), and ``torch_dtype: float32`` with ``mixed_precision: bf16`` under DeepSpeed loaded a float32 base
only for DeepSpeed to halve it. :func:`consistent_precision` settles the pair from the launch (accelerate's
environment or ``deepspeed_config``) before the accelerator exists: the half-precision choice wins (it is the one that
decides memory), the other key follows it, and the change is said once and written into ``config.yaml``. bf16 with
fp16 is refused: no setting holds one and computes in the other.
"""

from __future__ import annotations

import dataclasses

from ..adapters.errors import ConfigError
from .config import TrainConfig

HALF = {"bfloat16": "bf16", "float16": "fp16"}  # torch_dtype -> the mixed_precision that holds it
HELD = {"no": "float32", "bf16": "bfloat16", "fp16": "float16"}  # mixed_precision -> the dtype DeepSpeed holds


def deepspeed_mixed_precision(cfg: TrainConfig, ds_config: dict) -> tuple[str, bool]:
    """``(mode, fixed)``: the mixed precision DeepSpeed will run in, and whether the JSON fixes it (``enabled: true``)
    rather than leaving it to ``mixed_precision`` (``"auto"``, absent or false)."""
    for mode in ("bf16", "fp16"):
        if str(ds_config.get(mode, {}).get("enabled", "auto")).lower() == "true":
            return mode, True
    return cfg.mixed_precision, False


def held_dtype(cfg: TrainConfig, ds_config: dict | None) -> str:
    """The dtype the frozen base is held in: ``torch_dtype``, except under DeepSpeed (see the module docstring)."""
    if ds_config is None:
        return cfg.torch_dtype
    mode, _ = deepspeed_mixed_precision(cfg, ds_config)
    stage = ds_config.get("zero_optimization", {}).get("stage", 0)
    return HELD[mode] if mode != "no" or stage == 3 else cfg.torch_dtype


def consistent_precision(cfg: TrainConfig, ds_config: dict | None) -> tuple[TrainConfig, str | None]:
    """``cfg`` with ``torch_dtype`` and ``mixed_precision`` agreeing with what DeepSpeed will hold, and the note to
    print when one was changed (None when nothing was). Raises :class:`ConfigError` for bf16 with fp16."""
    held = held_dtype(cfg, ds_config)
    if held == cfg.torch_dtype:
        return cfg, None
    mode, fixed = deepspeed_mixed_precision(cfg, ds_config)
    stage = ds_config.get("zero_optimization", {}).get("stage", 0)
    where = "the DeepSpeed config's " + mode if fixed else f"mixed_precision: {mode}"
    if cfg.torch_dtype in HALF and mode != "no":  # bf16 with fp16, whichever way round
        raise ConfigError("mixed_precision", f"is {mode} ({where}) but torch_dtype is {cfg.torch_dtype}: DeepSpeed "
                          f"would hold the base in {held}; set mixed_precision: {HALF[cfg.torch_dtype]} (and "
                          "bf16/fp16 enabled: auto in the DeepSpeed JSON), or torch_dtype: " + held)
    if cfg.torch_dtype in HALF:  # ZeRO-3 with mixed_precision: no would partition the base in float32
        new = dataclasses.replace(cfg, mixed_precision=HALF[cfg.torch_dtype])
        return new, (f"torch_dtype: {cfg.torch_dtype} under ZeRO-3: mixed_precision set to {new.mixed_precision} "
                     f"(with mixed_precision: no DeepSpeed would hold the base in float32, twice the memory); set "
                     f"mixed_precision: {new.mixed_precision} to silence this, or torch_dtype: float32 for a float32 base")
    new = dataclasses.replace(cfg, torch_dtype=held)
    return new, (f"{where} under DeepSpeed ZeRO-{stage} holds the base in {held}: torch_dtype set to {held} (not "
                 f"float32) so it is loaded that way; set torch_dtype: {held} to silence this")
