"""The GPU speed keys: which attention kernel, Liger's Triton kernels, fused AdamW, ``torch.compile``.

Each value is checked with the config; a missing package or GPU is refused when a run starts, before anything is
loaded, with the fix
and applied where the run builds the model, the optimizer and the accelerator. Under ``flash_attention_2`` a packed
batch is flattened into one row (see :func:`sora_ds.data.chat.collate`): transformers runs FlashAttention's
variable-length kernel only for a single row with restarting ``position_ids``; for several rows it would attend
across the examples of a row.
"""

from __future__ import annotations

import importlib.util

import torch

from ..adapters.errors import ConfigError

ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")


def _missing(key: str, value, package: str, install: str, instead: str) -> ConfigError | None:
    """The error for a key whose value needs ``package`` and a CUDA GPU, or None when both are present."""
    if importlib.util.find_spec(package) is None:
        return ConfigError(key, f"={value!r} needs the {package} package, which is not installed ({install}); "
                                f"{instead}")
    if not torch.cuda.is_available():
        return ConfigError(key, f"={value!r} needs a CUDA GPU (its kernels are CUDA/Triton only) and none is "
                                f"available; {instead}")
    return None


def check_kernel_keys(cfg) -> None:
    """The speed keys of a :class:`~sora_ds.recipe.config.TrainConfig`: allowed values (with the config, anywhere)."""
    if cfg.attn_implementation not in ATTN_IMPLEMENTATIONS:
        raise ConfigError("attn_implementation", f"={cfg.attn_implementation!r} is not allowed; choose one of "
                                                 f"{list(ATTN_IMPLEMENTATIONS)}")
    if cfg.peak_flops_per_device is not None and not cfg.peak_flops_per_device > 0:
        raise ConfigError("peak_flops_per_device", f"must be > 0 FLOP/s (e.g. 989e12 for an H100 SXM) or null, got "
                                                   f"{cfg.peak_flops_per_device!r}")


def check_kernel_environment(cfg) -> None:
    """The packages and the GPU the speed keys need, at the start of a training run (before anything is loaded).
    Not with the config: `sora-ds preview` and `sora-ds plan` of a GPU recipe run on a laptop too."""
    if cfg.attn_implementation == "flash_attention_2":
        error = _missing("attn_implementation", "flash_attention_2", "flash_attn",
                         "pip install flash-attn --no-build-isolation", "use sdpa (the default) instead")
        if error:
            raise error
    if cfg.use_liger_kernel:
        error = _missing("use_liger_kernel", True, "liger_kernel", "pip install liger-kernel",
                         "set use_liger_kernel: false")
        if error:
            raise error


def use_fused_adamw(cfg, device: torch.device) -> bool:
    """``fused_adamw``, or when unset (None): on when the run trains on CUDA."""
    return device.type == "cuda" if cfg.fused_adamw is None else cfg.fused_adamw


def flatten_packed(cfg) -> bool:
    """Packed rows go to the model as one flattened row (FlashAttention's padding-free, per-example path)."""
    return cfg.packing and cfg.attn_implementation == "flash_attention_2"


def apply_liger(model, zero3: bool) -> None:
    """Liger's kernels on ``model`` in place (RMSNorm, RoPE, SwiGLU and the fused linear cross-entropy), through the
    apply function Liger has for the model's type (``apply_liger_kernel_to_llama`` for Llama; the same entry the
    transformers Trainer uses). Under ZeRO-3 the plain Liger cross-entropy replaces the fused one: that reads
    ``lm_head.weight`` outside the head's forward, where ZeRO-3 holds only a shard of it."""
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN, _apply_liger_kernel_to_instance

    model_type = model.config.model_type
    if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:  # Liger would only log it
        raise ConfigError("use_liger_kernel", f"Liger has no kernels for model type {model_type!r}; supported: "
                                              f"{sorted(MODEL_TYPE_TO_APPLY_LIGER_FN)}; set use_liger_kernel: false")
    # (keywords an apply function lacks, e.g. swiglu for a GeGLU model, are dropped by Liger)
    _apply_liger_kernel_to_instance(model=model, rope=True, rms_norm=True, swiglu=True, cross_entropy=zero3,
                                    fused_linear_cross_entropy=not zero3)


def dynamo_backend(cfg) -> dict:
    """The ``Accelerator`` argument for ``torch_compile``: accelerate compiles the prepared model (and a DeepSpeed
    engine through ``engine.compile``) with inductor."""
    return {"dynamo_backend": "inductor"} if cfg.torch_compile else {}


def check_compile(cfg, accelerator) -> None:
    """accelerate keeps the state of the first ``Accelerator`` of a process: a later run asking for
    ``torch_compile`` would silently run uncompiled."""
    if cfg.torch_compile and accelerator.state.dynamo_plugin.backend.value == "NO":
        raise ConfigError("torch_compile", "=True cannot take effect: accelerate was set up earlier in this process "
                                           "without compilation; run it in a fresh process (e.g. the recipe script)")
