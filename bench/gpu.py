"""GPU throughput: tokens/s, MFU and peak memory of PEFT LoRA, SoRA and AdaLoRA on a Llama-3-8B-shaped model; then
4-bit NF4 SoRA vs PEFT QLoRA; then SoRA under DeepSpeed ZeRO-3 on one GPU vs without ZeRO. One table, one command.

What it measures (one process, arms one after another, each on a fresh base)
    * The base: ``LlamaForCausalLM`` built from a Llama-3-8B-shaped ``LlamaConfig`` (hidden 4096, 32 layers,
      intermediate 14336, 32/8 heads, vocab 128256, rope theta 5e5; 8.0 B params), random weights under ``--seed``,
      built directly on the GPU in bf16 (nothing downloaded). Attention: ``flash_attention_2`` when flash_attn is
      installed, else ``sdpa``; Liger's kernels (RMSNorm, RoPE, SwiGLU, fused linear cross-entropy) when liger_kernel
      is installed (``--no-liger`` / ``--attn sdpa`` turn them off). The header says what was used.
    * The batch: random documents (lengths uniform in [seq/16, seq]) packed best-fit into rows of ``--seq-len``
      (2048) tokens with ``sora_ds.data.packing.pack_examples``; ``--rows`` rows a step. Under FlashAttention the rows
      are flattened into one padding-free row (``collate(..., flatten=True)``, as the recipe does), under sdpa they
      stay rows with restarting ``position_ids`` (block-diagonal mask). tokens/step = the real tokens of those rows.
    * Arms, all with rank ``--rank`` (16) on every linear layer of the decoder (q, k, v, o, gate, up, down),
      ``lora_alpha = 2 r``, no dropout, fp32 adapters, bf16 autocast, AdamW lr 1e-4 (fused on CUDA):
        1. PEFT LoRA: ``get_peft_model(LoraConfig(...))``;
        2. SoRA: ``sora_ds.inject(SoRAConfig(...))`` + ``sora_ds.build_optimizer`` (proximal gate step, lambda
           1e-6 lr-scaled: no gate dies, shapes stay);
        3. AdaLoRA (sora-ds): ``AdaLoRAConfig(r, target_r=r/2, delta_t=1)`` with every timed step inside the
           budget-decreasing phase (importance scores and re-allocation at every step: the worst case), plus the
           orthogonality penalty (weight 0.5) as the recipe adds it;
        4. PEFT AdaLoRA with the same schedule (``update_and_allocate`` after every step), for reference;
        5. PEFT QLoRA and 6. SoRA on a 4-bit NF4 base (double quant, bf16 compute and storage), loaded through
           ``from_pretrained(quantization_config=BitsAndBytesConfig(...))`` from a copy of the same bf16 base saved
           to a temporary folder, as users load QLoRA;
        7. SoRA under DeepSpeed ZeRO-3 on one process (``ds_configs/zero3.json`` with accelerate's ``auto`` values,
           bf16), the engine's own forward / backward / step: the engine's overhead against arm 2.
    * Per arm: ``--warmup`` untimed steps, then ``--steps`` timed ones (forward with labels, backward, optimizer step,
      ``zero_grad``; the device synchronised before and after each). tokens/s = tokens/step / median step time;
      MFU = FLOPs/token x tokens/s / the device's dense bf16 peak (``sora_ds.recipe.throughput``: ``4 x`` the base's
      matmul params + attention + ``6 x`` adapter params; peak by device name, or ``--peak-flops``; None unknown);
      peak memory = ``torch.cuda.max_memory_allocated`` since the arm's base was built (weights included).
    * Ratios: tokens/s of SoRA, AdaLoRA and PEFT AdaLoRA over PEFT LoRA; of SoRA-4bit over PEFT QLoRA; of ZeRO-3 over plain SoRA;
      peak memory of each 4-bit arm over its bf16 arm. The targets of issue 18 are printed beside them (reported,
      not asserted): SoRA >= 0.97 x LoRA, AdaLoRA >= 0.92 x LoRA, LoRA MFU >= 35 % (with FlashAttention and Liger),
      QLoRA peak memory <= 0.45 x bf16.

Commands
    GPU (one H100/H200; about 3-5 minutes, well inside 8)::

        python bench/gpu.py --json /tmp/gpu.json

    CPU smoke run of the same code on a tiny Llama (fp32, sdpa; seconds; what the test suite runs)::

        python bench/gpu.py --tiny
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import harness as h

LLAMA3_8B = dict(hidden_size=4096, layers=32, intermediate_size=14336, heads=32, kv_heads=8, vocab_size=128256,
                 seq_len=2048)
TINY = dict(hidden_size=64, layers=2, intermediate_size=128, heads=4, kv_heads=2, vocab_size=256, seq_len=128)
TARGETS = {"sora_over_lora": 0.97, "adalora_over_lora": 0.92, "lora_mfu": 0.35, "qlora_memory_over_bf16": 0.45}
SPARSE_LAMBDA = 1e-6
ORTH_WEIGHT = 0.5
ARMS = {"lora": "PEFT LoRA", "sora": "SoRA", "adalora": "AdaLoRA (sora-ds)", "peft_adalora": "PEFT AdaLoRA",
        "qlora": "PEFT QLoRA (nf4)",
        "sora_4bit": "SoRA (nf4)", "sora_zero3": "SoRA ZeRO-3 (1 proc)"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="a tiny Llama on CPU in fp32: the same code, in seconds")
    p.add_argument("--rank", type=int, default=16, help="start rank of every arm (lora_alpha = 2 * rank)")
    p.add_argument("--rows", type=int, default=2, help="packed rows of --seq-len tokens per step")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per packed row (default 2048; --tiny 128)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per arm (default 10; --tiny 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per arm (default 3; --tiny 1)")
    p.add_argument("--attn", choices=("auto", "flash_attention_2", "sdpa", "eager"), default="auto",
                   help="attention kernel; auto: flash_attention_2 where flash_attn and CUDA are present, else sdpa")
    p.add_argument("--no-liger", action="store_true", help="do not apply Liger's kernels even where installed")
    p.add_argument("--only", default=",".join(ARMS),
                   help="comma-separated arms to run (lora is needed for the ratios)")
    p.add_argument("--peak-flops", type=float, default=None, help="peak FLOP/s of the device (default: by its name)")
    h.run_args(p.add_argument_group("run"), "seed", "json")
    args = p.parse_args(argv)
    args.only = [a.strip() for a in args.only.split(",") if a.strip()]
    unknown = sorted(set(args.only) - set(ARMS))
    if unknown:
        p.error(f"--only: unknown arms {unknown}; choose from {list(ARMS)}")
    shape = TINY if args.tiny else LLAMA3_8B
    args.shape = {**shape, "seq_len": args.seq_len or shape["seq_len"]}
    args.steps = args.steps or (3 if args.tiny else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 3)
    if args.steps < 1 or args.warmup < 0 or args.rows < 1 or args.rank < 2:
        p.error("--steps and --rows must be >= 1, --warmup >= 0, --rank >= 2")
    return args


# ----------------------------------------------------------------------------------------------------------------
# set-up: device, kernels, model, batch


def setup(args: argparse.Namespace):
    """The device (CUDA unless --tiny), compute dtype, attention kernel and whether Liger applies."""
    import importlib.util

    import torch

    cuda = not args.tiny
    if cuda and not torch.cuda.is_available():
        sys.exit("bench/gpu.py needs a CUDA GPU (torch.cuda.is_available() is False); --tiny runs it on CPU")
    if not cuda:
        torch.set_num_threads(1)  # a tiny model: threads only cost time on a shared CPU
    attn = args.attn
    if attn == "auto":
        attn = "flash_attention_2" if cuda and importlib.util.find_spec("flash_attn") else "sdpa"
    liger = cuda and not args.no_liger and importlib.util.find_spec("liger_kernel") is not None
    device = torch.device("cuda" if cuda else "cpu")
    return device, (torch.bfloat16 if cuda else torch.float32), attn, liger


def llama_config(args: argparse.Namespace, attn: str):
    from transformers import LlamaConfig

    s = args.shape
    config = LlamaConfig(vocab_size=s["vocab_size"], hidden_size=s["hidden_size"],
                         intermediate_size=s["intermediate_size"], num_hidden_layers=s["layers"],
                         num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"],
                         max_position_embeddings=max(s["seq_len"], 8192), rope_theta=500000.0, use_cache=False,
                         tie_word_embeddings=False)
    config._attn_implementation = attn
    return config


def build_base(config, device, dtype, seed: int, liger: bool, zero3: bool = False):
    """The base in ``dtype``, initialised on ``device`` under ``seed`` (seconds even for 8 B params on a GPU); Liger's
    kernels as the recipe applies them (under ZeRO-3 without the fused linear cross-entropy)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=config._attn_implementation)
    model.config.use_cache = False
    if liger:
        from sora_ds.recipe.kernels import apply_liger

        apply_liger(model, zero3=zero3)
    return model.train()


def packed_batch(args: argparse.Namespace, flatten: bool, device) -> tuple[dict, int]:
    """``--rows`` rows of random documents packed into ``seq_len`` tokens; returns the batch and its real tokens."""
    import torch

    from sora_ds.data.chat import collate
    from sora_ds.data.packing import pack_examples

    seq, vocab = args.shape["seq_len"], args.shape["vocab_size"]
    g = torch.Generator().manual_seed(args.seed + 1)
    docs = []
    while sum(len(d["input_ids"]) for d in docs) < 2 * args.rows * seq:
        n = int(torch.randint(max(seq // 16, 4), seq + 1, (1,), generator=g))
        ids = torch.randint(0, vocab, (n,), generator=g).tolist()
        docs.append({"input_ids": ids, "labels": [-100] + ids[1:]})
    rows = pack_examples(docs, seq)[:args.rows]  # best fit: the first rows are the fullest
    batch = collate(rows, pad_token_id=0, flatten=flatten)
    return {k: v.to(device) for k, v in batch.items()}, sum(len(r["input_ids"]) for r in rows)


# ----------------------------------------------------------------------------------------------------------------
# arms


def targets() -> list[str]:
    return h.DEFAULT_TARGETS.split(",")


def adamw(params, fused: bool):
    import torch

    return torch.optim.AdamW(params, lr=h.LEARNING_RATE, weight_decay=0.0, **({"fused": True} if fused else {}))


def peft_lora(model, args, fused: bool) -> h.Arm:
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=targets(),
                                             lora_dropout=0.0))
    return h.Arm("", model, adamw([p for p in model.parameters() if p.requires_grad], fused))


def sora(model, args, fused: bool) -> h.Arm:
    import sora_ds

    sora_ds.inject(model, sora_ds.SoRAConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=targets(),
                                             init_seed=args.seed))
    return h.Arm("", model, sora_ds.build_optimizer(model, learning_rate=h.LEARNING_RATE, sparse_lambda=SPARSE_LAMBDA,
                                                    fused=fused))


def budget_schedule(args) -> dict:
    """AdaLoRA's schedule for both implementations: the first step keeps the full budget, every later timed step
    lies in the budget-decreasing phase and re-allocates (delta_t 1): the worst case."""
    t_init = min(1, args.warmup)
    return {"t_init": t_init, "t_final": 1, "total_step": args.warmup + args.steps + 2}


def adalora(model, args, fused: bool) -> h.Arm:
    """sora-ds AdaLoRA: the allocator runs inside the optimizer step; the orthogonality penalty as the recipe adds it."""
    import sora_ds

    cfg = sora_ds.AdaLoRAConfig(r=args.rank, target_r=args.rank // 2, lora_alpha=2 * args.rank,
                                target_modules=targets(), delta_t=1, orth_reg_weight=ORTH_WEIGHT, init_seed=args.seed,
                                **budget_schedule(args))
    sora_ds.inject(model, cfg)
    opt = sora_ds.build_optimizer(model, learning_rate=h.LEARNING_RATE, fused=fused)
    return h.Arm("", model, opt, penalty=lambda _: sora_ds.orth_loss(model, ORTH_WEIGHT))


def peft_adalora(model, args, fused: bool) -> h.Arm:
    """PEFT's AdaLoRA (its orthogonality penalty is added inside its forward); ``update_and_allocate`` after each
    optimizer step, as PEFT asks."""
    from peft import AdaLoraConfig, get_peft_model

    sched = budget_schedule(args)
    model = get_peft_model(model, AdaLoraConfig(
        init_r=args.rank, target_r=args.rank // 2, lora_alpha=2 * args.rank, target_modules=targets(), lora_dropout=0.0,
        tinit=sched["t_init"], tfinal=sched["t_final"], total_step=sched["total_step"], deltaT=1,
        orth_reg_weight=ORTH_WEIGHT, task_type="CAUSAL_LM"))
    return h.Arm("", model, adamw([p for p in model.parameters() if p.requires_grad], fused),
                 after_step=lambda arm: model.base_model.update_and_allocate(arm.t))


class Autocast:
    """``model(**batch)`` under bf16 autocast (what ``mixed_precision: bf16`` does in the recipe); identity in fp32."""

    def __init__(self, model, dtype) -> None:
        self.model, self.dtype = model, dtype

    def __call__(self, **batch):
        import torch

        if self.dtype == torch.float32:
            return self.model(**batch)
        with torch.autocast("cuda", dtype=self.dtype):
            return self.model(**batch)

    def parameters(self):
        return self.model.parameters()


def load_4bit(path: Path, device, dtype, liger: bool, attn: str):
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_storage=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=q, dtype=dtype, attn_implementation=attn,
                                                 device_map={"": device.index or 0} if device.type == "cuda" else "cpu")
    model.config.use_cache = False
    if liger:
        from sora_ds.recipe.kernels import apply_liger

        apply_liger(model, zero3=False)
    return model.train()


def zero3_engine(model, opt, args, cuda: bool):
    """A ZeRO-3 DeepSpeed engine over ``model`` on one process: ``ds_configs/zero3.json`` with the values accelerate
    fills for its ``auto`` entries."""
    import importlib
    import logging

    import deepspeed

    if not cuda:  # gloo on CPU; DeepSpeed's shared-memory op (unused here) would be JIT-built for ~40 s
        comm_torch = importlib.import_module("deepspeed.comm.torch")
        if hasattr(comm_torch, "build_shm_op"):
            comm_torch.build_shm_op = lambda: None
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    deepspeed.utils.logger.setLevel(logging.ERROR)
    hidden = args.shape["hidden_size"]
    config = json.loads((h.REPO / "ds_configs" / "zero3.json").read_text())
    config.update(train_batch_size=1, train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=1,
                  gradient_clipping=0.0, bf16={"enabled": cuda}, fp16={"enabled": False}, steps_per_print=10**9)
    config["zero_optimization"].update(reduce_bucket_size=hidden * hidden,
                                       stage3_prefetch_bucket_size=int(0.9 * hidden * hidden),
                                       stage3_param_persistence_threshold=10 * hidden)
    engine, opt, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    return engine


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def first_loss(step):
    """``step`` that also keeps the language-model loss of the arm's first step (``first_lm_loss``)."""
    def wrapped(arm: h.Arm) -> float:
        dt = step(arm)
        if arm.first_lm_loss is None:
            arm.first_lm_loss = arm.lm_loss
        return dt

    return wrapped


def zero3_step(arm: h.Arm, batch: dict, sync) -> float:
    sync()
    t0 = time.perf_counter()
    loss = arm.model(**batch).loss
    arm.model.backward(loss)
    arm.model.step()
    sync()
    arm.loss = arm.lm_loss = float(loss.detach())
    return time.perf_counter() - t0


# ----------------------------------------------------------------------------------------------------------------
# measuring


def measure(key: str, arm: h.Arm, step, args, tokens: int, flops_of, peak, cuda: bool) -> dict:
    """Warm-up and timed steps of one arm; its figures (tokens/s, MFU, peak memory, median step, losses)."""
    import torch

    step = first_loss(step)
    from sora_ds.recipe.throughput import mfu

    times = [step(arm) for _ in range(args.warmup + args.steps)]
    first = arm.first_lm_loss  # the first step's language-model loss (recorded by the step)
    times = times[args.warmup:]
    stats = h.summarize([times])
    tps = tokens / (stats["median_ms"] / 1e3)
    flops = flops_of(arm)
    result = {"arm": ARMS[key], "median_step_ms": stats["median_ms"], "p10_ms": stats["p10_ms"],
              "p90_ms": stats["p90_ms"], "tokens_per_step": tokens, "tokens_per_s": tps, "flops_per_token": flops,
              "mfu": mfu(tps, flops, peak), "trainable_params": adapter_count(arm),
              "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
              "first_lm_loss": first, "last_lm_loss": arm.lm_loss}
    if not all(x == x and abs(x) < 1e4 for x in (first, arm.lm_loss)):
        result["error"] = f"loss not finite: {first} -> {arm.lm_loss}"
    return result


def adapter_count(arm: h.Arm) -> int:
    model = arm.model.module if hasattr(arm.model, "backward") else arm.model
    model = model.model if isinstance(model, Autocast) else model
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)


def run_arms(args, device, dtype, attn: str, liger: bool) -> dict:
    import torch

    from sora_ds.recipe.throughput import flops_per_token, peak_flops

    cuda = device.type == "cuda"
    config = llama_config(args, attn)
    batch, tokens = packed_batch(args, flatten=attn == "flash_attention_2", device=device)
    peak = args.peak_flops or (peak_flops(torch.cuda.get_device_name()) if cuda else None)
    sync = h.device_sync(device)
    seq = args.shape["seq_len"]
    results = {}

    def flops_of(arm):
        return flops_per_token(config, adapter_count(arm), seq)

    def fresh():
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    builders = {"lora": peft_lora, "sora": sora, "adalora": adalora, "peft_adalora": peft_adalora}
    for key in [k for k in builders if k in args.only]:
        fresh()
        t0 = time.perf_counter()
        arm = builders[key](build_base(config, device, dtype, args.seed, liger), args, cuda)
        arm.model = Autocast(arm.model, dtype)
        results[key] = measure(key, arm, lambda a: h.train_step(a, batch, sync), args, tokens, flops_of, peak, cuda)
        results[key]["setup_s"] = time.perf_counter() - t0
        print(f"  {ARMS[key]}: {results[key]['tokens_per_s']:,.0f} tokens/s", flush=True)
        del arm
    if {"qlora", "sora_4bit"} & set(args.only):
        with tempfile.TemporaryDirectory(prefix="bench_gpu.") as folder:
            fresh()
            t0 = time.perf_counter()
            base = build_base(config, device, dtype, args.seed, liger=False)
            base.save_pretrained(folder)
            del base
            saved_s = time.perf_counter() - t0
            for key, attach in (("qlora", peft_lora), ("sora_4bit", sora)):
                if key not in args.only:
                    continue
                fresh()
                t0 = time.perf_counter()
                arm = attach(load_4bit(Path(folder), device, dtype, liger, attn), args, cuda)
                arm.model = Autocast(arm.model, dtype)
                results[key] = measure(key, arm, lambda a: h.train_step(a, batch, sync), args, tokens, flops_of,
                                       peak, cuda)
                results[key]["setup_s"] = time.perf_counter() - t0 + saved_s
                print(f"  {ARMS[key]}: {results[key]['tokens_per_s']:,.0f} tokens/s", flush=True)
                del arm
    if "sora_zero3" in args.only:
        fresh()
        t0 = time.perf_counter()
        arm = sora(build_base(config, device, dtype, args.seed, liger, zero3=True), args, cuda)
        arm.model = zero3_engine(arm.model, arm.opt, args, cuda)
        results["sora_zero3"] = measure("sora_zero3", arm, lambda a: zero3_step(a, batch, sync), args, tokens,
                                        flops_of, peak, cuda)
        results["sora_zero3"]["setup_s"] = time.perf_counter() - t0
        print(f"  {ARMS['sora_zero3']}: {results['sora_zero3']['tokens_per_s']:,.0f} tokens/s", flush=True)
        del arm
    return results


def ratios(results: dict) -> dict:
    """tokens/s and peak-memory ratios between the arms (None where an arm did not run or memory is not measured)."""
    def tps(a, b):
        return results[a]["tokens_per_s"] / results[b]["tokens_per_s"] if a in results and b in results else None

    def mem(a, b):
        if a not in results or b not in results or results[b]["peak_memory_gib"] is None:
            return None
        return results[a]["peak_memory_gib"] / results[b]["peak_memory_gib"]

    return {"sora_over_lora": tps("sora", "lora"), "adalora_over_lora": tps("adalora", "lora"),
            "peft_adalora_over_lora": tps("peft_adalora", "lora"),
            "sora_4bit_over_qlora": tps("sora_4bit", "qlora"), "zero3_over_sora": tps("sora_zero3", "sora"),
            "qlora_memory_over_bf16": mem("qlora", "lora"), "sora_4bit_memory_over_bf16": mem("sora_4bit", "sora")}


# ----------------------------------------------------------------------------------------------------------------
# the table


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def target_text(value, target: float, at_least: bool) -> str:
    if value is None:
        return ""
    ok = value >= target if at_least else value <= target
    return f"target {'>=' if at_least else '<='} {target:g}: {'meets' if ok else 'BELOW' if at_least else 'ABOVE'}"


def print_table(results: dict, r: dict, gpu_ready: bool) -> None:
    cells = (12, 8, 11, 12)
    h.row("arm", "tokens/s", "MFU", "peak GiB", "step ms", width=24, cell=cells)
    for key, res in results.items():
        h.row(res["arm"], f"{res['tokens_per_s']:,.0f}", fmt(res["mfu"], ".1%"), fmt(res["peak_memory_gib"], ".2f"),
              f"{res['median_step_ms']:.1f}", width=24, cell=cells, note=f"   {res['error']}" if "error" in res else "")
    print()
    rows = [("SoRA / PEFT LoRA tokens/s", "sora_over_lora", TARGETS["sora_over_lora"], True),
            ("AdaLoRA / PEFT LoRA tokens/s", "adalora_over_lora", TARGETS["adalora_over_lora"], True),
            ("PEFT AdaLoRA / PEFT LoRA tokens/s", "peft_adalora_over_lora", None, True),
            ("SoRA-nf4 / PEFT QLoRA tokens/s", "sora_4bit_over_qlora", None, True),
            ("PEFT QLoRA / LoRA peak memory", "qlora_memory_over_bf16", TARGETS["qlora_memory_over_bf16"], False),
            ("SoRA-nf4 / SoRA peak memory", "sora_4bit_memory_over_bf16", TARGETS["qlora_memory_over_bf16"], False),
            ("ZeRO-3 / no ZeRO tokens/s (SoRA)", "zero3_over_sora", None, True)]
    for label, key, target, at_least in rows:
        if r[key] is None:
            continue
        note = target_text(r[key], target, at_least) if target is not None and gpu_ready else ""
        h.row(label, f"{r[key]:.3f}", width=34, cell=10, note=f"   {note}" if note else "")
    firsts = {k: v["first_lm_loss"] for k, v in results.items()}
    print("\n  first-step LM loss (adapters start as zero: the same base and batch give the same loss within an arm "
          "group; PEFT AdaLoRA's includes its orthogonality penalty):\n    " + ", ".join(f"{results[k]['arm']} {v:.4f}" for k, v in firsts.items()))
    lora_mfu = results.get("lora", {}).get("mfu")
    if lora_mfu is not None:
        h.row("PEFT LoRA MFU", f"{lora_mfu:.1%}", width=34, cell=10,
              note="   " + target_text(lora_mfu, TARGETS["lora_mfu"], True) + " (with flash attention and Liger)")


def main(argv: list[str] | None = None) -> dict:
    import warnings

    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    args = parse_args(argv)
    if args.tiny:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    device, dtype, attn, liger = setup(args)
    s = args.shape
    vers = h.versions("torch", "transformers", "peft", "deepspeed", "bitsandbytes")
    h.header("GPU throughput: PEFT LoRA vs SoRA vs AdaLoRA, 4-bit, ZeRO-3 (bench/gpu.py)", [
        ("device", f"{device} ({h.device_name(device.type == 'cuda')}), "
                   f"{'bf16 base, bf16 autocast' if dtype != __import__('torch').float32 else 'fp32'}"),
        ("versions", h.version_text(vers, python=True)),
        ("model", f"{'tiny ' if args.tiny else 'Llama-3-8B-shaped '}Llama: hidden {s['hidden_size']}, layers "
                  f"{s['layers']}, intermediate {s['intermediate_size']}, heads {s['heads']}/{s['kv_heads']} kv, vocab "
                  f"{s['vocab_size']}; random weights"),
        ("kernels", f"attention {attn}{' (packed rows flattened)' if attn == 'flash_attention_2' else ''}, Liger "
                    f"{'on' if liger else 'off'}, AdamW {'fused' if device.type == 'cuda' else 'foreach'}"),
        ("batch", f"{args.rows} packed rows x {s['seq_len']} tokens a step"),
        ("adapters", f"rank {args.rank} (alpha {2 * args.rank}) on {h.DEFAULT_TARGETS}; AdaLoRA target_r "
                     f"{args.rank // 2}, delta_t 1"),
        ("timing", f"{args.warmup} warm-up + {args.steps} timed steps per arm, arms one after another"),
    ])
    t0 = time.perf_counter()
    results = run_arms(args, device, dtype, attn, liger)
    r = ratios(results)
    print()
    print_table(results, r, gpu_ready=not args.tiny)
    total_s = time.perf_counter() - t0
    print(f"\n  total {total_s:.0f} s" + ("   (--tiny: figures of a tiny CPU model; the targets apply to the GPU run)"
                                         if args.tiny else ""))
    out = {"args": h.args_record(args), "device": h.device_name(device.type == "cuda"), "versions": vers,
           "attn_implementation": attn, "liger": liger, "arms": results, "ratios": r, "targets": TARGETS,
           "total_s": total_s}
    h.write_json(args.json, out)
    return out


if __name__ == "__main__":
    main()
