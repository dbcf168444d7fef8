"""``sora-ds plan``: how much memory a recipe needs, per GPU and per node, before it is launched.

An estimate from the model's shape (its local ``config.json``, the table of known shapes below for hub names of
the shipped recipes, or ``model_config``), the dtype the base is held in (``torch_dtype`` after
:mod:`sora_ds.recipe.precision`), 4-bit quantization, the adapter (method, ``r``, ``target_modules``), batch,
``max_length``, activation checkpointing and the engine (one process / DDP, ZeRO-2, ZeRO-3, ZeRO-3 with offload):

* base: held bytes (a 4-bit linear weight ~0.52 byte per element with its quantization state), split N ways under
  ZeRO-3 and kept whole otherwise;
* adapter: trainable elements x 16 bytes (fp32 weight, gradient, two Adam moments; 18 under DeepSpeed
  mixed precision, which adds the 16-bit copy), split N ways under ZeRO-3 (ZeRO-2: all but the 16-bit copy);
* ZeRO-3 working set: the layers gathered whole while they run (the current one and one prefetched, or the
  embedding) - bounded, independent of the depth;
* activations: per layer and token ``2 (4h + 2 kv + 5 i) + 8h`` bytes (16-bit activations, fp32 norms), all layers
  without checkpointing, their inputs plus one layer with it; the logits ``b s V x 10`` bytes (16-bit logits, their fp32
  copy and gradient);
* fixed: 1.5 GB per GPU (CUDA context, allocator slack); per process on the host 3 GB on GPU machines (CUDA libraries),
  and the figure measured on CPU (``CPU_IMPORT``) for ``--cpu``.

Host per node: the processes' fixed memory, plus what loading holds: the checkpoint's pages (file-backed, shared by the
node's processes, evictable; under ZeRO-3 only rank 0 reads them) and, with parameter offload, the node's shares of the
base and of the optimizer.

``--cpu`` plans the CPU runs the bench measures (bench/scale_memory.py): per-process peak RSS, where a single process's
base is the mmap'd checkpoint and, under ZeRO-3, rank 0 also maps the whole checkpoint while it loads; tests compare it
with bench/results/scale_memory.json within ``CPU_TOLERANCE``. The GPU figures (CUDA context, allocator slack, host
memory of a CUDA process) are assumptions no GPU has checked yet.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from .config import TrainConfig, load_config
from .precision import HALF

GB = 1e9
ENGINES = ("none", "ddp", "zero2", "zero3", "zero3_offload")
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)  # packed weight + 8-bit absmax per 64 + its fp32 scale per 256 blocks
GPU_FIXED = 1.5 * GB  # CUDA context and allocator slack, per GPU
HOST_FIXED_GPU = 3.0 * GB  # one process's host memory on a GPU machine (python, torch, CUDA libraries)
CPU_IMPORT = 0.48 * GB  # measured: one process's RSS after importing torch, transformers, deepspeed (CPU wheels)
CPU_TOLERANCE = 0.15  # the --cpu plan against the measured peak RSS (bench/results/scale_memory.json): -2% to +6%


class PlanError(ValueError):
    """A model whose shape is unknown, or an impossible GPU count; one line, exit code 2."""


@dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool = False
    head_dim: int | None = None

    @property
    def hd(self) -> int:
        return self.head_dim or self.hidden // self.heads


# The base models of the shipped recipes (their config.json), keyed by the last part of the name in lower case, so
# that a hub id and a local folder of the same model both find it.
KNOWN = {
    "llama-3.1-8b-instruct": Shape(4096, 32, 14336, 32, 8, 128256),
    "llama-3.1-70b-instruct": Shape(8192, 80, 28672, 64, 8, 128256),
    "mistral-7b-instruct-v0.3": Shape(4096, 32, 14336, 32, 8, 32768),
    "qwen2.5-7b-instruct": Shape(3584, 28, 18944, 28, 4, 152064),
    "smollm2-135m-instruct": Shape(576, 30, 1536, 9, 3, 49152, tied=True),
}
BYTE_TOKENIZER_VOCAB = 263  # sora_ds.data.tokenizer: the vocabulary of a model_config base without a tokenizer


def shape_from(values: dict) -> Shape:
    return Shape(values["hidden_size"], values["num_hidden_layers"], values["intermediate_size"],
                 values["num_attention_heads"], values.get("num_key_value_heads") or values["num_attention_heads"],
                 values.get("vocab_size") or BYTE_TOKENIZER_VOCAB, bool(values.get("tie_word_embeddings", False)),
                 values.get("head_dim"))


def model_shape(cfg: TrainConfig) -> Shape:
    """The base's shape: ``model_config``, a local ``config.json``, else the table of known models."""
    if not cfg.model_name_or_path:
        values = {"vocab_size": None if cfg.tokenizer_name_or_path is None else cfg.model_config.get("vocab_size"),
                  **{k: v for k, v in cfg.model_config.items() if k != "vocab_size"}}
        return shape_from(values)
    local = Path(cfg.model_name_or_path) / "config.json"
    if local.is_file():
        return shape_from(json.loads(local.read_text()))
    key = cfg.model_name_or_path.rstrip("/").split("/")[-1].lower()
    if key in KNOWN:
        return KNOWN[key]
    raise PlanError(f"model_name_or_path {cfg.model_name_or_path!r}: no local config.json and not a known shape "
                     f"({sorted(KNOWN)}); download its config.json to a folder and name that folder")


def linear_shapes(s: Shape) -> dict[str, tuple[int, int]]:
    """(in, out) features of each linear type of one decoder layer."""
    q, kv = s.heads * s.hd, s.kv_heads * s.hd
    return {"q_proj": (s.hidden, q), "k_proj": (s.hidden, kv), "v_proj": (s.hidden, kv), "o_proj": (q, s.hidden),
            "gate_proj": (s.hidden, s.intermediate), "up_proj": (s.hidden, s.intermediate),
            "down_proj": (s.intermediate, s.hidden)}


def parameter_counts(s: Shape) -> dict[str, int]:
    layer_linear = sum(i * o for i, o in linear_shapes(s).values())
    embed = s.vocab * s.hidden
    return {"linear": s.layers * layer_linear, "embed": embed, "lm_head": 0 if s.tied else embed,
            "norms": (2 * s.layers + 1) * s.hidden, "layer": layer_linear + 2 * s.hidden}


def adapter_elements(s: Shape, cfg: TrainConfig) -> int:
    r = cfg.adapter.r
    shapes = linear_shapes(s)
    return s.layers * sum(r * (i + o) + r for name, (i, o) in shapes.items() if name in cfg.adapter.target_modules)


@dataclass
class Plan:
    gpu: dict[str, float]  # bytes per GPU (per process with --cpu), by part
    host: dict[str, float]  # bytes per node, by part
    params: int
    engine: str
    gpus: int
    gpus_per_node: int
    gpu_memory: float | None
    held: str

    @property
    def per_gpu(self) -> float:
        return sum(self.gpu.values())

    @property
    def per_node(self) -> float:
        return sum(self.host.values())


def plan(cfg: TrainConfig, gpus: int = 1, gpu_memory: float | None = None, engine: str | None = None,
         gpus_per_node: int | None = None, cpu: bool = False) -> Plan:
    """The memory plan of ``cfg`` on ``gpus`` devices (processes with ``cpu``) with ``engine``."""
    from .precision import consistent_precision, held_dtype

    engine = engine or ("zero3" if gpus > 1 else "none")
    if engine not in ENGINES:
        raise PlanError(f"engine {engine!r}: choose one of {list(ENGINES)}")
    per_node = gpus_per_node or min(gpus, 8)
    zero = {"zero2": 2, "zero3": 3, "zero3_offload": 3}.get(engine)
    ds = None if zero is None else {"zero_optimization": {"stage": zero}, "bf16": {"enabled": "auto"}}
    cfg, _ = consistent_precision(cfg, ds)  # what the run will hold, after the change a run makes (and says)
    held = held_dtype(cfg, ds)
    mixed = cfg.mixed_precision if ds is None else (HALF.get(held) or cfg.mixed_precision)
    s = model_shape(cfg)
    n = parameter_counts(s)
    params = n["linear"] + n["embed"] + n["lm_head"] + n["norms"]
    width = BYTES[held]
    linear_bytes = n["linear"] * (NF4_BYTES if cfg.quantization and cfg.quantization.get("load_in_4bit") else
                                  1 if cfg.quantization else width)
    base = linear_bytes + (n["embed"] + n["lm_head"] + n["norms"]) * width
    split = gpus if zero == 3 else 1
    trainable = adapter_elements(s, cfg)
    states = trainable * 16 / (gpus if zero else 1)  # fp32 weight, gradient, Adam moments: ZeRO-2/3 partition them
    copy16 = trainable * 2 / (gpus if zero == 3 else 1) if zero and mixed != "no" else 0
    tokens = cfg.per_device_train_batch_size * cfg.max_length
    act_bytes = 2 if mixed != "no" or held != "float32" else 4
    per_layer = act_bytes * (4 * s.hidden + 2 * s.kv_heads * s.hd + 5 * s.intermediate) + 8 * s.hidden
    layers_saved = s.layers * act_bytes * s.hidden + per_layer if cfg.gradient_checkpointing else s.layers * per_layer
    gpu = {
        "base": 0 if engine == "zero3_offload" else base / split,
        "adapter": 0 if engine == "zero3_offload" else states + copy16,
        "activations": tokens * layers_saved,
        "logits": tokens * s.vocab * (act_bytes + 8),
        "gathered": 2 * width * max(n["layer"], n["embed"]) if zero == 3 else 0,
        "fixed": CPU_IMPORT if cpu else GPU_FIXED,
    }
    # The checkpoint as saved (hub models ship 16-bit safetensors; a quantized base is quantized while loading).
    stored = params * (2 if cfg.model_name_or_path and held == "float32" or cfg.quantization else width)
    host = {"processes": per_node * (CPU_IMPORT if cpu else HOST_FIXED_GPU),
            "checkpoint pages": stored}  # mmap'd, shared by the node's processes, evictable (ZeRO-3: rank 0's node)
    if engine == "zero3_offload":
        host["offloaded shares"] = per_node * (base / split + states + copy16)
    if cpu:  # a process's RSS; under ZeRO-3 rank 0 maps the whole checkpoint while it loads (file-backed pages)
        if zero == 3:
            gpu["checkpoint pages"] = stored
        host = {"processes": per_node * sum(gpu.values())}
    return Plan(gpu=gpu, host=host, params=params, engine=engine, gpus=gpus, gpus_per_node=per_node,
                gpu_memory=gpu_memory, held=held)


def summary_line(p: Plan, cpu: bool = False) -> str:
    """The one line a recipe header shows."""
    unit = "process" if cpu else "GPU"
    fits = ""
    if p.gpu_memory:
        fits = f" (fits {p.gpu_memory:g} GB)" if p.per_gpu <= p.gpu_memory * GB else f" (does NOT fit {p.gpu_memory:g} GB)"
    return (f"~{p.per_gpu / GB:.1f} GB per {unit}{fits}, host ~{p.per_node / GB:.1f} GB per node "
            f"({_count(p.params)} params held in {p.held}, {p.engine}, {p.gpus} {unit}{'s' * (p.gpus > 1)})")


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def plan_text(p: Plan, cpu: bool = False) -> str:
    unit = "process" if cpu else "GPU"
    lines = [f"per {unit}:"] + [f"  {k:<16}{v / GB:8.2f} GB" for k, v in p.gpu.items()]
    lines += [f"  {'total':<16}{p.per_gpu / GB:8.2f} GB", f"host per node ({p.gpus_per_node} {unit}{'s' * (p.gpus_per_node > 1)}):"]
    lines += [f"  {k:<16}{v / GB:8.2f} GB" for k, v in p.host.items()] + [f"  {'total':<16}{p.per_node / GB:8.2f} GB"]
    if "checkpoint pages" in p.host:
        lines.append("  (checkpoint pages: the mmap'd safetensors, shared by a node's processes and evictable; under "
                     "ZeRO-3 only on rank 0's node)")
    return "\n".join(lines + [summary_line(p, cpu)])


def add_arguments(p) -> None:
    """The options of ``sora-ds plan`` (``--key value`` config overrides may follow them)."""
    p.add_argument("--config", required=True, help="the recipe YAML (--key value overrides may follow)")
    p.add_argument("--gpus", type=int, default=1, help="GPUs (processes with --cpu) in all (default: 1)")
    p.add_argument("--gpu-memory", type=float, default=None, metavar="GB", help="memory of one GPU, to say if it fits")
    p.add_argument("--engine", default=None, choices=ENGINES,
                   help="default: zero3 with more than one GPU, else none (one process; ddp is the same per GPU)")
    p.add_argument("--gpus-per-node", type=int, default=None, help="default: min(gpus, 8)")
    p.add_argument("--cpu", action="store_true", help="plan a CPU run (per-process RSS), as bench/scale_memory.py "
                   "measures it")


def from_args(args, overrides: list[str]) -> Plan:
    """The plan of ``sora-ds plan`` arguments (parsed by :func:`add_arguments`) and config overrides."""
    if args.gpus < 1 or (args.gpu_memory is not None and args.gpu_memory <= 0):
        raise PlanError(f"--gpus must be >= 1 and --gpu-memory > 0, got {args.gpus} and {args.gpu_memory}")
    cfg = load_config(["--config", args.config, *overrides])
    return plan(cfg, args.gpus, args.gpu_memory, args.engine, args.gpus_per_node, args.cpu)


def nodes(p: Plan) -> int:
    return math.ceil(p.gpus / p.gpus_per_node)
