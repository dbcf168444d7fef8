"""The recipe configuration: one typed, flat dataclass; the YAML key, the field, the ``--key`` override and the
logged key are the same string.

Precedence: dataclass defaults < the recipe script's family defaults < ``--config file.yaml`` < ``--key value``.
Command-line values are parsed as YAML (``--r 16``, ``--target_modules '[q_proj, v_proj]'``, ``--dataset null``).
Unknown keys and wrong types are errors that name the key; values are checked before any model is loaded.

The field defaults are the embedded CPU demo (tiny Llama built from a config, built-in chat data, ~1 minute on
2 cores). Configs for real models set the model, data, learning rate and sparsity explicitly.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from .config import GATE_INITS, AdaLoRAConfig, AdapterConfig, SoRAConfig
from .prox import THRESHOLD_MODES
from .schedule import LAMBDA_SCHEDULES, LambdaSchedule

TINY_LLAMA = {
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    # A frozen random lm_head at the usual 0.02 init caps logits near +-1.3, so no adapter could fit the data;
    # 0.15 gives the demo base a usable output range while keeping activations small (at 0.3 hidden states reach
    # ~90 and fp32 rounding alone moves logits by ~1e-5).
    "initializer_range": 0.15,
}
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine")
DTYPES = ("float32", "bfloat16", "float16")
MIXED_PRECISION = ("no", "bf16", "fp16")
METHODS = ("sora", "adalora")


class ConfigError(ValueError):
    """A recipe configuration problem: names the key, the value and what is allowed."""


@dataclass
class TrainConfig:
    # --- model ---
    model_name_or_path: str | None = None  # hub name or local dir; None builds a Llama from model_config
    model_config: dict = field(default_factory=lambda: dict(TINY_LLAMA))  # config kwargs when building from config
    tokenizer_name_or_path: str | None = None  # None: the model's own, or the built-in byte tokenizer
    torch_dtype: str = "float32"
    quantization: dict | None = None  # BitsAndBytesConfig arguments, e.g. {load_in_4bit: true, bnb_4bit_quant_type: nf4}
    # --- data ---
    dataset: str | None = None  # local .json/.jsonl file or folder, or hub dataset name; None: built-in tiny chat
    dataset_split: str = "train"
    eval_size: float = 0.1  # fraction in (0, 1) or a count of examples
    max_length: int = 128
    packing: bool = False  # several training examples per max_length row, kept apart by position_ids
    # --- adapter ---
    method: str = "sora"  # "sora" or "adalora"
    target_modules: list[str] | str = field(default_factory=lambda: ["q_proj", "v_proj"])
    r: int = 8  # start rank (AdaLoRA: the initial rank of every matrix)
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    gate_init: str = "normal"
    # --- AdaLoRA (method: adalora); steps are optimizer steps, the schedule ends at max_steps ---
    target_r: int = 8  # average rank the global budget decreases to
    t_init: int = 0  # steps at the full budget before pruning starts
    t_final: int = 0  # last steps with the final mask fixed
    delta_t: int = 1  # steps between re-allocations
    importance_beta1: float = 0.85  # sensitivity smoothing
    importance_beta2: float = 0.85  # uncertainty smoothing
    orth_reg_weight: float = 0.5  # orthogonality penalty on P and Q
    # --- sparsity (method: sora) ---
    sparse_lambda: float = 1.0
    threshold_mode: str = "lr_scaled"
    lambda_schedule: str = "constant"
    lambda_start: float = 0.0
    lambda_ramp_steps: int | None = None  # None: max_steps
    sparsify_stages: int = 0
    gate_l1: float = 0.0
    gate_learning_rate: float | None = None  # None: learning_rate
    # --- optimization ---
    learning_rate: float = 1e-2
    weight_decay: float = 0.0
    lr_scheduler_type: str = "constant"
    warmup_steps: int = 0
    max_steps: int = 200
    per_device_train_batch_size: int = 16
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 1.0  # 0 disables clipping
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, ~30% more compute
    seed: int = 42
    # --- outputs ---
    output_dir: str = "outputs/sora"
    log_every: int = 10
    report_to: list[str] = field(default_factory=list)  # accelerate trackers, e.g. [tensorboard] or [wandb]
    eval_every: int = 50  # 0: evaluate only at the end (and at stage ends)
    save_merged: bool = False
    save_every: int = 0  # optimizer steps between checkpoints; 0: none
    save_total_limit: int = 0  # keep only the newest N checkpoints; 0: keep all
    resume_from: str | None = None  # a checkpoint folder, or "latest" (newest under output_dir/checkpoints)
    # --- distributed ---
    deepspeed_config: str | None = None  # DeepSpeed JSON, for launchers other than `accelerate launch`

    def __post_init__(self) -> None:
        _check_choice("method", self.method, METHODS)
        _check_choice("torch_dtype", self.torch_dtype, DTYPES)
        _check_choice("gate_init", self.gate_init, GATE_INITS)
        _check_choice("threshold_mode", self.threshold_mode, THRESHOLD_MODES)
        _check_choice("lambda_schedule", self.lambda_schedule, LAMBDA_SCHEDULES)
        _check_choice("lr_scheduler_type", self.lr_scheduler_type, LR_SCHEDULERS)
        _check_choice("mixed_precision", self.mixed_precision, MIXED_PRECISION)
        for key in ("max_steps", "per_device_train_batch_size", "gradient_accumulation_steps", "log_every", "r"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be >= 1, got {getattr(self, key)!r}")
        for key in ("save_every", "save_total_limit", "warmup_steps", "eval_every", "sparse_lambda", "lambda_start", "gate_l1", "weight_decay"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key} must be >= 0, got {getattr(self, key)!r}")
        if self.deepspeed_config is not None and not Path(self.deepspeed_config).is_file():
            raise ConfigError(f"deepspeed_config={self.deepspeed_config!r}: no such file")
        if self.max_length < 8:
            raise ConfigError(f"max_length must be >= 8, got {self.max_length!r}")
        if not self.learning_rate > 0:
            raise ConfigError(f"learning_rate must be > 0, got {self.learning_rate!r}")
        if self.model_name_or_path is None and not self.model_config:
            raise ConfigError("model_config must be a non-empty mapping when model_name_or_path is null")
        _check_trackers(self.report_to)
        if self.method == "adalora" and (self.sparsify_stages or self.gate_l1):
            raise ConfigError(
                f"sparsify_stages={self.sparsify_stages} / gate_l1={self.gate_l1} are SoRA settings; with method: "
                "adalora set them to 0 (the budget schedule t_init / t_final / delta_t / target_r prunes instead)"
            )
        self.bnb_config()
        # Reuse the library's own validation, re-raised under the recipe keys.
        try:
            self.adapter_config()
            self.lambda_schedule_obj()
        except ValueError as e:
            message = str(e).replace("SoRAConfig.", "").replace("AdaLoRAConfig.", "").replace("AdaLoRAConfig: ", "")
            raise ConfigError(message.replace("total_step", "max_steps")) from None

    def adapter_config(self) -> AdapterConfig:
        """The library config for ``method``: a :class:`SoRAConfig` or an :class:`AdaLoRAConfig` ending at max_steps."""
        common = dict(r=self.r, lora_alpha=self.lora_alpha, target_modules=self.target_modules,
                      lora_dropout=self.lora_dropout, init_seed=self.seed)
        if self.method == "adalora":
            return AdaLoRAConfig(
                **common,
                target_r=self.target_r,
                t_init=self.t_init,
                t_final=self.t_final,
                delta_t=self.delta_t,
                total_step=self.max_steps,
                importance_beta1=self.importance_beta1,
                importance_beta2=self.importance_beta2,
                orth_reg_weight=self.orth_reg_weight,
            )
        return SoRAConfig(**common, gate_init=self.gate_init)

    def lambda_schedule_obj(self) -> LambdaSchedule:
        return LambdaSchedule(
            sparse_lambda=self.sparse_lambda,
            lambda_schedule=self.lambda_schedule,
            lambda_start=self.lambda_start,
            lambda_ramp_steps=self.lambda_ramp_steps if self.lambda_ramp_steps is not None else self.max_steps,
            sparsify_stages=self.sparsify_stages,
        )

    def bnb_config(self):
        """``transformers.BitsAndBytesConfig`` from ``quantization`` (dtype names as strings), or None."""
        if not self.quantization:
            return None
        import inspect

        from transformers import BitsAndBytesConfig

        allowed = set(inspect.signature(BitsAndBytesConfig.__init__).parameters) - {"self", "kwargs"}
        unknown = sorted(set(self.quantization) - allowed)
        if unknown:
            raise ConfigError(f"quantization keys {unknown} are not BitsAndBytesConfig arguments; allowed: {sorted(allowed)}")
        q = dict(self.quantization)
        if bool(q.get("load_in_4bit")) == bool(q.get("load_in_8bit")):
            raise ConfigError(f"quantization must set exactly one of load_in_4bit / load_in_8bit to true, got {q}")
        for key in ("bnb_4bit_compute_dtype", "bnb_4bit_quant_storage"):
            if isinstance(q.get(key), str):
                if q[key] not in DTYPES and q[key] != "uint8":
                    raise ConfigError(f"quantization.{key}={q[key]!r}; choose one of {list(DTYPES) + ['uint8']}")
                q[key] = getattr(torch, q[key])
        if q.get("bnb_4bit_quant_type", "nf4") not in ("nf4", "fp4"):
            raise ConfigError(f"quantization.bnb_4bit_quant_type={q['bnb_4bit_quant_type']!r}; choose 'nf4' or 'fp4'")
        return BitsAndBytesConfig(**q)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _check_choice(key: str, value, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not allowed; choose one of {list(allowed)}")


def _check_trackers(names: list[str]) -> None:
    """accelerate drops a tracker whose package is missing without a word; say so before training instead."""
    if not names:
        return
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers

    available = {str(t) for t in get_available_trackers()}
    for name in names:
        if name not in LOGGER_TYPE_TO_CLASS:
            raise ConfigError(f"report_to entry {name!r} is not a tracker; choose from {sorted(LOGGER_TYPE_TO_CLASS)}")
        if name not in available:
            raise ConfigError(f"report_to entry {name!r}: its package is not installed (pip install {name})")


_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def _type_ok(value, hint) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(_type_ok(v, item) for v in value)
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    return isinstance(value, hint)


def _coerce(key: str, value, source: str):
    if key not in _FIELDS:
        close = difflib.get_close_matches(key, _FIELDS, n=3)
        hint = f"; did you mean {close}?" if close else f"; known keys: {sorted(_FIELDS)}"
        raise ConfigError(f"unknown config key {key!r} (from {source}){hint}")
    hint = typing.get_type_hints(TrainConfig)[key]
    if isinstance(value, str) and not _type_ok(value, hint):
        value = _number(value, hint)
    if isinstance(value, bool) and not _type_ok(value, hint) and _type_ok("", hint):
        value = "yes" if value else "no"  # YAML 1.1 reads `mixed_precision: no` as False; the key wants the word
    if not _type_ok(value, hint):
        raise ConfigError(f"config key {key!r} (from {source}) got {value!r} of type {type(value).__name__}; "
                          f"expected {_hint_name(hint)}")
    if hint is float or (typing.get_origin(hint) in (typing.Union, types.UnionType) and float in typing.get_args(hint)):
        if isinstance(value, int):
            value = float(value)
    return value


def _number(text: str, hint):
    """YAML 1.1 reads ``1e-3`` as a string; accept it (and ``8``-like text) where the field is numeric."""
    for kind in (int, float):
        if _type_ok(kind(1), hint):
            try:
                return kind(text)
            except ValueError:
                pass
    return text


def _hint_name(hint) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def parse_overrides(argv: list[str]) -> tuple[str | None, dict]:
    """Split ``[--config F] [--key value | --key=value ...]`` into the config path and raw overrides."""
    config_path, overrides, i = None, {}, 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}; use --config FILE.yaml and --key value overrides")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(argv):
                raise ConfigError(f"--{key} needs a value")
            value, i = argv[i + 1], i + 1
        i += 1
        key = key.replace("-", "_")
        if key == "local_rank":  # added by the `deepspeed` launcher; the rank is read from LOCAL_RANK instead
            continue
        if key == "config":
            config_path = value
        else:
            overrides[key] = yaml.safe_load(value) if value != "" else ""
    return config_path, overrides


def load_config(argv: list[str] | None = None, defaults: dict | None = None) -> TrainConfig:
    """Build the :class:`TrainConfig` for a recipe run (see the module docstring for precedence)."""
    import sys

    config_path, overrides = parse_overrides(sys.argv[1:] if argv is None else argv)
    values: dict = {}
    for source, layer in (("recipe defaults", defaults or {}), (config_path, _read_yaml(config_path)), ("command line", overrides)):
        for key, value in layer.items():
            values[key] = _coerce(key, value, source)
    return TrainConfig(**values)


def _read_yaml(path: str | None) -> dict:
    if path is None:
        return {}
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--config {path!r}: no such file")
    data = yaml.safe_load(p.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path!r} must hold a mapping of config keys, got {type(data).__name__}")
    return data


def save_config(cfg: TrainConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
