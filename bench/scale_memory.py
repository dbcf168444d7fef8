"""Per-rank host memory of the recipe at multi-billion scale: 1 process against ZeRO-3 on 2 ranks.

What it measures
    For each base size (``--sizes``, Llama-shaped, vocab 32000, GQA 4:1, built from a ``LlamaConfig`` and saved in
    bf16 to a temporary folder with the byte tokenizer), the recipe is run as a user runs it
    (``sora_ds.recipe.train.train`` on ``model_name_or_path: <that folder>``, ``torch_dtype: bfloat16``,
    ``mixed_precision: bf16``, SoRA r 8 on q/k/v/o/gate/up/down, ``--steps`` optimizer steps of ``--seq-len`` tokens,
    the final evaluation and the PEFT export) twice, in fresh processes:

    * ``1 process``: one process, no DeepSpeed, batch 2;
    * ``ZeRO-3 x2``: 2 ranks (torchrun, gloo on CPU), ``deepspeed_config: ds_configs/zero3.json`` (the shipped JSON,
      its "auto" values filled by accelerate), batch 1 per rank (the same global batch).

    On every rank a sampler thread reads ``/proc/self/status`` every 5 ms; each phase of the run resets the kernel's
    resident high-water mark (``echo 5 > /proc/self/clear_refs``) when it starts and reads ``VmHWM`` when it ends, so
    a phase's peak RSS is exact; the split of that RSS into anonymous (``RssAnon``: heap, tensors) and file-backed
    (``RssFile``: the safetensors mmap, shared libraries; page cache that other processes share) is the sampled
    maximum of each. Phases: ``import`` (the interpreter, torch, transformers, DeepSpeed), ``load`` (the base:
    ``recipe.model.base_model``), ``prepare`` (adapters, optimizer, ``accelerator.prepare``), ``steps``,
    ``finish`` (final eval, export, summary). Also per rank: the steady-state RSS after ``prepare`` (anonymous and
    in all) and the base bytes the rank holds (``sharding_report``), time to first step (from ``train()``'s call to
    the end of step 1) and the mean time of the later steps.

    The headline: the ratio peak(ZeRO-3, worst rank) / peak(1 process) of the whole run, and of its anonymous part,
    per size. Memory that divides makes it fall toward 0.5 as the base grows; what does not divide stays as overhead
    (imports, the step's activations, gathered layers).

Commands
    ``python bench/scale_memory.py`` (CPU; 0.5B and 1B, ~5-10 minutes on 2 cores)
    ``python bench/scale_memory.py --sizes 0.5B,1B,2B --md bench/results/scale_memory.md --json bench/results/scale_memory.json``
    Check ``free -g`` first: 2B needs ~4 GB per process on top of the page cache.

Timings on a CPU shared with other work are slow and noisy; the memory figures are not affected by that. FSDP2 is
not an engine of sora-ds yet: its rows say "not measured".
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import harness

SIZES = {  # hidden, layers, intermediate, heads (kv heads = heads / 4); vocab 32000
    "0.05B": (512, 4, 1408, 8),  # a smoke test of the script
    "0.5B": (1536, 16, 4096, 12),
    "1B": (2048, 20, 5632, 16),
    "2B": (2560, 26, 6912, 20),
}
VOCAB = 32000
FIELDS = ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem")
SHAPE_KEYS = ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads", "num_key_value_heads",
              "vocab_size", "tie_word_embeddings")
PHASES = ("import", "load", "prepare", "steps", "finish")


def status() -> dict[str, int]:
    """The memory lines of /proc/self/status, in bytes."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in FIELDS:
            out[key] = int(value.split()[0]) * 1024
    return out


class Phases(threading.Thread):
    """Exact peak RSS per phase (VmHWM, reset at each phase start) and sampled peaks of RssAnon / RssFile."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.phase, self.peaks, self.lock, self.running = "import", {}, threading.Lock(), True
        self.anon = self.file = 0

    def run(self) -> None:
        while self.running:
            s = status()
            with self.lock:
                self.anon, self.file = max(self.anon, s["RssAnon"]), max(self.file, s["RssFile"])
            time.sleep(0.005)

    def mark(self, phase: str | None) -> None:
        """End the current phase (record its peaks) and start ``phase``."""
        s = status()
        with self.lock:
            self.peaks[self.phase] = {"peak": s["VmHWM"], "anon": max(self.anon, s["RssAnon"]),
                                      "file": max(self.file, s["RssFile"])}
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
            now = status()
            self.anon, self.file, self.phase = now["RssAnon"], now["RssFile"], phase
        if phase is None:
            self.running = False


def build(folder: Path, size: str, seed: int) -> int:
    """Build the base of ``size`` (bf16, seeded) and save it with the byte tokenizer; returns its parameter count."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from sora_ds.data.tokenizer import build_byte_tokenizer

    hidden, layers, inter, heads = SIZES[size]
    tok = build_byte_tokenizer()
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers, intermediate_size=inter,
                         num_attention_heads=heads, num_key_value_heads=heads // 4, max_position_embeddings=512,
                         pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def recipe_keys(seq_len: int) -> dict:
    """The recipe keys that decide memory (``sora-ds plan`` reads the same; tests/recipe/test_plan.py)."""
    return {"torch_dtype": "bfloat16", "mixed_precision": "bf16", "target_modules": harness.DEFAULT_TARGETS.split(","),
            "r": 8, "lora_alpha": 16.0, "max_length": seq_len}


def worker(args: argparse.Namespace) -> None:
    """One rank: the recipe run with its phases measured; rank 0 hands back every rank's figures."""
    phases = Phases()
    phases.start()
    t_import = time.perf_counter()
    import importlib

    import torch

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    importlib.import_module("deepspeed")  # imports count in the import phase
    comm_torch = importlib.import_module("deepspeed.comm.torch")  # unused shared-memory op: skip its ~40 s JIT build
    if hasattr(comm_torch, "build_shm_op"):
        comm_torch.build_shm_op = lambda: None
    from sora_ds.adapters.compact import adapter_tensors
    from sora_ds.adapters.inject import adapter_layers
    from sora_ds.engine import sharding_report
    from sora_ds.recipe import train as recipe
    from sora_ds.recipe.config import from_flat

    recipe.quiet_third_party()
    zero3 = args.arm == "zero3"
    cfg = from_flat({
        **recipe_keys(args.seq_len), "model_name_or_path": args.base, "sparse_lambda": 1e-6, "learning_rate": 1e-4,
        "max_steps": args.steps, "per_device_train_batch_size": 1 if zero3 else 2,
        "eval_size": 2 * (2 if zero3 else 1), "eval_every": 0, "log_every": args.steps,
        "output_dir": str(Path(args.workdir) / "run"), "seed": args.seed,
        "deepspeed_config": args.ds_config if zero3 else None,
    })
    record: dict = {"steps_at": []}

    def wrap(name: str, before: str, after: str | None = None):
        original = getattr(recipe, name)

        def wrapped(*a, **k):
            phases.mark(before)
            out = original(*a, **k)
            if after:
                phases.mark(after)
            return out
        setattr(recipe, name, wrapped)
        return original

    wrap("base_model", "load", "prepare")
    start = recipe.start

    def start_and_measure(c):
        run = start(c)
        s = status()
        record["steady"] = {"rss": s["VmRSS"], "anon": s["RssAnon"], "file": s["RssFile"]}
        record.update(sharding_report(run.plain, adapter_tensors([m for _, m in adapter_layers(run.plain)])))
        phases.mark("steps")
        return run
    recipe.start = start_and_measure

    def on_step(done, model, optimizer):
        record["steps_at"].append(time.perf_counter())
        if done == args.steps:
            phases.mark("finish")

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    t0 = time.perf_counter()
    record["import_s"] = t0 - t_import
    recipe.train(cfg, on_step=on_step)
    phases.mark(None)
    at = record.pop("steps_at")
    record["first_step_s"] = at[0] - t0
    record["step_s"] = (at[-1] - at[0]) / (len(at) - 1) if len(at) > 1 else None
    record["phases"] = phases.peaks
    record["rank"] = int(os.environ.get("RANK", "0"))
    # Every rank writes its own record (accelerate's end_training has closed the process group by now).
    (Path(args.records) / f"rank{record['rank']}.json").write_text(json.dumps(record))


def gb(n: float | None) -> str:
    return "-" if n is None else f"{n / 1e9:.2f}"


def whole_run(rank: dict) -> tuple[int, int, int]:
    """(peak RSS, peak anonymous, peak file-backed) of a rank over all phases."""
    ph = rank["phases"].values()
    return max(p["peak"] for p in ph), max(p["anon"] for p in ph), max(p["file"] for p in ph)


def report(results: list[dict], meta: dict) -> str:
    lines = ["# Per-rank host memory: 1 process vs ZeRO-3 on 2 ranks (CPU)", "",
             f"{meta['device']}; {meta['versions']}; {meta['when']}.", "",
             f"Recipe: SoRA r 8 on q/k/v/o/gate/up/down, torch_dtype bfloat16 + mixed_precision bf16, {meta['steps']} "
             f"steps of {meta['seq_len']} tokens (global batch 2), final eval and PEFT export; ZeRO-3 with "
             "ds_configs/zero3.json. GB = 1e9 bytes. Peak = exact VmHWM per phase (reset at each phase start); "
             "anon/file = sampled maxima of RssAnon/RssFile (5 ms). CPU load while measuring: "
             f"{meta['pressure']} (timings slowed by other work; memory is not).", "",
             "| base | params | run | rank | peak RSS | peak anon | peak file | load peak | prepare peak | steps peak "
             "| finish peak | steady RSS (anon) | base bytes held | first step s | step s |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        for arm in ("single", "zero3"):
            ranks = r.get(arm)
            label = {"single": "1 process", "zero3": "ZeRO-3 x2"}[arm]
            if not ranks:
                lines.append(f"| {r['size']} | {r['params'] / 1e9:.2f}B | {label} | - | failed (rc {r.get(arm + '_rc')}) "
                             "| | | | | | | | | | |")
                continue
            for k in ranks:
                peak, anon, file = whole_run(k)
                ph = k["phases"]
                lines.append(
                    f"| {r['size']} | {r['params'] / 1e9:.2f}B | {label} | {k['rank']} | {gb(peak)} | {gb(anon)} | "
                    f"{gb(file)} | {gb(ph['load']['peak'])} | {gb(ph['prepare']['peak'])} | {gb(ph['steps']['peak'])} "
                    f"| {gb(ph['finish']['peak'])} | {gb(k['steady']['rss'])} ({gb(k['steady']['anon'])}) | "
                    f"{gb(k['base_bytes_on_rank'])} | {k['first_step_s']:.1f} | "
                    f"{'-' if k['step_s'] is None else format(k['step_s'], '.2f')} |")
        lines.append(f"| {r['size']} | {r['params'] / 1e9:.2f}B | FSDP2 x2 | - | not measured (no FSDP2 engine yet) "
                     "| | | | | | | | | | |")
    lines += ["", "Ratios ZeRO-3 x2 / 1 process: of the whole run's peak RSS (worst rank); of the peak after loading "
              "(prepare, steps, finish: rank 0's checkpoint pages are gone by then); of the steady RSS after prepare; of "
              "the base bytes held.", "",
              "| base | peak, whole run | peak after loading | steady RSS | base bytes held |", "|---|---:|---:|---:|---:|"]
    for r in results:
        if r.get("single") and r.get("zero3"):
            one, two = r["single"][0], r["zero3"]
            lines.append(f"| {r['size']} | {ratio(two, one, whole_run_peak):.2f} | {ratio(two, one, trained_peak):.2f} | "
                         f"{ratio(two, one, lambda k: k['steady']['rss']):.2f} | "
                         f"{ratio(two, one, lambda k: k['base_bytes_on_rank']):.2f} |")
    return "\n".join(lines) + "\n"


def whole_run_peak(rank: dict) -> int:
    return whole_run(rank)[0]


def trained_peak(rank: dict) -> int:
    return max(rank["phases"][p]["peak"] for p in ("prepare", "steps", "finish"))


def ratio(ranks: list[dict], single: dict, measure) -> float:
    """``measure`` of the worst rank over that of the single process."""
    return max(measure(k) for k in ranks) / measure(single)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="0.5B,1B", help=f"comma-separated, of {list(SIZES)}")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--ds-config", default=str(harness.REPO / "ds_configs" / "zero3.json"),
                   help="the DeepSpeed JSON of the ZeRO-3 arm (default: the shipped ds_configs/zero3.json)")
    p.add_argument("--arms", default="single,zero3", help="which runs: single (1 process), zero3 (2 ranks)")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--md", type=Path, default=None, help="also write the tables as Markdown")
    p.add_argument("--build", default=None, help=argparse.SUPPRESS)
    p.add_argument("--size", default=None, help=argparse.SUPPRESS)
    p.add_argument("--base", default=None, help=argparse.SUPPRESS)
    p.add_argument("--arm", default=None, help=argparse.SUPPRESS)
    p.add_argument("--records", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--render", type=Path, default=None, metavar="JSON",
                   help="only write the tables (to --md, or print them) from a JSON this script wrote")
    args = p.parse_args()
    if args.render:
        data = json.loads(args.render.read_text())
        text = report(data["results"], data["meta"])
        return args.md.write_text(text) if args.md else print(text)
    if args.build:
        print(json.dumps({"params": build(Path(args.build), args.size, args.seed)}))
        return
    if args.worker:
        return worker(args)
    sizes = args.sizes.split(",")
    for s in sizes:
        if s not in SIZES:
            sys.exit(f"--sizes: {s!r} is not one of {list(SIZES)}")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    meta = {"device": harness.device_name(False), "versions": harness.version_text(
        harness.versions("torch", "transformers", "accelerate", "deepspeed")), "steps": args.steps,
        "seq_len": args.seq_len, "recipe": recipe_keys(args.seq_len), "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    harness.header("scale_memory: per-rank host memory, 1 process vs ZeRO-3 x2", [
        ("device", meta["device"]), ("versions", meta["versions"]), ("sizes", ", ".join(sizes))])
    results = []
    for size in sizes:
        with tempfile.TemporaryDirectory(prefix=f"scale_memory_{size}.") as folder:
            t = time.perf_counter()
            out = subprocess.run([sys.executable, __file__, "--build", folder, "--size", size, "--seed", str(args.seed)],
                                 capture_output=True, text=True, timeout=args.timeout)
            if out.returncode:
                sys.exit(f"building the {size} base failed:\n{out.stderr[-3000:]}")
            saved = json.loads((Path(folder) / "config.json").read_text())
            r = {"size": size, "params": json.loads(out.stdout.splitlines()[-1])["params"],
                 "build_s": time.perf_counter() - t, "config": {k: saved[k] for k in SHAPE_KEYS}}
            print(f"{size}: {r['params'] / 1e9:.2f}B params built and saved in {r['build_s']:.0f} s", flush=True)
            for arm, nproc in (("single", 1), ("zero3", 2)):
                if arm not in args.arms.split(","):
                    continue
                records = Path(folder) / f"records_{arm}"
                records.mkdir()
                argv = ["--base", folder, "--arm", arm, "--steps", str(args.steps), "--seq-len", str(args.seq_len),
                        "--seed", str(args.seed), "--records", str(records), "--ds-config", args.ds_config]
                rc, _ = harness.launch_ranks(__file__, argv, nproc, args.timeout)
                got = [json.loads(f.read_text()) for f in sorted(records.glob("rank*.json"))]
                r[arm], r[arm + "_rc"] = (got if rc == 0 and len(got) == nproc else None), rc
                for k in r[arm] or []:
                    peak, anon, file = whole_run(k)
                    print(f"  {arm:6} rank {k['rank']}: peak {gb(peak)} GB (anon {gb(anon)}, file {gb(file)}); "
                          + ", ".join(f"{ph} {gb(v['peak'])}" for ph, v in k["phases"].items())
                          + f"; first step {k['first_step_s']:.1f} s", flush=True)
            if r.get("single") and r.get("zero3"):
                one = whole_run(r["single"][0])
                worst = [max(whole_run(k)[i] for k in r["zero3"]) for i in range(2)]
                r["ratio"] = {"peak": worst[0] / one[0], "anon": worst[1] / one[1],
                              "steady": max(k["steady"]["rss"] for k in r["zero3"]) / r["single"][0]["steady"]["rss"]}
                print(f"  ratio peak(ZeRO-3)/peak(1 process) = {r['ratio']['peak']:.2f} (anon {r['ratio']['anon']:.2f})")
            results.append(r)
            meta["pressure"] = harness.pressure_text(harness.cpu_pressure())
            text = report(results, meta)  # after each size: a later, larger one may not finish
            if args.md:
                args.md.parent.mkdir(parents=True, exist_ok=True)
                args.md.write_text(text)
            harness.write_json(args.json, {"meta": meta, "results": results}, say=lambda *a: None)
    print(text)


if __name__ == "__main__":
    main()
