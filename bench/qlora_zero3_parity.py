"""4-bit (NF4) SoRA under ZeRO-3 (or FSDP2) on 2 CPU ranks against one process, with evals between training steps,
on both of bitsandbytes' CPU code paths (AVX512-BF16 and generic, forced whatever this CPU is).

    python bench/qlora_zero3_parity.py                       # 24 steps, eval every 4, writes bench/results/...
    python bench/qlora_zero3_parity.py --engine fsdp2        # the same under FSDP2 (launch/accelerate/fsdp2.yaml)
    python bench/qlora_zero3_parity.py --steps 8 --out /tmp/parity.md

Each arm is the recipe as users run it (`python recipes/llama_sora.py`, `accelerate launch ... zero3.yaml`), on the
same saved base, the same data and global batch (8 on one process, 4 per rank on two). Before the fix in
sora_ds/engine/quantized.py, the AVX512-BF16 path diverged at the first mid-run eval (issue 11: max relative loss
difference 0.41, final eval accuracy 18.8% vs 0.5%).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import harness as h

REPO = h.REPO
QUANT = ("{load_in_4bit: true, bnb_4bit_quant_type: nf4, bnb_4bit_use_double_quant: true, "
         "bnb_4bit_compute_dtype: float32, bnb_4bit_quant_storage: float32}")
FORCE = "tests/scripts/with_bnb_cpu_path.py"
PATHS = ("avx512_bf16", "generic")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(cmd: list[str]) -> float:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return time.perf_counter() - started


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def compare(one: Path, two: Path) -> dict:
    from safetensors.torch import load_file

    r1, r2 = records(one), records(two)
    rel = max(abs(a["loss"] - b["loss"]) / abs(a["loss"]) for a, b in zip(r1, r2))
    evals = [(a["step"], a["eval_loss"], b["eval_loss"]) for a, b in zip(r1, r2) if "eval_loss" in a]
    s1, s2 = (json.loads((o / "summary.json").read_text()) for o in (one, two))
    t1, t2 = (load_file(o / "adapter" / "adapter_model.safetensors") for o in (one, two))
    return {
        "max_rel_loss_diff": rel,
        "max_rel_eval_diff": max(abs(a - b) / a for _, a, b in evals),
        "evals": evals,
        "final_eval": (s1["final_eval_loss"], s2["final_eval_loss"]),
        "final_acc": (s1["final_eval_token_accuracy"], s2["final_eval_token_accuracy"]),
        "kept_same": s1["kept_ranks"] == s2["kept_ranks"],
        "kept": s1["total_kept_ranks"],
        "initial": s1["total_initial_ranks"],
        "adapter_max_abs_diff": max((t1[k] - t2[k]).abs().max().item() for k in t1),
        "base_share_on_rank": s2["base_bytes_on_rank"] / s2["base_bytes"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--eval_every", type=int, default=4)
    parser.add_argument("--engine", choices=("zero3", "fsdp2"), default="zero3")
    parser.add_argument("--out", default=None, help="default: bench/results/qlora_<engine>_parity.md")
    args = parser.parse_args()
    args.out = args.out or str(REPO / "bench" / "results" / f"qlora_{args.engine}_parity.md")

    root = Path(tempfile.mkdtemp(prefix="qlora_parity_"))
    sharded = root / "zero3_sharded.json"  # threshold 0: every adapter tensor and gate really split across ranks
    ds = json.loads((REPO / "ds_configs" / "zero3.json").read_text())
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    sharded.write_text(json.dumps(ds))
    engine = (["--config_file", "launch/accelerate/fsdp2.yaml"] if args.engine == "fsdp2" else
              ["--config_file", "launch/accelerate/zero3.yaml", "--deepspeed_config_file", str(sharded)])
    # The recipe's own learning rate and sparsity settings (lr 1e-2, lr-scaled lambda).
    common = ["--max_steps", str(args.steps), "--log_every", "1", "--eval_every", str(args.eval_every)]
    base_run = root / "base"
    launch([sys.executable, "recipes/llama_sora.py", "--max_steps", "1", "--output_dir", str(base_run)])
    base = ["--model_name_or_path", str(base_run / "base_model"), "--quantization", QUANT]
    rows, times = {}, {}
    for path in PATHS:
        one, two = root / f"one_{path}", root / f"two_{path}"
        times[(path, 1)] = launch([sys.executable, FORCE, path, "recipes/llama_sora.py", *common, *base,
                                   "--per_device_train_batch_size", "8", "--output_dir", str(one)])
        times[(path, 2)] = launch([str(Path(sys.executable).with_name("accelerate")), "launch", *engine,
                                   "--num_processes", "2",
                                   "--main_process_port", str(free_port()), FORCE, path, "recipes/llama_sora.py",
                                   *common, *base, "--per_device_train_batch_size", "4", "--output_dir", str(two)])
        rows[path] = compare(one, two)
    cross = compare(root / "one_avx512_bf16", root / "one_generic")
    text = render(args, rows, times, cross)
    print(text)
    Path(args.out).write_text(text)
    print(f"wrote {args.out}")


def render(args, rows: dict, times: dict, cross: dict) -> str:
    """The markdown table of one run (one row per bitsandbytes CPU path) and the mid-run eval losses."""
    import bitsandbytes

    name = {"zero3": "ZeRO-3", "fsdp2": "FSDP2"}[args.engine]
    lines = [
        f"# 4-bit {name} (2 ranks) vs one process, with evals between training steps",
        "",
        f"Device: {h.device_name(False)} (CPU, no GPU); this CPU's own bitsandbytes path: "
        f"{'avx512_bf16' if bitsandbytes.functional.has_avx512bf16() else 'generic'}. "
        + h.version_text(h.versions("torch", "deepspeed", "transformers", "bitsandbytes")) + ".",
        f"Command: `python bench/qlora_zero3_parity.py --engine {args.engine} --steps {args.steps} --eval_every "
        f"{args.eval_every}`. The recipe's "
        "tiny Llama and its defaults (lr 1e-2, lr-scaled lambda), NF4 with double quant, SoRA on all 7 linear types, "
        "global batch 8, "
        + ("`stage3_param_persistence_threshold: 0`" if args.engine == "zero3" else "launch/accelerate/fsdp2.yaml")
        + "; both bitsandbytes CPU paths forced by tests/scripts/with_bnb_cpu_path.py.",
        "",
        "| bnb CPU path | max rel. loss diff (all steps) | max rel. eval-loss diff (mid-run) | final eval loss 1 proc / "
        f"{name} | final token acc 1 proc / {name} | same kept ranks | adapter max abs diff | base share on rank 0 | "
        f"wall 1 proc / {name} |",
        "|---|---:|---:|---|---|---|---:|---:|---|",
    ]
    for path, r in rows.items():
        lines.append(
            f"| {path} | {r['max_rel_loss_diff']:.1e} | {r['max_rel_eval_diff']:.1e} | "
            f"{r['final_eval'][0]:.5f} / {r['final_eval'][1]:.5f} | {r['final_acc'][0]:.4f} / {r['final_acc'][1]:.4f} | "
            f"{'yes' if r['kept_same'] else 'NO'} ({r['kept']}/{r['initial']}) | {r['adapter_max_abs_diff']:.1e} | "
            f"{r['base_share_on_rank']:.3f} | {times[(path, 1)]:.0f} s / {times[(path, 2)]:.0f} s |"
        )
    lines += [
        "",
        f"One process, AVX512-BF16 path vs generic path: max rel. loss diff {cross['max_rel_loss_diff']:.1e}, "
        f"max rel. eval diff {cross['max_rel_eval_diff']:.1e}, adapter max abs diff {cross['adapter_max_abs_diff']:.1e}.",
        "",
        f"Mid-run eval losses (step: one process / {name}):",
        "",
    ]
    for path, r in rows.items():
        lines.append(f"- {path}: " + ", ".join(f"{s}: {a:.5f} / {b:.5f}" for s, a, b in r["evals"]))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
