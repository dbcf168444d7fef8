"""FSDP2 in the recipe: the settings of an accelerate FSDP config, the combinations refused, sharding the model.

``accelerate launch --config_file launch/accelerate/fsdp2.yaml`` passes the config's ``fsdp_*`` keys as environment
variables. accelerate 1.15 acts on them only on GPU-like devices (on CPU the processes stay ``MULTI_CPU`` and it would
wrap the model in DDP), so sora-ds reads them itself, turns accelerate's own FSDP handling off, and shards the model
with :func:`sora_ds.engine.fsdp.shard` (``fully_shard`` per transformer block, then the root), the same on CPU and
GPU. accelerate still sets up the process group, the data loaders, gradient accumulation and the reductions.
"""

from __future__ import annotations

import os

import torch

from ..adapters.errors import ConfigError
from ..engine.fsdp import load_local_state, local_state, shard

FIX = "see launch/accelerate/fsdp2.yaml"


def fsdp2_settings(cfg) -> dict | None:
    """The FSDP settings `accelerate launch` passed (None without an FSDP config), checked against ``cfg`` before
    anything is loaded; takes them out of the environment so accelerate does not act on them a second time."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return None
    env = os.environ
    version = env.get("FSDP_VERSION", "1")
    if version != "2":
        raise ConfigError("fsdp_version", f"{version} is not supported: sora-ds runs FSDP2 (DTensor parameters) only; "
                          f"set fsdp_version: 2 in the accelerate config ({FIX})")
    for key, fix in (("FSDP_OFFLOAD_PARAMS", "set fsdp_offload_params: false (the adapter is small; offload is not "
                      "tested with the proximal step)"),
                     ("FSDP_ACTIVATION_CHECKPOINTING", "set it false and use the recipe key gradient_checkpointing: true"),
                     ("FSDP_CPU_RAM_EFFICIENT_LOADING", "set it false (every rank loads the base, then it is sharded)")):
        if env.get(key, "false").lower() == "true":
            raise ConfigError(key.lower(), f"true is not supported under FSDP2: {fix}")
    if cfg.deepspeed_config:
        raise ConfigError("deepspeed_config", "cannot be combined with an FSDP accelerate config: choose one engine "
                          "(drop deepspeed_config, or use launch/accelerate/zero3.yaml instead of the FSDP config)")
    q = cfg.quantization or {}
    if q.get("load_in_8bit"):
        raise ConfigError("quantization.load_in_8bit", "cannot be sharded by FSDP2 (int8 weights are not a float "
                          f"DTensor); use load_in_4bit with bnb_4bit_quant_storage: {cfg.torch_dtype}")
    if q.get("load_in_4bit") and q.get("bnb_4bit_quant_storage") != cfg.torch_dtype:
        raise ConfigError("quantization.bnb_4bit_quant_storage", f"must be {cfg.torch_dtype} for 4-bit under FSDP2 (the "
                          "model's torch_dtype) so the packed weights shard as float DTensors with the rest; got "
                          f"{q.get('bnb_4bit_quant_storage')!r}: set bnb_4bit_quant_storage: {cfg.torch_dtype}")
    if cfg.mixed_precision == "fp16":
        raise ConfigError("mixed_precision", "fp16 is not supported under FSDP2 (no gradient scaler for DTensor "
                          "gradients here); use bf16 or no")
    reshard = env.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() not in ("false", "no_shard", "shard_grad_op")
    os.environ["ACCELERATE_USE_FSDP"] = "false"
    return {"fsdp_version": 2, "reshard_after_forward": reshard}


def shard_model(settings: dict | None, cfg, model: torch.nn.Module) -> None:
    """Shard ``model`` (the base with its adapter, before the optimizer is built) when FSDP2 is configured."""
    if settings is None:
        return
    from torch.distributed.fsdp import MixedPrecisionPolicy

    # bf16 compute with fp32 gradient reduction; the stepped (sharded) parameters keep their dtype.
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if cfg.mixed_precision == "bf16" else None
    shard(model, reshard_after_forward=settings["reshard_after_forward"], mp_policy=mp)


def shard_file(accelerator) -> str:
    return f"fsdp2_rank{accelerator.process_index}.pt"


def save_shards(accelerator, model: torch.nn.Module, folder) -> None:
    """Under FSDP2, every rank writes its rows of the adapter and of the optimizer state (accelerate's save_state
    writes the optimizer from the main process only, which holds only its own rows)."""
    if not getattr(accelerator, "fsdp2", None):  # an Accelerator not built by build_accelerator: no FSDP2
        return
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    torch.save(local_state(named, accelerator._optimizers[0]), folder / shard_file(accelerator))


def fsdp_version(accelerator) -> int:
    """2 when sora-ds shards this run with FSDP2, else 0 (recorded in checkpoints, compared on resume)."""
    return 2 if getattr(accelerator, "fsdp2", None) else 0


def load_shards(accelerator, model: torch.nn.Module, folder) -> None:
    """The inverse of :func:`save_shards`; a checkpoint of an FSDP2 run is refused without FSDP2 (accelerate's own
    state in it holds no adapter weights)."""
    if not getattr(accelerator, "fsdp2", None):  # an Accelerator not built by build_accelerator: no FSDP2
        if any(folder.glob("fsdp2_rank*.pt")):
            raise ConfigError("resume_from", f"{folder} was written by an FSDP2 run: resume it with "
                              "launch/accelerate/fsdp2.yaml and the same process count (or export its adapter/)")
        return
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    path = folder / shard_file(accelerator)
    if not path.is_file():
        raise ConfigError("resume_from", f"{folder} has no {path.name}: it was not written by an FSDP2 run with "
                          f"{accelerator.num_processes} processes; resume with the launch config that wrote it")
    load_local_state(named, accelerator._optimizers[0], torch.load(path, weights_only=False))
