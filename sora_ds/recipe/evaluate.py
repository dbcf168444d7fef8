"""Held-out loss, next-token accuracy and answer-only accuracy of a run, exact across process counts."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..data.batches import IGNORE_INDEX
from ..engine import release_gathered
from ..engine.quantized import check_4bit_layout


@torch.no_grad()
def evaluate(model, loader, accelerator) -> dict[str, float]:
    """Token-weighted loss and next-token accuracy over supervised tokens, summed across processes; and, on eval rows
    (which carry ``answer_span``), ``answer_accuracy``: the same accuracy over the final answer's tokens only, without
    the end-of-turn marker and newline every model gets right (see :mod:`sora_ds.data.answers`). NaN without any.

    Per-example counts go through ``gather_for_metrics``: with several processes accelerate pads the last batches
    by repeating examples, which a plain sum would count twice (and the eval would depend on the process count).
    Ratios are taken once, of the summed counts.
    """
    was_training = model.training
    model.eval()
    totals = torch.zeros(5, dtype=torch.float64, device=accelerator.device)
    for batch in loader:
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
        logits = model(**inputs).logits[:, :-1]
        labels = batch["labels"][:, 1:]
        mask = labels != IGNORE_INDEX
        picked, target = logits[mask].float(), labels[mask]  # fp32 only for the supervised positions
        hit = picked.argmax(-1) == target
        per_token = torch.stack([F.cross_entropy(picked, target, reduction="none").double(),
                                 torch.ones_like(target, dtype=torch.float64), hit.double()], dim=1)
        per_example = torch.zeros(labels.shape[0], 5, dtype=torch.float64, device=per_token.device)
        per_example[:, :3].index_add_(0, mask.nonzero()[:, 0], per_token)
        if "answer_span" in batch:
            position = torch.arange(1, labels.shape[1] + 1, device=labels.device)  # of the token each label predicts
            span = batch["answer_span"]
            answer = (position >= span[:, :1]) & (position < span[:, 1:]) & mask
            hits = torch.zeros_like(mask)
            hits[mask] = hit
            per_example[:, 3] = answer.sum(1).double()
            per_example[:, 4] = (answer & hits).sum(1).double()
        totals += accelerator.gather_for_metrics(per_example).sum(0)
    check_4bit_layout(model)
    release_gathered(model)  # ZeRO-3: back to this rank's share before training or an export gathers again
    model.train(was_training)
    n = max(totals[1].item(), 1.0)
    answer = totals[4].item() / totals[3].item() if totals[3].item() else math.nan
    return {"loss": totals[0].item() / n, "token_accuracy": totals[2].item() / n, "answer_accuracy": answer}
