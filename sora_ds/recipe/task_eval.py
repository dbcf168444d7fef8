"""Evaluation that measures the task: besides eval loss and token accuracy (``evaluate.py``), answer-only token
accuracy, the exact match of greedily generated answers (``eval_max_new_tokens``) and the accuracy of the likeliest
of given candidate answers (``eval_choices``), with a few samples per eval in ``eval_samples.jsonl``, the log and the
trackers. Used by the training loop and by ``sora-ds eval``.

Every figure is a count summed over the processes and divided once. Each process takes whole batches of the eval set
(batch ``j`` on process ``j % num_processes``), so a batch holds the same examples at any process count; a process
with fewer batches runs its first one again and drops the result, so every process makes the same model calls, which
ZeRO-3 needs (each forward gathers the sharded weights from all of them); ``generate`` runs with ``synced_gpus`` so
that the processes also take the same number of decoding steps.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..data.answers import choice_rows, final_answer, normalize, prompt_ids
from ..data.batches import IGNORE_INDEX
from ..data.chat import collate, encode_chat
from ..data.records import DataError
from ..engine.quantized import check_4bit_layout
from .evaluate import evaluate

SAMPLES_FILE = "eval_samples.jsonl"
_SHOWN_CHARS = 300  # of a question in a sample


@dataclass
class TaskData:
    """The eval set as tasks: per example the prompt a server would send, the reference answer, the candidate rows."""

    prompts: list[list[int]]
    references: list[str]
    questions: list[str]  # the last user turn, shown in the samples
    choice_rows: list[list[dict]]  # per example one row per candidate (empty without eval_choices)
    stop_ids: list[int]  # the end-of-turn tokens of the eval rows and EOS: generation stops at any of them
    choices: list[str] | None
    max_new_tokens: int
    samples: int
    batch_size: int


def build_task(eval_ds, tokenizer, cfg) -> TaskData | None:
    """The task data of ``eval_ds`` (eval rows with ``messages``), or None when neither generation nor candidates are
    asked for. A reference answer that is none of ``eval_choices`` is a :class:`DataError`, before any model loads."""
    if eval_ds is None or not (cfg.eval_max_new_tokens or cfg.eval_choices):
        return None
    wanted = {normalize(c) for c in cfg.eval_choices or []}
    prompts, references, questions, rows = [], [], [], []
    stops = {tokenizer.eos_token_id} - {None}
    encode = lambda messages: encode_chat(messages, tokenizer, cfg.max_length, cfg.truncation)[0]  # noqa: E731
    for i, example in enumerate(eval_ds):
        messages = example["messages"]
        _, reference = final_answer(messages)
        if cfg.eval_choices and normalize(reference) not in wanted:
            raise DataError(f"eval example {i + 1}: its answer {reference[:80]!r} is none of eval_choices "
                            f"{cfg.eval_choices} (compared after normalisation); fix the data or the choices")
        prompts.append(prompt_ids(messages, tokenizer, cfg.max_length))
        references.append(reference)
        questions.append(next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")[-_SHOWN_CHARS:])
        rows.append(choice_rows(messages, cfg.eval_choices, encode) if cfg.eval_choices else [])
        end, labels = example["answer_end"], example["labels"]
        if end < len(labels) and labels[end] != IGNORE_INDEX:
            stops.add(example["input_ids"][end])  # the template's end-of-turn marker
    return TaskData(prompts, references, questions, rows, sorted(stops), cfg.eval_choices, cfg.eval_max_new_tokens,
                    cfg.eval_samples, cfg.per_device_train_batch_size)


@torch.no_grad()
def task_metrics(model, task: TaskData, accelerator, tokenizer) -> tuple[dict[str, float], list[dict]]:
    """``exact_match`` (with ``max_new_tokens``) and ``choice_accuracy`` (with ``choices``) over the eval set, on all
    processes; and the first ``task.samples`` examples' answers."""
    net = accelerator.unwrap_model(model)
    was_training = net.training
    net.eval()
    rank, world = accelerator.process_index, accelerator.num_processes
    n = len(task.references)
    batches = [list(range(i, min(i + task.batch_size, n))) for i in range(0, n, task.batch_size)]
    mine = batches[rank::world]
    counts = torch.zeros(4, dtype=torch.float64)  # exact matches, generated, right picks, picked
    samples = []
    for r in range(math.ceil(len(batches) / world)):
        own = r < len(mine)
        idx = mine[r] if own else batches[0]  # a stand-in batch: every process makes the same calls
        results = {i: {"index": i, "question": task.questions[i], "reference": task.references[i]} for i in idx}
        if task.max_new_tokens:
            for i, text in zip(idx, _generate(net, [task.prompts[i] for i in idx], task, accelerator, tokenizer)):
                results[i].update(generated=text, exact_match=normalize(text) == normalize(task.references[i]))
        if task.choices:
            for i, pick in zip(idx, _pick(net, [task.choice_rows[i] for i in idx], accelerator, tokenizer)):
                choice = task.choices[pick]
                results[i].update(choice=choice, choice_correct=normalize(choice) == normalize(task.references[i]))
        if not own:
            continue
        for res in results.values():
            counts += torch.tensor([res.get("exact_match", False), "generated" in res, res.get("choice_correct", False),
                                    "choice" in res], dtype=torch.float64)
            if res["index"] < task.samples:
                samples.append(res)
    check_4bit_layout(net)  # as after evaluate(): generation runs eval-mode forwards too
    net.train(was_training)
    if world > 1:
        from accelerate.utils import gather_object

        counts = accelerator.reduce(counts.to(accelerator.device), reduction="sum").cpu()
        samples = sorted(gather_object(samples), key=lambda s: s["index"])
    matched, generated, right, picked = counts.tolist()
    metrics = {}
    if task.max_new_tokens:
        metrics["exact_match"] = matched / generated
    if task.choices:
        metrics["choice_accuracy"] = right / picked
    return metrics, samples


def _generate(net, prompts: list[list[int]], task: TaskData, accelerator, tokenizer) -> list[str]:
    """Greedy answers to left-padded ``prompts``, cut at the first stop token, special tokens left out."""
    from transformers import GenerationConfig

    pad = tokenizer.pad_token_id
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=accelerator.device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=accelerator.device)
    config = GenerationConfig(max_new_tokens=task.max_new_tokens, do_sample=False, eos_token_id=task.stop_ids,
                              pad_token_id=pad)
    with accelerator.autocast():
        out = net.generate(input_ids=ids, attention_mask=mask, generation_config=config,
                           synced_gpus=accelerator.num_processes > 1)
    texts = []
    for row in out[:, width:].tolist():
        cut = next((k for k, t in enumerate(row) if t in task.stop_ids), len(row))
        texts.append(tokenizer.decode(row[:cut], skip_special_tokens=True))
    return texts


def _pick(net, rows_per_example: list[list[dict]], accelerator, tokenizer) -> list[int]:
    """Per example, the candidate whose answer and end-of-turn tokens have the highest summed log-likelihood."""
    rows = [row for rows in rows_per_example for row in rows]
    batch = collate([{k: row[k] for k in ("input_ids", "labels", "attention_mask")} for row in rows],
                    tokenizer.pad_token_id)
    with accelerator.autocast():
        logits = net(input_ids=batch["input_ids"].to(accelerator.device),
                     attention_mask=batch["attention_mask"].to(accelerator.device)).logits[:, :-1]
    labels = batch["labels"][:, 1:].to(logits.device)
    position = torch.arange(1, labels.shape[1] + 1, device=logits.device)  # of the token each logit predicts
    spans = torch.tensor([[row["score_start"], row["score_end"]] for row in rows], device=logits.device)
    scored = (position >= spans[:, :1]) & (position < spans[:, 1:])
    logp = logits[scored].float().log_softmax(-1).gather(1, labels[scored][:, None])[:, 0].double()
    totals = torch.zeros(len(rows), dtype=torch.float64, device=logits.device).index_add_(0, scored.nonzero()[:, 0], logp)
    return totals.view(len(rows_per_example), -1).argmax(1).tolist()


@dataclass
class Evaluator:
    """Every eval of a run: ``evaluate``'s figures and the task metrics, the samples written once per step."""

    eval_dl: object | None
    task: TaskData | None
    accelerator: object
    tokenizer: object
    out: Path | None  # where eval_samples.jsonl goes (None: nowhere)
    samples: list[dict] = field(default_factory=list)  # of the last eval
    _last: tuple[int, dict] | None = field(default=None, repr=False)

    def __call__(self, model, step: int) -> dict[str, float]:
        """``loss``, ``token_accuracy``, ``answer_accuracy`` (+ ``exact_match``, ``choice_accuracy`` when asked for);
        NaN without an eval set. Computed once per step (the last logged eval is the final one)."""
        if self._last is not None and self._last[0] == step:
            return self._last[1]
        if self.eval_dl is None:
            return {"loss": math.nan, "token_accuracy": math.nan, "answer_accuracy": math.nan}
        metrics = evaluate(model, self.eval_dl, self.accelerator)
        if self.task is not None:
            found, samples = task_metrics(model, self.task, self.accelerator, self.tokenizer)
            metrics.update(found)
            self.samples = samples
            self.show(samples, step)
        self._last = (step, metrics)
        return metrics

    def show(self, samples: list[dict], step: int) -> None:
        """The samples into eval_samples.jsonl, the log and the trackers (one text value, ``eval_samples``)."""
        if not samples:
            return
        lines = [f"step {step} eval sample {s['index']}: reference {s['reference']!r}"
                 + (f", generated {s['generated']!r}" if "generated" in s else "")
                 + (f", picked {s['choice']!r}" if "choice" in s else "") for s in samples]
        self.accelerator.print("\n".join(lines))
        if self.out is not None and self.accelerator.is_main_process:
            with (self.out / SAMPLES_FILE).open("a") as f:
                f.writelines(json.dumps({"step": step, **s}) + "\n" for s in samples)
        if self.accelerator.trackers:
            self.accelerator.log({"eval_samples": "\n\n".join(lines)}, step=step)


def as_record(metrics: dict[str, float], prefix: str) -> dict:
    """The metrics as JSON-safe keys of a metrics.jsonl record or the summary (NaN -> null)."""
    return {f"{prefix}{k}": None if isinstance(v, float) and math.isnan(v) else v for k, v in metrics.items()}


def trim_samples(out: Path, step: int) -> None:
    """A resumed run: drop the samples of evals after the checkpoint's step (they will be redone)."""
    path = out / SAMPLES_FILE
    if path.is_file():
        lines = path.read_text().splitlines(keepends=True)
        path.write_text("".join(line for line in lines if json.loads(line)["step"] <= step))
