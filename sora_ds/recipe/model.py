"""What a run trains on: the accelerator, the tokenizer and the base model (loaded, built from a config, quantized)."""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import torch

from ..adapters.inject import select_targets
from ..engine import check_deepspeed_version, launch_deepspeed_config, without_zero_init, zero_stage
from ..engine.heartbeat import default_collective_timeout
from ..engine.atomic import atomic_dir
from .config import ConfigError, TrainConfig, chat_template_text
from .kernels import apply_liger, check_compile, dynamo_backend
from .fsdp2 import fsdp2_settings


def build_accelerator(cfg: TrainConfig):
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin, DistributedType, GradientAccumulationPlugin, InitProcessGroupKwargs

    from .trackers import trackers

    # Launched on several processes without a GPU, accelerate would pick no backend (and DeepSpeed would then see
    # one process): ask for gloo. A plain single process must not ask, or accelerate expects a process group.
    multi = int(os.environ.get("WORLD_SIZE", "1")) > 1
    fsdp2 = fsdp2_settings(cfg)  # checked (and taken from accelerate) before anything else: see recipe/fsdp2.py
    gpu = torch.cuda.is_available()
    handlers = []
    if multi:  # the timeout is what turns a rank that stopped responding into an error instead of a silent hang
        seconds = dist_timeout(cfg, gpu)
        default_collective_timeout(seconds)  # DeepSpeed's own groups too
        timeout = timedelta(seconds=seconds)
        handlers = [InitProcessGroupKwargs(timeout=timeout) if gpu else InitProcessGroupKwargs(backend="gloo", timeout=timeout)]
    plugin = GradientAccumulationPlugin(num_steps=cfg.gradient_accumulation_steps, sync_with_dataloader=False)
    ds_plugin = None
    if cfg.deepspeed_config and os.environ.get("ACCELERATE_USE_DEEPSPEED", "false") != "true":
        # Started by `deepspeed` or torchrun rather than `accelerate launch`: build the plugin from the JSON.
        stage = launch_deepspeed_config(cfg.deepspeed_config).get("zero_optimization", {}).get("stage", 0)
        ds_plugin = DeepSpeedPlugin(hf_ds_config=cfg.deepspeed_config, zero3_init_flag=stage == 3)
    accelerator = Accelerator(
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_plugin=plugin,
        kwargs_handlers=handlers,
        deepspeed_plugin=ds_plugin,
        log_with=trackers(cfg.report_to, cfg.output_dir) or None,
        project_dir=cfg.output_dir,
        **dynamo_backend(cfg),
        cpu=fsdp2 is not None and not gpu,  # FSDP2 on CPU: accelerate's MULTI_CPU (gloo) process group
    )
    check_compile(cfg, accelerator)
    if multi and accelerator.distributed_type == DistributedType.NO:
        # accelerate's MULTI_GPU type on a machine without a GPU falls back to NO: the processes would each train
        # alone (no gradient averaging, no barriers) and overwrite each other's outputs.
        raise ConfigError(
            "distributed_type", f"the launcher started {os.environ['WORLD_SIZE']} processes but accelerate set up no "
            "distributed training (a MULTI_GPU config on a machine without a GPU?); on CPU launch with "
            "launch/accelerate/zero2.yaml, zero3.yaml or fsdp2.yaml")
    accelerator.fsdp2 = fsdp2  # sora-ds's FSDP2 settings (None without FSDP2)
    ds = accelerator.state.deepspeed_plugin
    if ds is not None:
        check_deepspeed_version()
        if ds.deepspeed_config.get("gradient_clipping", "auto") == "auto":
            ds.deepspeed_config["gradient_clipping"] = cfg.max_grad_norm  # the recipe YAML owns clipping
    return accelerator


def dist_timeout(cfg: TrainConfig, gpu: bool) -> int:
    """Seconds a collective waits for the other ranks: ``dist_timeout``, else 180 on CPU (any step of the CPU
    recipes takes seconds) and 600 on GPU (PyTorch's NCCL default; first steps can include kernel compilation)."""
    return cfg.dist_timeout or (600 if gpu else 180)


def load_tokenizer(cfg: TrainConfig):
    from transformers import AutoTokenizer

    name = cfg.tokenizer_name_or_path or cfg.model_name_or_path
    if name:
        tok = AutoTokenizer.from_pretrained(name)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
    else:
        from ..data.tokenizer import build_byte_tokenizer

        tok = build_byte_tokenizer()
    if cfg.chat_template is not None:  # saved with the tokenizer (base_model/), so serving renders the same way
        tok.chat_template = chat_template_text(cfg.chat_template)
    return tok


def load_model(cfg: TrainConfig, path: str, quantization=None, device=None):
    """The base model from ``path`` (a folder or a hub id).

    Under ZeRO-3 (accelerate's DeepSpeed plugin with ``zero3_init_flag``) transformers loads it inside
    ``deepspeed.zero.Init``: every rank only ever holds its own slice of the base weights. With ``quantization``
    (a ``BitsAndBytesConfig``) the weights are quantized while loading, on ``device`` (None under ZeRO-3).
    """
    from transformers import AutoModelForCausalLM

    extra = {"quantization_config": quantization} if quantization else {}
    if quantization and device is not None:
        extra["device_map"] = {"": device}
    return AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, cfg.torch_dtype),
                                                attn_implementation=cfg.attn_implementation, **extra)


def build_base_model(cfg: TrainConfig, tokenizer, path: Path, accelerator):
    """Build the ``model_config`` base once, seeded, on the main process, and save it to ``path``.

    Why once and outside ``zero.Init``: under ZeRO-3 transformers would initialise each rank's slice with its own
    random draws, so the same seed gave another base at another process count or stage. Here the base depends on
    the seed only; every other process (and every ZeRO-3 process) loads the saved copy. Returns the built model on
    the main process, ``None`` elsewhere. Collective (a barrier).
    """
    from transformers import AutoModelForCausalLM

    model = None
    if accelerator.is_main_process:
        config = model_config(cfg, tokenizer)
        # Saving inside too: with ZeRO-3 on, save_pretrained would gather (a collective) on this process alone.
        with without_zero_init(accelerator.state.deepspeed_plugin), atomic_dir(path) as tmp:
            torch.manual_seed(cfg.seed)
            model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, cfg.torch_dtype),
                                                     attn_implementation=cfg.attn_implementation)
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    accelerator.wait_for_everyone()
    return model


def model_config(cfg: TrainConfig, tokenizer):
    """The base model's transformers config: read from ``model_name_or_path``, or built from ``model_config``."""
    from transformers import AutoConfig

    if cfg.model_name_or_path:
        return AutoConfig.from_pretrained(cfg.model_name_or_path)
    kwargs = dict(cfg.model_config)
    return AutoConfig.for_model(
        kwargs.pop("model_type", "llama"),
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **kwargs,
    )


def check_targets(cfg: TrainConfig, tokenizer, accelerator) -> None:
    """``target_modules`` and ``modules_to_save`` checked against a weightless (meta-device) copy of the base:
    seconds, before the base is built, loaded or saved (raises :class:`~sora_ds.TargetError`)."""
    from transformers import AutoModelForCausalLM

    with without_zero_init(accelerator.state.deepspeed_plugin), torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(model_config(cfg, tokenizer))
    select_targets(skeleton, cfg.adapter)


def check_quantization(cfg: TrainConfig, accelerator) -> None:
    """Refuse quantization + DeepSpeed combinations that cannot work, before anything is loaded."""
    ds = accelerator.state.deepspeed_plugin
    q = cfg.quantization
    if not q or ds is None:
        return
    zero = ds.deepspeed_config.get("zero_optimization", {})
    offloaded = [k for k in ("offload_param", "offload_optimizer") if zero.get(k, {}).get("device", "none") not in ("none", None)]
    if offloaded:
        raise ConfigError(
            "quantization", f"with DeepSpeed {offloaded} is not supported (CPU offload with a quantized base uses more "
            "GPU memory, not less); use launch/accelerate/zero3.yaml or zero2.yaml"
        )
    if zero.get("stage") == 3:
        if q.get("load_in_8bit"):
            raise ConfigError(
                "quantization.load_in_8bit", "cannot be sharded by ZeRO-3 (int8 weights cannot be flattened); use "
                f"load_in_4bit with bnb_4bit_quant_storage: {cfg.torch_dtype}, or ZeRO-2"
            )
        if q.get("bnb_4bit_quant_storage") != cfg.torch_dtype:
            raise ConfigError(
                "quantization.bnb_4bit_quant_storage", f"must be {cfg.torch_dtype} for 4-bit under ZeRO-3 (the model's "
                f"torch_dtype) so the packed weights can be flattened and sharded; got "
                f"{q.get('bnb_4bit_quant_storage')!r}"
            )


def base_model(cfg: TrainConfig, tokenizer, out: Path, accelerator):
    """The frozen base, ready for :func:`sora_ds.inject`: loaded (quantized while loading, partitioned under ZeRO-3),
    or built from ``model_config`` into ``out/base_model`` first."""
    quantization = cfg.bnb_config()
    zero3 = zero_stage(accelerator) == 3
    source, model = cfg.model_name_or_path, None
    if not source:
        source = str(out / "base_model")
        model = build_base_model(cfg, tokenizer, out / "base_model", accelerator)
    if model is None or quantization is not None or zero3:
        # Quantize while loading (bitsandbytes quantizes on placement); under ZeRO-3 load partitioned.
        del model
        model = load_model(cfg, source, quantization, device=None if zero3 else accelerator.device)
    if quantization is not None and not zero3:
        from peft import prepare_model_for_kbit_training

        # Norms and other small float params go to fp32 for stable training on a quantized base.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    # Training never reads a KV cache; without one, packed rows (position_ids, no attention mask) also get their
    # block-diagonal mask (transformers only looks for packed sequences when there is no cache).
    model.config.use_cache = False
    if cfg.use_liger_kernel:
        apply_liger(model, zero3)
    if cfg.gradient_checkpointing:
        # Non-reentrant: correct with a frozen base (no inputs needing grad) and under ZeRO-3.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model
