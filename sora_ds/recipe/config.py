"""The recipe configuration: one typed dataclass, written flat in YAML; the YAML key, the ``--key`` override and the
logged key are the same string.

Where each key is defined (one place per knob):

* the recipe's own keys (model, data, optimization, outputs): the fields of :class:`TrainConfig` below;
* the adapter keys (``r``, ``lora_alpha``, ``target_modules``, ``lora_dropout``, ``modules_to_save``, and
  ``gate_init`` for SoRA or ``target_r``, ``t_init``, ... for AdaLoRA): the fields of the library's
  :class:`~sora_ds.SoRAConfig` / :class:`~sora_ds.AdaLoRAConfig`, chosen by ``method``, held in ``cfg.adapter``;
* the sparsity schedule keys of SoRA (``sparse_lambda``, ``lambda_schedule``, ...): the fields of
  :class:`~sora_ds.LambdaSchedule`, held in ``cfg.sparsity``.

Two library fields come from recipe keys instead of being set: ``total_step`` is ``max_steps`` and ``init_seed`` is
``seed`` (``lambda_ramp_steps: null`` also means ``max_steps``). Library validation errors are re-raised under the
recipe key, from the error's fields, not by rewriting its text.

Precedence: dataclass defaults < the YAML (``--config file.yaml``, or the entry script's own YAML when none is given)
< ``--key value``. Command-line values are parsed as YAML (``--r 16``, ``--target_modules '[q_proj, v_proj]'``).
Unknown keys, keys of the other method and wrong types are errors that name the key, before any model is loaded.

The field defaults are the embedded CPU demo (tiny Llama built from a config, built-in chat data, ~1 minute on
2 cores). Configs for real models set the model, data, learning rate and sparsity explicitly.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from ..adapters.config import AdaLoRAConfig, AdapterConfig, SoRAConfig
from ..adapters.errors import ConfigError
from ..adapters.prox import THRESHOLD_MODES
from ..adapters.serving import ADAPTER_FORMATS
from ..adapters.schedule import LambdaSchedule
from ..data.answers import normalize
from ..data.chat import TRUNCATIONS
from .kernels import check_kernel_keys

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
ADAPTER_CONFIGS: dict[str, type[AdapterConfig]] = {"sora": SoRAConfig, "adalora": AdaLoRAConfig}
# Library fields the recipe derives from its own keys (library field -> recipe key).
DERIVED = {"total_step": "max_steps", "init_seed": "seed"}


@dataclass
class TrainConfig:
    # --- model ---
    model_name_or_path: str | None = None  # hub name or local dir; None builds a Llama from model_config
    model_config: dict = field(default_factory=lambda: dict(TINY_LLAMA))  # config kwargs when building from config
    tokenizer_name_or_path: str | None = None  # None: the model's own, or the built-in byte tokenizer
    torch_dtype: str = "float32"  # float32, bfloat16 or float16: the dtype the base is loaded in
    quantization: dict | None = None  # BitsAndBytesConfig arguments, e.g. {load_in_4bit: true, bnb_4bit_quant_type: nf4}
    # --- data ---
    dataset: str | None = None  # local .json/.jsonl file or folder, or hub dataset name; None: built-in tiny chat
    dataset_split: str = "train"  # the split of a hub dataset (local files have one)
    eval_size: int | float = 0.1  # fraction in (0, 1) or a count of examples
    max_length: int = 128  # tokens per example (see truncation)
    # an example longer than max_length: keep_answer keeps its last assistant turn and cuts the prompt from the left
    # (after BOS); keep_start keeps its first max_length tokens (an answer past them is dropped)
    truncation: str = "keep_answer"  # keep_answer or keep_start: what of a too-long example is kept
    chat_template: str | None = None  # Jinja template, or the path of a .jinja file, replacing the tokenizer's own
    packing: bool = False  # several training examples per max_length row, kept apart by position_ids
    # --- evaluation: the task metrics beside eval loss (README: Evaluation) ---
    eval_dataset: str | None = None  # local .json/.jsonl file or folder as the eval set (then eval_size: 0); null: split
    eval_max_new_tokens: int = 0  # > 0: generate each eval answer greedily, up to this many tokens (eval_exact_match)
    eval_choices: list[str] | None = None  # candidate answers; the likeliest is picked (eval_choice_accuracy)
    eval_samples: int = 3  # generated/picked answers per eval in eval_samples.jsonl, the log and the trackers
    # --- adapter: flat keys of SoRAConfig / AdaLoRAConfig (see the module docstring) ---
    method: str = "sora"  # "sora" or "adalora"
    adapter: AdapterConfig = field(default_factory=SoRAConfig)
    # --- sparsity (SoRA): flat keys of LambdaSchedule, plus the gate step's optimizer settings ---
    sparsity: LambdaSchedule | None = field(default_factory=LambdaSchedule)  # None with method: adalora
    threshold_mode: str = "lr_scaled"  # the gate step threshold: lr_scaled (lr * lambda) or absolute (lambda)
    gate_l1: float = 0.0  # an L1 penalty on the gates added to the loss (besides the proximal step)
    gate_learning_rate: float | None = None  # None: learning_rate
    # --- optimization ---
    learning_rate: float = 1e-2  # AdamW learning rate of the adapter
    weight_decay: float = 0.0  # AdamW weight decay (never on the gates)
    lr_scheduler_type: str = "constant"  # constant, constant_with_warmup, linear or cosine
    warmup_steps: int = 0  # learning-rate warmup, in optimizer steps
    max_steps: int = 200  # optimizer steps of the run (the schedules are laid out over them)
    num_train_epochs: float | None = None  # instead of max_steps: passes over the training split (steps computed)
    per_device_train_batch_size: int = 16  # examples per micro-batch on each process
    gradient_accumulation_steps: int = 1  # micro-batches per optimizer step
    max_grad_norm: float = 1.0  # 0 disables clipping
    mixed_precision: str = "no"  # no, bf16 or fp16 (accelerate autocast)
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, ~30% more compute
    seed: int = 42  # builds the base from model_config, orders the data, inits the adapters
    # --- outputs ---
    output_dir: str = "outputs/sora"  # where the run writes (see the README: Safety and recovery)
    overwrite_output_dir: bool = False  # replace the run files of another run found in output_dir (never other files)
    log_every: int = 10  # optimizer steps between metrics.jsonl records
    report_to: list[str] = field(default_factory=list)  # accelerate trackers, e.g. [tensorboard] or [wandb]
    eval_every: int = 50  # 0: evaluate only at the end (and at stage ends)
    save_merged: bool = False  # the merged model (the export format "merged") in merged/
    # peft -> adapter/ (required: export, merge and report read it); the others -> adapter_<format>/ (see
    # sora_ds.adapters.serving.EXPORT_FORMATS)
    export_formats: list[str] = field(default_factory=lambda: ["peft"])  # adapter formats written at the end
    save_every: int = 0  # optimizer steps between checkpoints; 0: none
    save_total_limit: int = 0  # keep only the newest N checkpoints; 0: keep all
    resume_from: str | None = None  # a checkpoint folder, or "latest" (newest under output_dir/checkpoints)
    resume_allow_changes: list[str] = field(default_factory=list)  # keys a resume may change; only RESUME_OPT_IN
    # --- distributed ---
    deepspeed_config: str | None = None  # DeepSpeed JSON, for launchers other than `accelerate launch`
    dist_timeout: int | None = None  # seconds a collective may wait for a silent rank; None: 180 on CPU, 600 on GPU
    # --- GPU speed (checked and applied in recipe/kernels.py; metrics in recipe/throughput.py) ---
    attn_implementation: str = "sdpa"  # sdpa, eager or flash_attention_2 (needs flash_attn and a CUDA GPU)
    use_liger_kernel: bool = False  # Liger's Triton kernels: RMSNorm, RoPE, SwiGLU, fused linear cross-entropy
    fused_adamw: bool | None = None  # torch's fused AdamW kernel; None: on when training on CUDA
    torch_compile: bool = False  # torch.compile the model (inductor, through accelerate)
    peak_flops_per_device: float | None = None  # peak FLOP/s of one device for mfu; None: known GPUs by name

    def __post_init__(self) -> None:
        _check_choice("method", self.method, tuple(ADAPTER_CONFIGS))
        _check_choice("torch_dtype", self.torch_dtype, DTYPES)
        _check_choice("threshold_mode", self.threshold_mode, THRESHOLD_MODES)
        _check_choice("lr_scheduler_type", self.lr_scheduler_type, LR_SCHEDULERS)
        _check_choice("mixed_precision", self.mixed_precision, MIXED_PRECISION)
        _check_choice("truncation", self.truncation, tuple(TRUNCATIONS))
        if self.chat_template is not None:
            chat_template_text(self.chat_template)
        for key in ("max_steps", "per_device_train_batch_size", "gradient_accumulation_steps", "log_every"):
            if getattr(self, key) < 1:
                raise ConfigError(key, f"must be >= 1, got {getattr(self, key)!r}")
        for key in ("save_every", "save_total_limit", "warmup_steps", "eval_every", "gate_l1", "weight_decay",
                    "max_grad_norm"):
            if getattr(self, key) < 0:
                raise ConfigError(key, f"must be >= 0, got {getattr(self, key)!r}")
        if self.deepspeed_config is not None and not Path(self.deepspeed_config).is_file():
            raise ConfigError("deepspeed_config", f"is {self.deepspeed_config!r}: no such file")
        if not self.output_dir:
            raise ConfigError("output_dir", "is empty; give the folder the run writes to (e.g. outputs/my_run)")
        if self.dist_timeout is not None and self.dist_timeout < 1:
            raise ConfigError("dist_timeout", f"must be >= 1 second (or null for the default), got {self.dist_timeout!r}")
        not_allowed = sorted(set(self.resume_allow_changes) - RESUME_OPT_IN)
        if not_allowed:
            raise ConfigError("resume_allow_changes", f"entries {not_allowed} cannot be allowed; allowed: "
                              f"{sorted(RESUME_OPT_IN)} (the other keys must keep their checkpoint values)")
        if self.max_length < 8:
            raise ConfigError("max_length", f"must be >= 8, got {self.max_length!r}")
        if not self.learning_rate > 0:
            raise ConfigError("learning_rate", f"must be > 0, got {self.learning_rate!r}")
        if self.model_name_or_path is None and not self.model_config:
            raise ConfigError("model_config", "must be a non-empty mapping when model_name_or_path is null")
        _check_trackers(self.report_to)
        _check_eval_keys(self)
        _check_export_formats(self.export_formats)
        if self.num_train_epochs is not None and not self.num_train_epochs > 0:
            raise ConfigError("num_train_epochs", f"must be > 0 (or null to use max_steps), got {self.num_train_epochs!r}")
        # A ramp left unset follows max_steps, also when max_steps is computed from num_train_epochs later.
        self._ramp_follows_max_steps = self.sparsity is not None and self.sparsity.lambda_ramp_steps is None
        self._derive_library_configs()
        if self.method == "adalora":
            for key, default in SORA_ONLY_KEYS.items():
                if getattr(self, key) != default:
                    raise _sora_only(key, self.method)
        self.bnb_config()
        check_kernel_keys(self)

    def _derive_library_configs(self) -> None:
        """Fill the library fields that recipe keys own (``total_step``, ``init_seed``, the ramp length), which also
        runs the library's validation, and re-raise its errors under the recipe's key names."""
        wanted = ADAPTER_CONFIGS[self.method]
        if type(self.adapter) is not wanted:
            raise ConfigError("method", f"is {self.method!r} but the adapter config is a {type(self.adapter).__name__}")
        try:
            self.adapter = dataclasses.replace(self.adapter, **_derived(self.method, self.max_steps, self.seed))
            if self.method == "adalora":
                if self.sparsity not in (None, LambdaSchedule()):
                    raise ConfigError("sparse_lambda", "and the other LambdaSchedule keys are SoRA settings; with "
                                      "method: adalora leave them out")
                self.sparsity = None
            elif self.sparsity is None:
                raise ConfigError("method", "sora needs a sparsity schedule (LambdaSchedule); got None")
            elif self.sparsity.lambda_ramp_steps is None:
                self.sparsity = dataclasses.replace(self.sparsity, lambda_ramp_steps=self.max_steps)
        except ConfigError as e:
            raise _recipe_error(e) from None

    def with_max_steps(self, max_steps: int) -> TrainConfig:
        """This config with another run length; the library fields derived from ``max_steps`` follow it."""
        sparsity = self.sparsity
        if sparsity is not None and self._ramp_follows_max_steps:
            sparsity = dataclasses.replace(sparsity, lambda_ramp_steps=None)
        return dataclasses.replace(self, max_steps=max_steps, sparsity=sparsity)

    def bnb_config(self):
        """``transformers.BitsAndBytesConfig`` from ``quantization`` (dtype names as strings), or None."""
        if not self.quantization:
            return None
        import inspect

        from transformers import BitsAndBytesConfig

        allowed = set(inspect.signature(BitsAndBytesConfig.__init__).parameters) - {"self", "kwargs"}
        unknown = sorted(set(self.quantization) - allowed)
        if unknown:
            raise ConfigError("quantization", f"keys {unknown} are not BitsAndBytesConfig arguments; allowed: {sorted(allowed)}")
        q = dict(self.quantization)
        if bool(q.get("load_in_4bit")) == bool(q.get("load_in_8bit")):
            raise ConfigError("quantization", f"must set exactly one of load_in_4bit / load_in_8bit to true, got {q}")
        for key in ("bnb_4bit_compute_dtype", "bnb_4bit_quant_storage"):
            if isinstance(q.get(key), str):
                if q[key] not in DTYPES and q[key] != "uint8":
                    raise ConfigError(f"quantization.{key}", f"={q[key]!r}; choose one of {list(DTYPES) + ['uint8']}")
                q[key] = getattr(torch, q[key])
        if q.get("bnb_4bit_quant_type", "nf4") not in ("nf4", "fp4"):
            raise ConfigError("quantization.bnb_4bit_quant_type", f"={q['bnb_4bit_quant_type']!r}; choose 'nf4' or 'fp4'")
        return BitsAndBytesConfig(**q)

    def to_dict(self) -> dict:
        """The flat form: every key as it is written in YAML (library fields the recipe derives left out)."""
        flat = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in ("adapter", "sparsity"):
                flat.update({k: v for k, v in dataclasses.asdict(value).items() if k not in DERIVED} if value else {})
            elif f.name in SORA_ONLY_KEYS and self.method != "sora":
                continue
            else:
                flat[f.name] = value
        return flat


# The optimizer's gate-step settings: SoRA only (an AdaLoRA run refuses them rather than ignoring them).
SORA_ONLY_KEYS = {"threshold_mode": "lr_scaled", "gate_l1": 0.0, "gate_learning_rate": None}
# Keys a resume may change when named in resume_allow_changes (see sora_ds/recipe/resume.py for the rest).
RESUME_OPT_IN = frozenset({"max_steps", "model_name_or_path", "tokenizer_name_or_path", "dataset"})


def _sora_only(key: str, method: str) -> ConfigError:
    return ConfigError(key, f"is a SoRA setting (the gate step); with method: {method} leave it out (AdaLoRA prunes "
                       "by its budget schedule: target_r, t_init, t_final, delta_t)")


def _check_choice(key: str, value, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(key, f"={value!r} is not allowed; choose one of {list(allowed)}")


def chat_template_text(value: str) -> str:
    """The ``chat_template`` key's template: the value itself when it holds Jinja tags, else the file it names."""
    if "{{" in value or "{%" in value:
        return value
    path = Path(value)
    if not path.is_file():
        raise ConfigError("chat_template", f"={value!r} is neither a Jinja template (no {{{{ or {{% in it) nor an "
                          "existing file; give the template itself or the path of a .jinja file")
    return path.read_text()


def _check_eval_keys(cfg: TrainConfig) -> None:
    """The evaluation keys, before anything is loaded (the eval file's records are checked with the training data)."""
    if cfg.eval_dataset is not None:
        path = Path(cfg.eval_dataset)
        if not path.exists() or (path.is_file() and path.suffix not in (".json", ".jsonl")):
            raise ConfigError("eval_dataset", f"={cfg.eval_dataset!r} is not an existing .json/.jsonl file or folder "
                              "(the eval set is a local file, in any format the dataset key accepts)")
        if cfg.eval_size:
            raise ConfigError("eval_size", f"={cfg.eval_size!r} with eval_dataset: the eval set is that file and every "
                              "record of dataset trains; leave eval_size out (or 0)")
    for key in ("eval_max_new_tokens", "eval_samples"):
        if getattr(cfg, key) < 0:
            raise ConfigError(key, f"must be >= 0, got {getattr(cfg, key)!r}")
    if cfg.eval_choices is not None:
        seen = [normalize(c) for c in cfg.eval_choices]
        if len(seen) < 2 or "" in seen or len(set(seen)) != len(seen):
            raise ConfigError("eval_choices", f"={cfg.eval_choices!r}: give at least 2 candidate answers, non-empty and "
                              "distinct after normalisation (case and spaces), e.g. [positive, negative]")
    if (cfg.eval_max_new_tokens or cfg.eval_choices) and cfg.eval_dataset is None and not cfg.eval_size:
        key = "eval_max_new_tokens" if cfg.eval_max_new_tokens else "eval_choices"
        raise ConfigError(key, "needs an eval set: set eval_dataset (a file) or eval_size (a split of dataset)")


def _check_export_formats(formats: list[str]) -> None:
    if not isinstance(formats, list) or not all(isinstance(f, str) for f in formats):
        raise ConfigError("export_formats", f"must be a list of format names, got {formats!r}; allowed: "
                          f"{list(ADAPTER_FORMATS)}")
    for fmt in formats:
        if fmt == "merged":
            raise ConfigError("export_formats", "='merged' is set by save_merged: true (one key per output); "
                              f"allowed here: {list(ADAPTER_FORMATS)}")
        _check_choice("export_formats", fmt, ADAPTER_FORMATS)
    if "peft" not in formats:
        raise ConfigError("export_formats", f"={formats!r} must include 'peft': adapter/ is the adapter that sora-ds "
                          "export, merge and report read; add the other formats beside it")
    if len(set(formats)) != len(formats):
        raise ConfigError("export_formats", f"={formats!r} names a format twice")


def _check_trackers(names: list[str]) -> None:
    """accelerate drops a tracker whose package is missing without a word; say so before training instead."""
    if not names:
        return
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers

    available = {str(t) for t in get_available_trackers()}
    for name in names:
        if name not in LOGGER_TYPE_TO_CLASS:
            raise ConfigError("report_to", f"entry {name!r} is not a tracker; choose from {sorted(LOGGER_TYPE_TO_CLASS)}")
        if name not in available:
            raise ConfigError("report_to", f"entry {name!r}: its package is not installed (pip install {name})")


OWN_KEYS = {f.name for f in dataclasses.fields(TrainConfig)} - {"adapter", "sparsity"}


def _field_names(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)} - set(DERIVED)


def key_owner(key: str, method: str) -> type:
    """The dataclass that defines recipe key ``key`` for ``method``; an error naming the key if none does."""
    if key in SORA_ONLY_KEYS and method != "sora":
        raise _sora_only(key, method)
    if key in OWN_KEYS:
        return TrainConfig
    if key in _field_names(ADAPTER_CONFIGS[method]):
        return ADAPTER_CONFIGS[method]
    if key in _field_names(LambdaSchedule):
        if method == "sora":
            return LambdaSchedule
        raise ConfigError(key, f"is a SoRA key (LambdaSchedule); with method: {method} leave it out (AdaLoRA's "
                          "budget is target_r, reached by its schedule t_init, t_final)")
    for other, cls in ADAPTER_CONFIGS.items():
        if key in _field_names(cls):
            raise ConfigError(key, f"belongs to {cls.__name__}; with method: {method} leave it out (or set method: {other})")
    if key in DERIVED:
        raise ConfigError(key, f"is set by the recipe from {DERIVED[key]}; set {DERIVED[key]} instead")
    known = OWN_KEYS | _field_names(ADAPTER_CONFIGS[method]) | (_field_names(LambdaSchedule) if method == "sora" else set())
    close = difflib.get_close_matches(key, known, n=3)
    hint = f"did you mean {close}?" if close else f"known keys: {sorted(known)}"
    raise ConfigError(key, f"is not a config key for method: {method}; {hint}")


def from_flat(values: dict, sources: dict | None = None) -> TrainConfig:
    """A :class:`TrainConfig` from flat keys (YAML form), each checked against the type of the field that defines it.
    ``sources`` names where each key came from, for the error messages."""
    sources = sources or {}
    values = _one_run_length(values, sources)
    method = values.get("method", "sora")
    _check_choice("method", method, tuple(ADAPTER_CONFIGS))
    parts: dict[type, dict] = {TrainConfig: {}, ADAPTER_CONFIGS[method]: {}, LambdaSchedule: {}}
    for key, value in values.items():
        try:
            owner = key_owner(key, method)
        except ConfigError as e:
            raise ConfigError(key, f"(from {sources.get(key, 'the config')}) {e.problem}") from None
        parts[owner][key] = _coerce(key, value, sources.get(key, "the config"), owner)
    own = parts[TrainConfig]
    if own.get("eval_dataset") is not None:
        own.setdefault("eval_size", 0)  # the eval set is the file; eval_size's default split is not drawn
    max_steps, seed = (own.get(k, TrainConfig.__dataclass_fields__[k].default) for k in ("max_steps", "seed"))
    lambdas = parts[LambdaSchedule]
    try:  # built with the derived fields: AdaLoRA's budget schedule is checked against max_steps, not a default
        adapter = ADAPTER_CONFIGS[method](**parts[ADAPTER_CONFIGS[method]], **_derived(method, max_steps, seed))
        sparsity = None if method == "adalora" else LambdaSchedule(**lambdas)  # an unset ramp: max_steps
    except ConfigError as e:
        raise _recipe_error(e) from None
    return TrainConfig(**own, adapter=adapter, sparsity=sparsity)


def _one_run_length(values: dict, sources: dict) -> dict:
    """``max_steps`` and ``num_train_epochs`` both give the run's length: from one place that is an error; from two,
    the command line wins over the YAML."""
    if "max_steps" not in values or values.get("num_train_epochs") is None:
        return values
    where = sources.get("num_train_epochs"), sources.get("max_steps")
    if where[0] == where[1]:
        raise ConfigError("num_train_epochs", f"and max_steps are both set (in {where[0] or 'the config'}); the run "
                          "length is one or the other")
    return {k: v for k, v in values.items() if k != ("max_steps" if where[0] == "command line" else "num_train_epochs")}


def steps_for_epochs(cfg: TrainConfig, train_examples: int, num_processes: int) -> int:
    """Optimizer steps of ``cfg.num_train_epochs`` passes over ``train_examples`` rows (each process takes whole
    batches of ``per_device_train_batch_size``; ``gradient_accumulation_steps`` of them per step)."""
    batches = train_examples // (cfg.per_device_train_batch_size * num_processes)
    if batches == 0:
        raise ConfigError("num_train_epochs", f"the training split has {train_examples} rows, fewer than one batch of "
                          f"per_device_train_batch_size={cfg.per_device_train_batch_size} on each of {num_processes} "
                          "processes; lower the batch size")
    return max(1, math.ceil(cfg.num_train_epochs * batches / cfg.gradient_accumulation_steps))


def _derived(method: str, max_steps: int, seed: int) -> dict:
    """The library fields the recipe sets from its own keys (``DERIVED``)."""
    return {"init_seed": seed, **({"total_step": max_steps} if method == "adalora" else {})}


def _recipe_error(e: ConfigError) -> ConfigError:
    """A library config error under the recipe's key: a derived field is reported as the recipe key that sets it."""
    if e.key in DERIVED:
        return ConfigError(DERIVED[e.key], f"(sets {e.owner}.{e.key}): {e.key} {e.problem}")
    return ConfigError(e.key, e.problem + (" (in a recipe, total_step is max_steps)" if "total_step" in e.problem else ""))


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


def _coerce(key: str, value, source: str, owner: type):
    hint = typing.get_type_hints(owner)[key]
    if isinstance(value, str) and not _type_ok(value, hint):
        value = _number(value, hint)
    if isinstance(value, bool) and not _type_ok(value, hint) and _type_ok("", hint):
        value = "yes" if value else "no"  # YAML 1.1 reads `mixed_precision: no` as False; the key wants the word
    if not _type_ok(value, hint):
        quote = ("; YAML reads unquoted yes/no/true/false/on/off as booleans: quote them, e.g. ['yes', 'no']"
                 if isinstance(value, list) and any(isinstance(v, bool) for v in value) else "")
        raise ConfigError(key, f"(from {source}) got {value!r} of type {type(value).__name__}; expected "
                          f"{_hint_name(hint)}{quote}")
    union = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else ()
    if hint is float or (float in union and int not in union):
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
            raise ConfigError("argument", f"{arg!r} is unexpected; use --config FILE.yaml and --key value overrides")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(argv):
                raise ConfigError(f"--{key}", "needs a value")
            value, i = argv[i + 1], i + 1
        i += 1
        key = key.replace("-", "_")
        if key == "local_rank":  # added by the `deepspeed` launcher; the rank is read from LOCAL_RANK instead
            continue
        if key == "config":
            config_path = value
        else:
            overrides[key] = _yaml_value(value)
    return config_path, overrides


def _yaml_value(text: str):
    """A command-line value read as YAML; text that is not YAML (a Jinja template, say) stays the string it is."""
    if text == "":
        return ""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def load_config(argv: list[str] | None = None, default_config: str | Path | None = None) -> TrainConfig:
    """The :class:`TrainConfig` of a recipe run: dataclass defaults < the YAML < ``--key value`` overrides.

    The YAML is ``--config`` if given, else ``default_config`` (an entry script's own, self-contained YAML).
    """
    import sys

    config_path, overrides = parse_overrides(sys.argv[1:] if argv is None else argv)
    config_path = config_path or (str(default_config) if default_config else None)
    values = {**_read_yaml(config_path), **overrides}
    sources = {key: "command line" if key in overrides else config_path for key in values}
    return from_flat(values, sources)


def _read_yaml(path: str | None) -> dict:
    if path is None:
        return {}
    p = Path(path)
    if not p.is_file():
        raise ConfigError("--config", f"{path!r}: no such file")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError("--config", f"{path!r} is not valid YAML{where}: {getattr(e, 'problem', None) or e}") from None
    if not isinstance(data, dict):
        raise ConfigError("--config", f"{path!r} must hold a mapping of config keys, got {type(data).__name__}")
    return data


def save_config(cfg: TrainConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
