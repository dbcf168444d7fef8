"""QLoRA memory and step time: a bf16 base vs a 4-bit (nf4, double quant) base, and SoRA-4bit vs PEFT-LoRA-4bit.

What it measures
    1. Memory of the base model, bf16 vs 4-bit, for the SAME weights:

       * base-weight bytes: the sum of ``numel * element_size`` over every parameter AND buffer; for a bitsandbytes
         ``Params4bit`` this is the packed storage plus every tensor of its ``quant_state`` (``absmax``, ``code``,
         ``offset`` and, with double quant, the nested ``state2.absmax`` / ``state2.code``), each tensor counted once.
         Reported for "linear layers" (every ``nn.Linear`` of the model except the output embedding ``lm_head``,
         i.e. the q/k/v/o/gate/up/down projections that QLoRA quantizes) and for the whole model (embeddings,
         ``lm_head`` and norms stay bf16 in QLoRA). Target: 4-bit / bf16 <= 0.35; the final line says which of the
         two ratios meets it. transformers' ``get_memory_footprint()`` is printed beside it as a cross-check.
       * peak memory while loading the model and running a few training steps with a SoRA adapter on it
         (``--mem-steps``, on ``--mem-batch-size x --mem-seq-len`` tokens). Each arm runs in a fresh subprocess,
         since a process's RSS high-water mark cannot be reset. On CUDA: ``torch.cuda.max_memory_allocated`` (peak
         counter reset after imports). On CPU: ``VmHWM - VmRSS`` from ``/proc/self/status``, i.e. the rise of the
         process's resident high-water mark above its resident size after imports (file pages of an mmap-loaded
         safetensors file count once touched). The output says which measure was used.
    2. Train-step time of SoRA on a 4-bit base vs PEFT LoRA on a 4-bit base (target: ratio SoRA/LoRA of the medians
       <= 1.05). A step is forward with labels, backward, ``optimizer.step()``, ``zero_grad(set_to_none=True)``.

       * SoRA arm: ``sora_ds.inject(model, SoRAConfig(r=8, lora_alpha=16, target_modules=..., init_seed=0,
         gate_init="ones"))`` and ``sora_ds.build_optimizer(model, learning_rate=1e-4, sparse_lambda=1e-6)``.
       * LoRA arm: ``peft.get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=..., lora_dropout=0.0))``
         and ``torch.optim.AdamW`` over its trainable parameters (lr 1e-4, weight decay 0 like SoRA's default).
       * Both: targets q,k,v,o,gate,up,down; each arm gets its own freshly loaded 4-bit base (the same saved
         weights loaded twice); same fixed random batch (``labels = input_ids``); B = 0 at start so the first losses
         agree (printed as a check). Warm-up steps, then ``--repeats`` x ``--steps`` timed steps per arm,
         interleaved step by step (A B A B ...; the arm that goes first alternates between repeats); medians over
         all timed steps, per-repeat ratios to show the noise. ``time.perf_counter``, CUDA synchronised around
         each step.

How
    A ``LlamaForCausalLM`` is built from a ``LlamaConfig`` under ``--seed`` (nothing downloaded), cast to bf16 and
    saved once to a temporary directory, then loaded with
    ``AutoModelForCausalLM.from_pretrained(dir, dtype=torch.bfloat16)`` (bf16 arm) and with
    ``from_pretrained(dir, quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
    bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=C, bnb_4bit_quant_storage=torch.bfloat16),
    device_map=M, dtype=torch.bfloat16)`` (4-bit arm), where C is fp32 on CPU / bf16 on CUDA and M is ``"cpu"`` /
    ``{"": index}``. The default memory model (hidden 1024, 8 layers, intermediate 2816, vocab 4096, ~111 M params,
    ~92 % of them in the linear layers) is chosen so that the linear layers dominate the whole-model figure. The
    memory steps default to 1 x 32 tokens because a training step on the bf16 base runs bf16 matmuls, which take
    ~10-15 s per step on a 2-core AVX2 CPU even at that size; on CUDA pass a realistic ``--mem-batch-size`` /
    ``--mem-seq-len``. CPU RSS also holds what is not weights (the checkpoint mmap, which the 4-bit model keeps
    alive because its bf16 embeddings/lm_head alias it; heap that glibc keeps after transient fp32 dequantizations),
    so the output breaks the end-of-run RSS into anonymous / anonymous after ``malloc_trim`` / file-backed.

    Timing uses a smaller model by default (``--timing-*``; ``--timing-same-model`` reuses the memory model) and
    loads the 4-bit base with ``dtype`` = ``--timing-dtype``: ``auto`` is fp32 on CPU and bf16 on CUDA. The CPU
    default deviates from ``dtype=torch.bfloat16`` on purpose: on a CPU without AVX-512-BF16/AMX a bf16 matmul is
    10-140x slower than fp32 (the bf16 ``lm_head`` input-gradient alone takes ~70 % of a step), a cost identical in
    both arms that would blow the runtime and dilute the ratio toward 1. The quantized layers are the same either
    way (nf4 codes in bf16 storage, fp32 compute on CPU); ``--timing-dtype bf16`` restores the literal setup.

    The script only prints (and writes ``--json``); it asserts nothing.

Commands
    CPU (default; ~1.5-2.5 minutes on 2 cores, longer when other jobs compete for them). On CPU the default
    ``--threads`` is half the cores (1 on a 2-core host): with 2 threads on 2 cores shared with other jobs, steps
    were up to 5x slower and much noisier than with 1::

        python bench/qlora_memory.py
        python bench/qlora_memory.py --threads 2 --json /tmp/qlora_memory_cpu.json

    CUDA GPU (bf16 compute; a 7B-like width for memory, the same for timing)::

        python bench/qlora_memory.py --device cuda --hidden-size 4096 --layers 8 --intermediate-size 11008 \\
            --heads 32 --vocab-size 32000 --mem-batch-size 4 --mem-seq-len 512 --timing-same-model \\
            --batch-size 4 --seq-len 512 --steps 30 --repeats 3 --json /tmp/qlora_memory_gpu.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from _common import cpu_pressure, device_name, percentile

warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*is deprecated", category=FutureWarning)
warnings.filterwarnings("ignore", category=DeprecationWarning)
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK, ALPHA, LEARNING_RATE, SPARSE_LAMBDA = 8, 16, 1e-4, 1e-6
TARGET_BYTES_RATIO = 0.35
TARGET_STEP_RATIO = 1.05
MIB = 1024**2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    g = p.add_argument_group("memory model (part 1)")
    g.add_argument("--hidden-size", type=int, default=1024)
    g.add_argument("--layers", type=int, default=8)
    g.add_argument("--intermediate-size", type=int, default=2816)
    g.add_argument("--heads", type=int, default=16)
    g.add_argument("--vocab-size", type=int, default=4096)
    g.add_argument("--mem-steps", type=int, default=2, help="training steps (SoRA adapter) inside the peak window")
    g.add_argument("--mem-batch-size", type=int, default=1)
    g.add_argument("--mem-seq-len", type=int, default=32)
    g = p.add_argument_group("timing model (part 2)")
    g.add_argument("--timing-hidden-size", type=int, default=512)
    g.add_argument("--timing-layers", type=int, default=4)
    g.add_argument("--timing-intermediate-size", type=int, default=1408)
    g.add_argument("--timing-heads", type=int, default=8)
    g.add_argument("--timing-vocab-size", type=int, default=4096)
    g.add_argument("--timing-same-model", action="store_true", help="time on the memory model instead")
    g.add_argument(
        "--timing-dtype",
        choices=("auto", "fp32", "bf16"),
        default="auto",
        help="dtype= of the 4-bit loads for timing (non-quantized modules); auto: fp32 on CPU, bf16 on CUDA",
    )
    g.add_argument("--batch-size", type=int, default=4)
    g.add_argument("--seq-len", type=int, default=64)
    g.add_argument("--steps", type=int, default=10, help="timed steps per arm per repeat")
    g.add_argument("--warmup", type=int, default=2, help="untimed steps per arm before the first repeat")
    g.add_argument("--repeats", type=int, default=3)
    g = p.add_argument_group("run")
    g.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch.set_num_threads; default on CPU: half the cores (1 on a 2-core host), on CUDA torch's default",
    )
    g.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the figures as JSON")
    g.add_argument("--worker", choices=("bf16", "4bit"), default=None, help=argparse.SUPPRESS)
    g.add_argument("--model-dir", type=Path, default=None, help=argparse.SUPPRESS)
    g.add_argument("--worker-out", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads is None and torch.device(args.device).type == "cpu":
        # Two compute threads on two cores shared with other jobs made steps 5x slower and far noisier than one.
        args.threads = max(1, (os.cpu_count() or 2) // 2)
    if args.steps < 1 or args.repeats < 1 or args.warmup < 0 or args.mem_steps < 0:
        p.error("--steps and --repeats must be >= 1, --warmup and --mem-steps >= 0")
    return args


# ----------------------------------------------------------------------------------------------------------------
# helpers






def proc_status_bytes(field: str) -> int | None:
    """``VmRSS`` / ``VmHWM`` of this process in bytes (Linux), or None."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def compute_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def device_map(device: torch.device):
    return {"": device.index if device.index is not None else 0} if device.type == "cuda" else "cpu"


def save_model(dirpath: Path, hidden: int, layers: int, inter: int, heads: int, vocab: int, max_pos: int,
               seed: int) -> int:
    """Build a Llama from LlamaConfig under ``seed``, cast to bf16, save it; returns its parameter count."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max(max_pos, 128),
        use_cache=False,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    n = sum(p.numel() for p in model.parameters())
    model.save_pretrained(dirpath)
    del model
    gc.collect()
    return n


def load_model(model_dir: Path, kind: str, device: torch.device, dtype: torch.dtype = torch.bfloat16):
    """``kind`` "bf16": plain bf16 load; "4bit": nf4 + double quant, bf16 quant storage (see the module docstring)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if kind == "bf16":
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
        return model.to(device).train()
    q = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype(device),
        bnb_4bit_quant_storage=torch.bfloat16,
    )
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, quantization_config=q, device_map=device_map(device), dtype=dtype
    )
    return model.train()


def _quant_state_tensors(qs) -> list[torch.Tensor]:
    """Every tensor of a bitsandbytes QuantState, nested state (double quant) included."""
    out = []
    for attr in ("absmax", "code", "offset"):
        t = getattr(qs, attr, None)
        if isinstance(t, torch.Tensor):
            out.append(t)
    nested = getattr(qs, "state2", None)
    if nested is not None:
        out += _quant_state_tensors(nested)
    return out


def weight_bytes(model: torch.nn.Module) -> dict:
    """Bytes of parameters + buffers (+ quant states), split into linear layers (lm_head excluded) and the rest."""
    out_emb = model.get_output_embeddings()
    seen: set = set()

    def add(t: torch.Tensor) -> int:
        key = (t.data_ptr(), t.numel(), t.dtype, t.device)
        if t.data_ptr() != 0 and key in seen:
            return 0
        seen.add(key)
        return t.numel() * t.element_size()

    figures = {"linear": 0, "linear_packed": 0, "linear_quant_state": 0, "linear_params": 0, "whole": 0,
               "whole_params": 0, "n_linear": 0, "n_quantized": 0}
    for _, module in model.named_modules():
        is_linear = isinstance(module, torch.nn.Linear) and module is not out_emb
        figures["n_linear"] += int(is_linear)
        tensors = list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
        for t in tensors:
            b = add(t)
            qs = getattr(t, "quant_state", None)
            qb = sum(add(x) for x in _quant_state_tensors(qs)) if qs is not None else 0
            n = int(qs.shape.numel()) if qs is not None else t.numel()  # logical (unpacked) parameter count
            figures["whole"] += b + qb
            if isinstance(t, torch.nn.Parameter):
                figures["whole_params"] += n
            if is_linear:
                figures["linear"] += b + qb
                figures["linear_packed"] += b
                figures["linear_quant_state"] += qb
                figures["n_quantized"] += int(qs is not None)
                if isinstance(t, torch.nn.Parameter):
                    figures["linear_params"] += n
    try:
        figures["hf_memory_footprint"] = int(model.get_memory_footprint())
    except Exception:  # noqa: BLE001 - a cross-check only
        figures["hf_memory_footprint"] = None
    return figures


def make_batch(vocab: int, batch: int, seq: int, seed: int, device: torch.device) -> dict:
    gen = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(0, vocab, (batch, seq), generator=gen).to(device)
    return {"input_ids": ids, "labels": ids}


def attach_sora(model):
    import sora_ds
    from sora_ds import SoRAConfig

    cfg = SoRAConfig(r=RANK, lora_alpha=ALPHA, target_modules=list(TARGETS), init_seed=0, gate_init="ones")
    n_adapted = len(sora_ds.inject(model, cfg))
    opt = sora_ds.build_optimizer(model, learning_rate=LEARNING_RATE, sparse_lambda=SPARSE_LAMBDA)
    adapter_dtype = next(m.lora_A.dtype for _, m in sora_ds.sora_modules(model))
    return model, opt, n_adapted, adapter_dtype


def attach_lora(model):
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    cfg = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=list(TARGETS), lora_dropout=0.0)
    model = get_peft_model(model, cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LEARNING_RATE, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    adapter_dtype = layers[0].lora_A["default"].weight.dtype
    return model, opt, len(layers), adapter_dtype


def train_step(model, opt, batch: dict, device: torch.device) -> tuple[float, torch.Tensor]:
    sync(device)
    t0 = time.perf_counter()
    loss = model(**batch).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    sync(device)
    return time.perf_counter() - t0, loss


def trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)




# ----------------------------------------------------------------------------------------------------------------
# part 1: one memory arm, in its own process


def run_worker(args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    import bitsandbytes  # noqa: F401 - imported in both arms so the post-import baseline is comparable
    import transformers  # noqa: F401

    import sora_ds  # noqa: F401

    batch = make_batch(args.vocab_size, args.mem_batch_size, args.mem_seq_len, args.seed, device)
    res: dict = {"arm": args.worker}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        res["cuda_baseline_bytes"] = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    res["rss_baseline_bytes"] = proc_status_bytes("VmRSS")
    res["anon_baseline_bytes"] = proc_status_bytes("RssAnon")
    res["file_baseline_bytes"] = proc_status_bytes("RssFile")

    t0 = time.perf_counter()
    model = load_model(args.model_dir, args.worker, device)
    sync(device)
    res["load_s"] = time.perf_counter() - t0
    res["rss_after_load_bytes"] = proc_status_bytes("VmRSS")
    res["hwm_after_load_bytes"] = proc_status_bytes("VmHWM")
    if device.type == "cuda":
        res["cuda_after_load_bytes"] = torch.cuda.memory_allocated(device)
        res["cuda_peak_load_bytes"] = torch.cuda.max_memory_allocated(device)
    res["bytes"] = weight_bytes(model)

    model, opt, n_adapted, adapter_dtype = attach_sora(model)
    res["adapted_modules"] = n_adapted
    res["adapter_dtype"] = str(adapter_dtype).replace("torch.", "")
    res["trainable_params"] = trainable(model)
    res["step_s"], res["losses"] = [], []
    for _ in range(args.mem_steps):
        dt, loss = train_step(model, opt, batch, device)
        res["step_s"].append(dt)
        res["losses"].append(float(loss.detach()))
    res["rss_end_bytes"] = proc_status_bytes("VmRSS")
    res["hwm_end_bytes"] = proc_status_bytes("VmHWM")
    res["anon_end_bytes"] = proc_status_bytes("RssAnon")
    res["file_end_bytes"] = proc_status_bytes("RssFile")
    res["checkpoint_mapped"] = _checkpoint_still_mapped(args.model_dir)
    try:  # what glibc keeps of freed transient buffers (e.g. per-layer fp32 dequantizations)
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
        res["anon_end_trimmed_bytes"] = proc_status_bytes("RssAnon")
    except (OSError, AttributeError):
        res["anon_end_trimmed_bytes"] = None
    if device.type == "cuda":
        res["cuda_peak_bytes"] = torch.cuda.max_memory_allocated(device)
    args.worker_out.write_text(json.dumps(res))


def _checkpoint_still_mapped(model_dir: Path) -> bool:
    """Whether the saved safetensors file is still memory-mapped by this process (its touched pages count in RSS)."""
    try:
        text = Path("/proc/self/maps").read_text()
    except OSError:
        return False
    return str(Path(model_dir).resolve()) in text


def run_memory_arm(args: argparse.Namespace, arm: str, model_dir: Path, workdir: Path) -> dict:
    out = workdir / f"mem_{arm}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", arm, "--model-dir", str(model_dir),
           "--worker-out", str(out), "--device", args.device, "--seed", str(args.seed),
           "--vocab-size", str(args.vocab_size), "--mem-steps", str(args.mem_steps),
           "--mem-batch-size", str(args.mem_batch_size), "--mem-seq-len", str(args.mem_seq_len)]
    if args.threads is not None:
        cmd += ["--threads", str(args.threads)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    if proc.returncode != 0 or not out.exists():
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise RuntimeError(f"memory worker for the {arm} arm failed (rc {proc.returncode})")
    res = json.loads(out.read_text())
    res["wall_s"] = time.perf_counter() - t0
    cuda = torch.device(args.device).type == "cuda"
    if cuda:
        res["peak_bytes"] = res["cuda_peak_bytes"] - res["cuda_baseline_bytes"]
        res["peak_load_bytes"] = res["cuda_peak_load_bytes"] - res["cuda_baseline_bytes"]
        res["resident_after_load_bytes"] = res["cuda_after_load_bytes"] - res["cuda_baseline_bytes"]
    elif res.get("hwm_end_bytes") is not None and res.get("rss_baseline_bytes") is not None:
        res["peak_bytes"] = res["hwm_end_bytes"] - res["rss_baseline_bytes"]
        res["peak_load_bytes"] = res["hwm_after_load_bytes"] - res["rss_baseline_bytes"]
        res["resident_after_load_bytes"] = res["rss_after_load_bytes"] - res["rss_baseline_bytes"]
    else:
        res["peak_bytes"] = res["peak_load_bytes"] = res["resident_after_load_bytes"] = None
    for key in ("anon_end", "file_end", "anon_end_trimmed"):
        base = res.get("file_baseline_bytes" if key == "file_end" else "anon_baseline_bytes")
        end = res.get(key + "_bytes")
        res[key + "_delta_bytes"] = None if end is None or base is None else end - base
    return res


# ----------------------------------------------------------------------------------------------------------------
# main


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.worker is not None:
        run_worker(args)
        return {}
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda given but torch.cuda.is_available() is False")
    if args.timing_same_model:
        t_sizes = (args.hidden_size, args.layers, args.intermediate_size, args.heads, args.vocab_size)
    else:
        t_sizes = (args.timing_hidden_size, args.timing_layers, args.timing_intermediate_size, args.timing_heads,
                   args.timing_vocab_size)
    timing_dtype_name = args.timing_dtype if args.timing_dtype != "auto" else (
        "bf16" if device.type == "cuda" else "fp32")
    timing_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[timing_dtype_name]

    import bitsandbytes
    import peft
    import transformers

    dev_name = device_name(device.type == "cuda")
    cdt = str(compute_dtype(device)).replace("torch.", "")
    print("QLoRA memory (bf16 vs 4-bit nf4 base) and step time (SoRA-4bit vs PEFT-LoRA-4bit)")
    print(f"  device   : {device} ({dev_name}), torch threads {torch.get_num_threads()}")
    print(
        f"  versions : torch {torch.__version__}, bitsandbytes {bitsandbytes.__version__}, "
        f"transformers {transformers.__version__}, peft {peft.__version__}, python {platform.python_version()}"
    )
    print(
        f"  4-bit    : nf4, double quant, quant_storage bf16, compute dtype {cdt}, "
        f"device_map {device_map(device)!r}"
    )
    pressure_start = cpu_pressure()
    t_all = time.perf_counter()
    result: dict = {
        "device": str(device), "device_name": dev_name, "torch_threads": torch.get_num_threads(),
        "versions": {"torch": torch.__version__, "bitsandbytes": bitsandbytes.__version__,
                     "transformers": transformers.__version__, "peft": peft.__version__},
        "python": platform.python_version(),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }

    with tempfile.TemporaryDirectory(prefix="qlora_memory.") as tmp:
        workdir = Path(tmp)
        # ---------------------------------------------------------------- part 1: memory
        mem_dir = workdir / "mem_model"
        t0 = time.perf_counter()
        n_params = save_model(mem_dir, args.hidden_size, args.layers, args.intermediate_size, args.heads,
                              args.vocab_size, args.mem_seq_len, args.seed)
        save_s = time.perf_counter() - t0
        print(
            f"  memory   : Llama hidden {args.hidden_size}, layers {args.layers}, intermediate "
            f"{args.intermediate_size}, heads {args.heads}, vocab {args.vocab_size}; {n_params / 1e6:.1f} M params "
            f"(built + saved in {save_s:.1f} s); each arm in a fresh subprocess: load, SoRA r{RANK} on "
            f"{len(TARGETS)} targets, {args.mem_steps} step(s) at {args.mem_batch_size} x {args.mem_seq_len} tokens"
        )
        mem = {arm: run_memory_arm(args, arm, mem_dir, workdir) for arm in ("bf16", "4bit")}
        b16, b4 = mem["bf16"]["bytes"], mem["4bit"]["bytes"]
        ratio_linear = b4["linear"] / b16["linear"]
        ratio_whole = b4["whole"] / b16["whole"]
        peak_measure = (
            "torch.cuda.max_memory_allocated minus allocated after imports"
            if device.type == "cuda"
            else "process RSS: VmHWM minus VmRSS after imports (/proc/self/status), fresh subprocess per arm"
        )

        print()
        print(f"  {'part 1: memory':<44}{'bf16 base':>14}{'4-bit base':>14}{'4bit/bf16':>11}")

        def row(label: str, a, b, fmt="{:,.1f}", ratio=True) -> None:
            if a is None or b is None:
                print(f"  {label:<44}{'n/a':>14}{'n/a':>14}")
                return
            r = f"{b / a:>11.3f}" if ratio and a else ""
            print(f"  {label:<44}{fmt.format(a):>14}{fmt.format(b):>14}{r}")

        def mib(x):
            return None if x is None else x / MIB

        row("linear layers: params (M, logical)", b16["linear_params"] / 1e6, b4["linear_params"] / 1e6, "{:.2f}",
            ratio=False)
        q16 = "{} / {}".format(b16["n_quantized"], b16["n_linear"])
        q4 = "{} / {}".format(b4["n_quantized"], b4["n_linear"])
        print(f"  {'linear layers: quantized / total':<44}{q16:>14}{q4:>14}")
        row("linear layers: weight bytes (MiB)", mib(b16["linear"]), mib(b4["linear"]))
        row("  of which packed storage (MiB)", mib(b16["linear_packed"]), mib(b4["linear_packed"]), ratio=False)
        row("  of which quant state (MiB)", mib(b16["linear_quant_state"]), mib(b4["linear_quant_state"]),
            "{:,.2f}", ratio=False)
        row("whole model: params + buffers (MiB)", mib(b16["whole"]), mib(b4["whole"]))
        row("  rest (embeddings, lm_head, norms) (MiB)", mib(b16["whole"] - b16["linear"]),
            mib(b4["whole"] - b4["linear"]))
        row("transformers get_memory_footprint (MiB)", mib(b16["hf_memory_footprint"]),
            mib(b4["hf_memory_footprint"]))
        row("bits per linear weight", 8 * b16["linear"] / b16["linear_params"],
            8 * b4["linear"] / b4["linear_params"], "{:.3f}")
        row("load time (s)", mem["bf16"]["load_s"], mem["4bit"]["load_s"], "{:.1f}", ratio=False)
        row("resident after load, above baseline (MiB)", mib(mem["bf16"]["resident_after_load_bytes"]),
            mib(mem["4bit"]["resident_after_load_bytes"]))
        row("peak during load, above baseline (MiB)", mib(mem["bf16"]["peak_load_bytes"]),
            mib(mem["4bit"]["peak_load_bytes"]))
        row(f"peak load + {args.mem_steps} SoRA step(s) (MiB)", mib(mem["bf16"]["peak_bytes"]),
            mib(mem["4bit"]["peak_bytes"]))
        if device.type != "cuda":
            row("  RSS at end: anonymous (MiB)", mib(mem["bf16"]["anon_end_delta_bytes"]),
                mib(mem["4bit"]["anon_end_delta_bytes"]))
            row("  RSS at end: anonymous after malloc_trim (MiB)", mib(mem["bf16"]["anon_end_trimmed_delta_bytes"]),
                mib(mem["4bit"]["anon_end_trimmed_delta_bytes"]))
            row("  RSS at end: file-backed (MiB)", mib(mem["bf16"]["file_end_delta_bytes"]),
                mib(mem["4bit"]["file_end_delta_bytes"]))
            print(f"  {'  checkpoint file still mmapped at end':<44}{str(mem['bf16']['checkpoint_mapped']):>14}"
                  f"{str(mem['4bit']['checkpoint_mapped']):>14}")
        row("SoRA trainable params", mem["bf16"]["trainable_params"], mem["4bit"]["trainable_params"], "{:,.0f}",
            ratio=False)
        print(f"  {'SoRA adapter dtype':<44}{mem['bf16']['adapter_dtype']:>14}{mem['4bit']['adapter_dtype']:>14}")
        steps16 = statistics.median(mem["bf16"]["step_s"]) if mem["bf16"]["step_s"] else None
        steps4 = statistics.median(mem["4bit"]["step_s"]) if mem["4bit"]["step_s"] else None
        row("median step (s, untuned, for information)", steps16, steps4, "{:.2f}", ratio=False)
        if mem["bf16"]["losses"] and mem["4bit"]["losses"]:
            row("first loss (close: same weights, 4-bit error)", mem["bf16"]["losses"][0], mem["4bit"]["losses"][0],
                "{:.4f}", ratio=False)
        print(f"  peak memory measure: {peak_measure}")
        if device.type != "cuda":
            print(
                "  CPU RSS caveats: the bf16 arm's weights are zero-copy views of the mmapped safetensors file "
                "(file-backed\n  pages, resident once touched); the 4-bit arm keeps that mapping alive too (its bf16 "
                "embeddings/lm_head\n  alias it), so the pages read while quantizing stay counted; glibc keeps freed "
                "transient buffers\n  (the fp32 dequantization of each 4-bit layer in forward and backward). The "
                "weight-bytes rows are the\n  like-for-like figure; on CUDA the peak is max_memory_allocated."
            )
        result["memory"] = {"model_params": n_params, "bf16": mem["bf16"], "4bit": mem["4bit"],
                            "ratio_linear_bytes": ratio_linear, "ratio_whole_bytes": ratio_whole,
                            "peak_measure": peak_measure}
        if mem["bf16"]["peak_bytes"] and mem["4bit"]["peak_bytes"] is not None:
            result["memory"]["ratio_peak"] = mem["4bit"]["peak_bytes"] / mem["bf16"]["peak_bytes"]

        # ---------------------------------------------------------------- part 2: step time
        if args.timing_same_model:
            t_dir, n_t_params = mem_dir, n_params
        else:
            t_dir = workdir / "timing_model"
            n_t_params = save_model(t_dir, *t_sizes, args.seq_len, args.seed)
        hidden, layers, inter, heads, vocab = t_sizes
        print()
        print(
            f"  timing   : Llama hidden {hidden}, layers {layers}, intermediate {inter}, heads {heads}, vocab {vocab}; "
            f"{n_t_params / 1e6:.1f} M params{' (the memory model)' if args.timing_same_model else ''}; "
            f"4-bit load with dtype={timing_dtype_name} (non-quantized modules), compute {cdt}"
        )
        print(
            f"             batch {args.batch_size} x {args.seq_len}, {args.warmup} warm-up + {args.repeats} x "
            f"{args.steps} timed steps per arm, interleaved step by step; r {RANK}, alpha {ALPHA}, lr "
            f"{LEARNING_RATE:g}, SoRA sparse_lambda {SPARSE_LAMBDA:g}"
        )
        t0 = time.perf_counter()
        lora = attach_lora(load_model(t_dir, "4bit", device, timing_dtype))
        sora = attach_sora(load_model(t_dir, "4bit", device, timing_dtype))
        setup_s = time.perf_counter() - t0
        arms = {"sora": sora, "lora": lora}
        batch = make_batch(vocab, args.batch_size, args.seq_len, args.seed, device)
        first_loss: dict[str, float] = {}
        for i in range(max(args.warmup, 1)):
            for name, (model, opt, _, _) in arms.items():
                _, loss = train_step(model, opt, batch, device)
                if i == 0:
                    first_loss[name] = float(loss.detach())
        times: dict[str, list[list[float]]] = {"sora": [], "lora": []}
        t_bench = time.perf_counter()
        for rep in range(args.repeats):
            order = ("sora", "lora") if rep % 2 == 0 else ("lora", "sora")
            for name in order:
                times[name].append([])
            for _ in range(args.steps):
                for name in order:
                    model, opt, _, _ = arms[name]
                    dt, _ = train_step(model, opt, batch, device)
                    times[name][-1].append(dt)
        bench_s = time.perf_counter() - t_bench
        pressure_end = cpu_pressure()

        def stats(name: str) -> dict:
            flat = [t for rep in times[name] for t in rep]
            return {"median_ms": statistics.median(flat) * 1e3, "p10_ms": percentile(flat, 10) * 1e3,
                    "p90_ms": percentile(flat, 90) * 1e3, "min_ms": min(flat) * 1e3,
                    "per_repeat_median_ms": [statistics.median(r) * 1e3 for r in times[name]],
                    "n_steps": len(flat)}

        s, l_ = stats("sora"), stats("lora")
        step_ratio = s["median_ms"] / l_["median_ms"]
        rep_ratios = [a / b for a, b in zip(s["per_repeat_median_ms"], l_["per_repeat_median_ms"])]
        print()
        print(f"  {'part 2: step time':<20}{'median ms':>11}{'p10 ms':>10}{'p90 ms':>10}{'min ms':>10}"
              f"{'per-repeat medians (ms)':>30}")
        for label, st in (("SoRA-4bit", s), ("LoRA-4bit", l_)):
            reps = " ".join(f"{x:.1f}" for x in st["per_repeat_median_ms"])
            print(f"  {label:<20}{st['median_ms']:>11.1f}{st['p10_ms']:>10.1f}{st['p90_ms']:>10.1f}"
                  f"{st['min_ms']:>10.1f}{reps:>30}")
        print(f"  per-repeat ratio sora/lora: {' '.join(f'{r:.3f}' for r in rep_ratios)}; ratio of p10s "
              f"{s['p10_ms'] / l_['p10_ms']:.3f}, of minima {s['min_ms'] / l_['min_ms']:.3f}")
        print(f"  {'':<34}{'SoRA-4bit':>14}{'LoRA-4bit':>14}")
        print(f"  {'adapted modules':<34}{sora[2]:>14}{lora[2]:>14}")
        print(f"  {'trainable params':<34}{trainable(sora[0]):>14,}{trainable(lora[0]):>14,}")
        print(f"  {'adapter dtype':<34}{str(sora[3]).replace('torch.', ''):>14}"
              f"{str(lora[3]).replace('torch.', ''):>14}")
        print(f"  {'first loss (must agree)':<34}{first_loss['sora']:>14.6f}{first_loss['lora']:>14.6f}")
        if sora[3] != lora[3]:
            print("  NOTE: adapter dtypes differ: SoRA makes its adapter (and AdamW state) in the layer's compute "
                  f"dtype ({sora[3]}), PEFT upcasts its adapter to fp32 (autocast_adapter_dtype=True);\n  the arms "
                  "do not do the same arithmetic.")
        print(f"  setup (2 x 4-bit load + adapters) {setup_s:.1f} s, timed section {bench_s:.1f} s")
        noisy = max(rep_ratios) - min(rep_ratios) > 0.05 or s["p90_ms"] > 1.5 * s["p10_ms"]
        if pressure_end:
            print(f"  host CPU pressure (PSI some %, load): start "
                  f"{', '.join(f'{k} {v:g}' for k, v in (pressure_start or {}).items())}; end of timing "
                  f"{', '.join(f'{k} {v:g}' for k, v in pressure_end.items())}")
        if noisy:
            print("  NOTE: timings are noisy (per-repeat ratios spread > 0.05 or p90 > 1.5 x p10): other work is "
                  "probably competing for the CPU/GPU; rerun on a quiet machine or with more --repeats.")
        result["timing"] = {
            "model_params": n_t_params, "sizes": dict(zip(("hidden", "layers", "intermediate", "heads", "vocab"),
                                                          t_sizes)),
            "load_dtype": timing_dtype_name, "compute_dtype": cdt, "sora": s, "lora": l_,
            "trainable_params": {"sora": trainable(sora[0]), "lora": trainable(lora[0])},
            "adapter_dtype": {"sora": str(sora[3]), "lora": str(lora[3])}, "first_loss": first_loss,
            "ratio_median": step_ratio, "ratio_per_repeat": rep_ratios, "noisy": noisy,
            "setup_s": setup_s, "timed_section_s": bench_s, "cpu_pressure_end": pressure_end,
        }
        del arms, sora, lora
        gc.collect()

    total_s = time.perf_counter() - t_all
    meets_linear = ratio_linear <= TARGET_BYTES_RATIO
    meets_whole = ratio_whole <= TARGET_BYTES_RATIO
    which = ("both" if meets_linear and meets_whole else "linear layers only" if meets_linear
             else "whole model only" if meets_whole else "neither")
    result["memory"]["meets_target"] = {"linear": meets_linear, "whole": meets_whole}
    result["timing"]["meets_target"] = step_ratio <= TARGET_STEP_RATIO
    result["total_s"] = total_s
    print()
    print(f"device: {dev_name} ({device}); torch {torch.__version__}, bitsandbytes {bitsandbytes.__version__}; "
          f"total {total_s:.0f} s")
    measure = ("CUDA max_memory_allocated" if device.type == "cuda"
               else "CPU process RSS high-water (VmHWM), not a weight measure: see caveats")
    peak_txt = f"{result['memory']['ratio_peak']:.2f}" if "ratio_peak" in result["memory"] else "n/a"
    print(f"4-bit/bf16 peak memory (load + {args.mem_steps} SoRA steps): {peak_txt} [{measure}]")
    print(f"4-bit/bf16 base bytes (linear layers): {ratio_linear:.2f} (target <= {TARGET_BYTES_RATIO}) "
          f"[{'MEETS' if meets_linear else 'MISSES'}]")
    print(f"4-bit/bf16 base bytes (whole model): {ratio_whole:.2f} (target <= {TARGET_BYTES_RATIO}) "
          f"[{'MEETS' if meets_whole else 'MISSES'}]")
    print(f"bytes target met by: {which}")
    print(f"step ratio sora-4bit/lora-4bit: {step_ratio:.2f} (target <= {TARGET_STEP_RATIO})"
          f"{'  [noisy: see NOTE above]' if noisy else ''}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
