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

import harness as h
import torch

warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*is deprecated", category=FutureWarning)
warnings.filterwarnings("ignore", category=DeprecationWarning)
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK, ALPHA, SPARSE_LAMBDA = 8, 16, 1e-6
TARGET_BYTES_RATIO = 0.35
TARGET_STEP_RATIO = 1.05
MIB = 1024**2
SIZES = ("hidden", "layers", "intermediate", "heads", "vocab")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    h.model_args(p, "memory model (part 1)", hidden_size=1024, layers=8, intermediate_size=2816, heads=16,
                 vocab_size=4096, mem_steps=(2, "training steps (SoRA adapter) inside the peak window"),
                 mem_batch_size=1, mem_seq_len=32)
    h.model_args(p, "timing model (part 2)", prefix="timing-", hidden_size=512, layers=4, intermediate_size=1408,
                 heads=8, vocab_size=4096)
    g = p.add_argument_group("timing")
    g.add_argument("--timing-same-model", action="store_true", help="time on the memory model instead")
    g.add_argument("--timing-dtype", choices=("auto", "fp32", "bf16"), default="auto",
                   help="dtype= of the 4-bit loads for timing (non-quantized modules); auto: fp32 on CPU, bf16 on CUDA")
    g.add_argument("--batch-size", type=int, default=4)
    g.add_argument("--seq-len", type=int, default=64)
    h.timing_args(g, steps=10, warmup=2)
    g = p.add_argument_group("run")
    h.run_args(g, "device", "seed", "threads", "json", threads="torch.set_num_threads; default on CPU: half the "
               "cores (1 on a 2-core host), on CUDA torch's default")
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


def compute_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def device_map(device: torch.device):
    return {"": device.index if device.index is not None else 0} if device.type == "cuda" else "cpu"


def save_model(dirpath: Path, sizes: tuple, max_pos: int, seed: int) -> int:
    """Build a Llama (``SIZES``) from LlamaConfig under ``seed``, cast to bf16, save it; returns its parameter count."""
    model = h.build_llama(*sizes, max_pos, seed).to(torch.bfloat16)
    n = sum(p.numel() for p in model.parameters())
    model.save_pretrained(dirpath)
    del model
    gc.collect()
    return n


def load_model(model_dir: Path, kind: str, device: torch.device, dtype: torch.dtype = torch.bfloat16):
    """``kind`` "bf16": plain bf16 load; "4bit": nf4 + double quant, bf16 quant storage (see the module docstring)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if kind == "bf16":
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).to(device).train()
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=compute_dtype(device), bnb_4bit_quant_storage=torch.bfloat16)
    return AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=q, device_map=device_map(device),
                                                dtype=dtype).train()


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


def attach_sora(model) -> h.Arm:
    arm = h.Arm("SoRA-4bit", *h.sora_arm(model, RANK, TARGETS, 0, SPARSE_LAMBDA, gate_init="ones"))
    arm.adapter_dtype = next(m.lora_A.dtype for _, m in h.adapter_layers(arm.model))
    return arm


def attach_lora(model) -> h.Arm:
    arm = h.Arm("LoRA-4bit", *h.lora_arm(model, RANK, TARGETS, lora_alpha=ALPHA))
    arm.adapter_dtype = h.peft_lora_layers(arm.model)[0].lora_A["default"].weight.dtype
    return arm


# ----------------------------------------------------------------------------------------------------------------
# part 1: one memory arm, in its own process


def run_worker(args: argparse.Namespace) -> None:
    device = h.torch_device(args.device, args.threads)
    import bitsandbytes  # noqa: F401 - imported in both arms so the post-import baseline is comparable
    import transformers  # noqa: F401

    import sora_ds  # noqa: F401

    cuda, sync = device.type == "cuda", h.device_sync(device)
    batch = h.random_batch(args.vocab_size, args.mem_batch_size, args.mem_seq_len, args.seed + 1, device)
    res: dict = {"arm": args.worker}
    if cuda:
        sync()
        res["cuda_baseline_bytes"] = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    for key, field in (("rss_baseline", "VmRSS"), ("anon_baseline", "RssAnon"), ("file_baseline", "RssFile")):
        res[f"{key}_bytes"] = proc_status_bytes(field)
    t0 = time.perf_counter()
    model = load_model(args.model_dir, args.worker, device)
    sync()
    res["load_s"] = time.perf_counter() - t0
    res["rss_after_load_bytes"], res["hwm_after_load_bytes"] = proc_status_bytes("VmRSS"), proc_status_bytes("VmHWM")
    if cuda:
        res["cuda_after_load_bytes"] = torch.cuda.memory_allocated(device)
        res["cuda_peak_load_bytes"] = torch.cuda.max_memory_allocated(device)
    res["bytes"] = weight_bytes(model)
    arm = attach_sora(model)
    res.update(adapted_modules=arm.n_modules, adapter_dtype=str(arm.adapter_dtype).replace("torch.", ""),
               trainable_params=h.trainable(arm.model), step_s=[], losses=[])
    for _ in range(args.mem_steps):
        res["step_s"].append(h.train_step(arm, batch, sync))
        res["losses"].append(arm.loss)
    for key, field in (("rss_end", "VmRSS"), ("hwm_end", "VmHWM"), ("anon_end", "RssAnon"), ("file_end", "RssFile")):
        res[f"{key}_bytes"] = proc_status_bytes(field)
    res["checkpoint_mapped"] = _checkpoint_still_mapped(args.model_dir)
    try:  # what glibc keeps of freed transient buffers (e.g. per-layer fp32 dequantizations)
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
        res["anon_end_trimmed_bytes"] = proc_status_bytes("RssAnon")
    except (OSError, AttributeError):
        res["anon_end_trimmed_bytes"] = None
    if cuda:
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
    if torch.device(args.device).type == "cuda":
        base, keys = res["cuda_baseline_bytes"], ("cuda_peak", "cuda_peak_load", "cuda_after_load")
    else:
        base, keys = res.get("rss_baseline_bytes"), ("hwm_end", "hwm_after_load", "rss_after_load")
    for key, src in zip(("peak", "peak_load", "resident_after_load"), keys):
        res[f"{key}_bytes"] = None if base is None or res.get(f"{src}_bytes") is None else res[f"{src}_bytes"] - base
    for key in ("anon_end", "file_end", "anon_end_trimmed"):
        base = res.get("file_baseline_bytes" if key == "file_end" else "anon_baseline_bytes")
        end = res.get(key + "_bytes")
        res[key + "_delta_bytes"] = None if end is None or base is None else end - base
    return res


# ----------------------------------------------------------------------------------------------------------------
# main


def memory_part(args, device, workdir: Path) -> dict:
    """Part 1: save the memory model, run each arm in a fresh subprocess, print the memory table."""
    cuda = device.type == "cuda"
    t0 = time.perf_counter()
    sizes = (args.hidden_size, args.layers, args.intermediate_size, args.heads, args.vocab_size)
    n_params = save_model(workdir / "mem_model", sizes, args.mem_seq_len, args.seed)
    print(f"  memory   : Llama hidden {args.hidden_size}, layers {args.layers}, intermediate {args.intermediate_size}, "
          f"heads {args.heads}, vocab {args.vocab_size}; {n_params / 1e6:.1f} M params (built + saved in "
          f"{time.perf_counter() - t0:.1f} s); each arm in a fresh subprocess: load, SoRA r{RANK} on {len(TARGETS)} "
          f"targets, {args.mem_steps} step(s) at {args.mem_batch_size} x {args.mem_seq_len} tokens")
    mem = {arm: run_memory_arm(args, arm, workdir / "mem_model", workdir) for arm in ("bf16", "4bit")}
    m16, m4 = mem["bf16"], mem["4bit"]
    b16, b4 = m16["bytes"], m4["bytes"]
    peak_measure = ("torch.cuda.max_memory_allocated minus allocated after imports" if cuda else
                    "process RSS: VmHWM minus VmRSS after imports (/proc/self/status), fresh subprocess per arm")
    print_memory(args, m16, m4, cuda)
    print(f"  peak memory measure: {peak_measure}")
    if not cuda:
        print("  CPU RSS caveats: the bf16 arm's weights are zero-copy views of the mmapped safetensors file "
              "(file-backed\n  pages, resident once touched); the 4-bit arm keeps that mapping alive too (its bf16 "
              "embeddings/lm_head\n  alias it), so the pages read while quantizing stay counted; glibc keeps freed "
              "transient buffers\n  (the fp32 dequantization of each 4-bit layer in forward and backward). The "
              "weight-bytes rows are the\n  like-for-like figure; on CUDA the peak is max_memory_allocated.")
    out = {"model_params": n_params, "bf16": m16, "4bit": m4, "ratio_linear_bytes": b4["linear"] / b16["linear"],
           "ratio_whole_bytes": b4["whole"] / b16["whole"], "peak_measure": peak_measure}
    if m16["peak_bytes"] and m4["peak_bytes"] is not None:
        out["ratio_peak"] = m4["peak_bytes"] / m16["peak_bytes"]
    return out


def print_memory(args, m16: dict, m4: dict, cuda: bool) -> None:
    """The part-1 table, bf16 vs 4-bit: weight bytes, load time, resident / peak memory, the SoRA steps."""
    b16, b4 = m16["bytes"], m4["bytes"]
    print()
    h.row("part 1: memory", "bf16 base", "4-bit base", "4bit/bf16", width=44, cell=(14, 14, 11))

    def line(label: str, key: str, fmt="{:,.1f}", ratio=True, scale=MIB, get=lambda m, k: m.get(k)) -> None:
        a, b = (None if get(m, key) is None else get(m, key) / scale for m in (m16, m4))
        if a is None or b is None:
            return h.row(label, "n/a", "n/a", width=44)
        h.row(label, fmt.format(a), fmt.format(b), f"{b / a:.3f}" if ratio and a else "", width=44, cell=(14, 14, 11))

    def byte(m, k):
        return m["bytes"][k]

    line("linear layers: params (M, logical)", "linear_params", "{:.2f}", False, 1e6, byte)
    h.row("linear layers: quantized / total", *(f"{b['n_quantized']} / {b['n_linear']}" for b in (b16, b4)), width=44)
    line("linear layers: weight bytes (MiB)", "linear", get=byte)
    line("  of which packed storage (MiB)", "linear_packed", ratio=False, get=byte)
    line("  of which quant state (MiB)", "linear_quant_state", "{:,.2f}", False, get=byte)
    line("whole model: params + buffers (MiB)", "whole", get=byte)
    line("  rest (embeddings, lm_head, norms) (MiB)", "", get=lambda m, k: m["bytes"]["whole"] - m["bytes"]["linear"])
    line("transformers get_memory_footprint (MiB)", "hf_memory_footprint", get=byte)
    line("bits per linear weight", "", "{:.3f}", scale=1,
         get=lambda m, k: 8 * m["bytes"]["linear"] / m["bytes"]["linear_params"])
    line("load time (s)", "load_s", "{:.1f}", False, 1)
    line("resident after load, above baseline (MiB)", "resident_after_load_bytes")
    line("peak during load, above baseline (MiB)", "peak_load_bytes")
    line(f"peak load + {args.mem_steps} SoRA step(s) (MiB)", "peak_bytes")
    if not cuda:
        line("  RSS at end: anonymous (MiB)", "anon_end_delta_bytes")
        line("  RSS at end: anonymous after malloc_trim (MiB)", "anon_end_trimmed_delta_bytes")
        line("  RSS at end: file-backed (MiB)", "file_end_delta_bytes")
        h.row("  checkpoint file still mmapped at end", *(str(m["checkpoint_mapped"]) for m in (m16, m4)), width=44)
    line("SoRA trainable params", "trainable_params", "{:,.0f}", False, 1)
    h.row("SoRA adapter dtype", m16["adapter_dtype"], m4["adapter_dtype"], width=44)
    line("median step (s, untuned, for information)", "step_s", "{:.2f}", False, 1,
         lambda m, k: statistics.median(m[k]) if m[k] else None)
    if m16["losses"] and m4["losses"]:
        line("first loss (close: same weights, 4-bit error)", "losses", "{:.4f}", False, 1, lambda m, k: m[k][0])


def timing_part(args, device, workdir: Path, n_mem_params: int) -> dict:
    """Part 2: SoRA-4bit vs PEFT-LoRA-4bit, each on a freshly loaded 4-bit base, timed interleaved."""
    t_dir = workdir / "mem_model"
    if args.timing_same_model:
        sizes, n_params = (args.hidden_size, args.layers, args.intermediate_size, args.heads, args.vocab_size), \
            n_mem_params
    else:
        sizes = (args.timing_hidden_size, args.timing_layers, args.timing_intermediate_size, args.timing_heads,
                 args.timing_vocab_size)
        t_dir = workdir / "timing_model"
        n_params = save_model(t_dir, sizes, args.seq_len, args.seed)
    dtype_name = args.timing_dtype if args.timing_dtype != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    cdt = str(compute_dtype(device)).replace("torch.", "")
    print()
    print("  timing   : Llama " + ", ".join(f"{k} {v}" for k, v in zip(SIZES, sizes)) + f"; {n_params / 1e6:.1f} M "
          f"params{' (the memory model)' if args.timing_same_model else ''}; 4-bit load with dtype={dtype_name} "
          f"(non-quantized modules), compute {cdt}")
    print(f"             batch {args.batch_size} x {args.seq_len}, {args.warmup} warm-up + {args.repeats} x "
          f"{args.steps} timed steps per arm, interleaved step by step; r {RANK}, alpha {ALPHA}, lr "
          f"{h.LEARNING_RATE:g}, SoRA sparse_lambda {SPARSE_LAMBDA:g}")
    t0 = time.perf_counter()
    lora = attach_lora(load_model(t_dir, "4bit", device, dtype))
    sora = attach_sora(load_model(t_dir, "4bit", device, dtype))
    setup_s = time.perf_counter() - t0
    batch, sync = h.random_batch(sizes[4], args.batch_size, args.seq_len, args.seed + 1, device), h.device_sync(device)
    timing = h.time_arms((sora, lora), max(args.warmup, 1), args.repeats, args.steps,
                         lambda arm: h.train_step(arm, batch, sync))
    rep = h.report_times((sora, lora), timing, [("ratio sora/lora", sora, lora)], width=11, digits=1)
    r = rep["ratios"]["ratio sora/lora"]
    h.row("", "SoRA-4bit", "LoRA-4bit")
    h.row("adapted modules", str(sora.n_modules), str(lora.n_modules))
    h.row("trainable params", *(f"{h.trainable(a.model):,}" for a in (sora, lora)))
    h.row("adapter dtype", *(str(a.adapter_dtype).replace("torch.", "") for a in (sora, lora)))
    h.row("first loss (must agree)", f"{sora.first_loss:.6f}", f"{lora.first_loss:.6f}")
    if sora.adapter_dtype != lora.adapter_dtype:
        print("  NOTE: adapter dtypes differ: SoRA makes its adapter (and AdamW state) in the layer's compute "
              f"dtype ({sora.adapter_dtype}), PEFT upcasts its adapter to fp32 (autocast_adapter_dtype=True);\n  "
              "the arms do not do the same arithmetic.")
    print(f"  setup (2 x 4-bit load + adapters) {setup_s:.1f} s, timed section {timing['bench_s']:.1f} s")
    return {
        "model_params": n_params, "sizes": dict(zip(SIZES, sizes)), "load_dtype": dtype_name, "compute_dtype": cdt,
        "sora": sora.stats, "lora": lora.stats,
        "trainable_params": {"sora": h.trainable(sora.model), "lora": h.trainable(lora.model)},
        "adapter_dtype": {"sora": str(sora.adapter_dtype), "lora": str(lora.adapter_dtype)},
        "first_loss": {"sora": sora.first_loss, "lora": lora.first_loss}, "ratio_median": r["median"],
        "ratio_per_repeat": r["per_repeat"], "noisy": rep["noisy"], "setup_s": setup_s,
        "timed_section_s": timing["bench_s"], "cpu_pressure_end": timing["pressure_after"],
        "meets_target": r["median"] <= TARGET_STEP_RATIO,
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.worker is not None:
        run_worker(args)
        return {}
    device = h.torch_device(args.device, args.threads)
    vers = h.versions("torch", "bitsandbytes", "transformers", "peft")
    dev_name = h.device_name(device.type == "cuda")
    h.header("QLoRA memory (bf16 vs 4-bit nf4 base) and step time (SoRA-4bit vs PEFT-LoRA-4bit)", [
        ("device", f"{device} ({dev_name}), torch threads {torch.get_num_threads()}"),
        ("versions", h.version_text(vers, python=True)),
        ("4-bit", f"nf4, double quant, quant_storage bf16, compute dtype "
                  f"{str(compute_dtype(device)).replace('torch.', '')}, "
                  f"device_map {device_map(device)!r}"),
    ])
    t_all = time.perf_counter()
    result: dict = {"device": str(device), "device_name": dev_name, "torch_threads": torch.get_num_threads(),
                    "versions": vers, "python": platform.python_version(), "args": h.args_record(args, drop=())}
    with tempfile.TemporaryDirectory(prefix="qlora_memory.") as tmp:
        result["memory"] = mem = memory_part(args, device, Path(tmp))
        result["timing"] = timing_part(args, device, Path(tmp), mem["model_params"])
        gc.collect()
    result["total_s"] = total_s = time.perf_counter() - t_all
    meets = {k: mem[f"ratio_{k}_bytes"] <= TARGET_BYTES_RATIO for k in ("linear", "whole")}
    mem["meets_target"] = meets
    which = ("both" if all(meets.values()) else "linear layers only" if meets["linear"]
             else "whole model only" if meets["whole"] else "neither")
    measure = ("CUDA max_memory_allocated" if device.type == "cuda"
               else "CPU process RSS high-water (VmHWM), not a weight measure: see caveats")
    print()
    print(f"device: {dev_name} ({device}); torch {torch.__version__}, bitsandbytes {vers['bitsandbytes']}; "
          f"total {total_s:.0f} s")
    print(f"4-bit/bf16 peak memory (load + {args.mem_steps} SoRA steps): "
          f"{format(mem['ratio_peak'], '.2f') if 'ratio_peak' in mem else 'n/a'} [{measure}]")
    for key, label in (("linear", "linear layers"), ("whole", "whole model")):
        print(f"4-bit/bf16 base bytes ({label}): {mem[f'ratio_{key}_bytes']:.2f} (target <= {TARGET_BYTES_RATIO}) "
              f"[{'MEETS' if meets[key] else 'MISSES'}]")
    print(f"bytes target met by: {which}")
    t = result["timing"]
    print(f"step ratio sora-4bit/lora-4bit: {t['ratio_median']:.2f} (target <= {TARGET_STEP_RATIO})"
          f"{'  [noisy: see NOTE above]' if t['noisy'] else ''}")
    h.write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
