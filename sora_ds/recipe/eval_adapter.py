"""``sora-ds eval``: the eval metrics of a trained adapter on a chat file, without training; the same figures a run
logs (``recipe/evaluate.py``, ``recipe/task_eval.py``), with the adapter loaded by PEFT on its base as a user serves
it. One process.

The settings are the run's (its ``config.yaml``: ``max_length``, ``truncation``, the batch size and the ``eval_*``
keys) when SOURCE is a run, a checkpoint of one or its ``adapter/``; the config defaults otherwise; ``--KEY VALUE``
overrides any of :data:`KEYS`.
"""

from __future__ import annotations

from pathlib import Path

from .checkpoint import STATE_FILE
from .config import ConfigError, _read_yaml, from_flat, parse_overrides

# The config keys that steer an evaluation (the rest of a run's config is about training).
KEYS = ("max_length", "truncation", "per_device_train_batch_size", "torch_dtype", "eval_max_new_tokens",
        "eval_choices", "eval_samples")


def run_config(source: Path) -> Path | None:
    """The ``config.yaml`` of the run that ``source`` (a run, a checkpoint, a run's adapter/) belongs to, if any."""
    candidates = [source]
    if (source / STATE_FILE).is_file():  # a checkpoint: RUN/checkpoints/checkpoint-N
        candidates.append(source.parent.parent)
    if source.name == "adapter":
        candidates.append(source.parent)
    return next((c / "config.yaml" for c in candidates if (c / "config.yaml").is_file()), None)


def eval_settings(source: Path, dataset: str, argv: list[str]):
    """The :class:`TrainConfig` holding the evaluation's settings: the run's, then ``argv``'s ``--KEY VALUE``."""
    _, overrides = parse_overrides(argv)
    unknown = sorted(set(overrides) - set(KEYS))
    if unknown:
        raise ConfigError(unknown[0], f"is not an evaluation setting; sora-ds eval takes --dataset, --base, --out and "
                          f"{', '.join('--' + k for k in KEYS)}")
    config = run_config(source)
    saved = {k: v for k, v in _read_yaml(str(config) if config else None).items() if k in KEYS}
    sources = {k: str(config) for k in saved} | {k: "command line" for k in overrides} | {"eval_dataset": "--dataset"}
    return from_flat({**saved, **overrides, "eval_dataset": dataset}, sources)


def evaluate_adapter(adapter: Path, cfg, base: str | None = None) -> tuple[dict, list[dict], dict]:
    """``(metrics, samples, data counts)`` of ``adapter`` (a PEFT adapter folder) on its base (or ``base``) over
    ``cfg.eval_dataset``. The data and candidates are checked before the model is loaded."""
    import functools

    import torch
    from accelerate import Accelerator
    from torch.utils.data import DataLoader

    from ..data.chat import collate, eval_set
    from .generate import base_of, peft_model, tokenizer_for
    from .task_eval import Evaluator, build_task

    base = base_of(adapter, base)
    tokenizer = tokenizer_for(adapter, base)
    eval_ds, counts = eval_set(cfg.eval_dataset, tokenizer, cfg.max_length, cfg.truncation)
    task = build_task(eval_ds, tokenizer, cfg)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    model = peft_model(adapter, base, cfg.torch_dtype).to(accelerator.device)
    loader = DataLoader(eval_ds, cfg.per_device_train_batch_size,
                        collate_fn=functools.partial(collate, pad_token_id=tokenizer.pad_token_id))
    evaluator = Evaluator(accelerator.prepare(loader), task, accelerator, tokenizer, out=None)
    metrics = evaluator(model, step=0)
    return metrics, evaluator.samples, counts
