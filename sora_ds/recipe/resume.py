"""What a resume may change: the settings a checkpoint was written with, compared with the resuming run's before
anything is loaded.

A resumed run restores optimizer, scheduler, RNG and data position from the checkpoint, so a changed setting is
either silently ignored (``learning_rate``: the restored scheduler keeps the old one), silently different
(``seed`` builds another base model; another dataset shifts every batch), or a crash deep in PyTorch (another
method or target set). Every key must therefore keep its value, except those that only steer outputs and logging
(``FREE``) and those the user may change on purpose by naming them in ``resume_allow_changes``
(:data:`~sora_ds.recipe.config.RESUME_OPT_IN`).
"""

from __future__ import annotations

import json

from .config import RESUME_OPT_IN, TrainConfig
from .manifest import CheckpointError

# Keys that never affect the numbers: where outputs go, how often they are written, how long a collective may wait.
FREE = frozenset({
    "output_dir", "overwrite_output_dir", "resume_from", "resume_allow_changes", "log_every", "eval_every",
    "save_every", "save_total_limit", "report_to", "save_merged", "export_formats", "gradient_checkpointing", "dist_timeout",
    "deepspeed_config",  # the ZeRO stage and process count are compared instead (the JSON's path may move)
    # which kernels compute the same maths (and the peak the MFU is divided by): speed, not the run's numbers
    "attn_implementation", "use_liger_kernel", "fused_adamw", "torch_compile", "peak_flops_per_device",
    "eval_max_new_tokens", "eval_choices", "eval_samples",  # what is measured, not what is trained
})
WHY = {
    "seed": "it builds the base model and the data order",
    "learning_rate": "the optimizer and scheduler restored from the checkpoint keep the old one",
    "dataset": "the checkpoint's data position indexes that data",
    "max_steps": "the learning-rate, sparsity and budget schedules are laid out over it",
}


def identity(cfg: TrainConfig, data_fingerprint: str, num_processes: int, zero_stage: int,
             fsdp_version: int = 0) -> dict:
    """What a checkpoint records so a resume can be checked (JSON form, as it is read back)."""
    return json.loads(json.dumps({"config": cfg.to_dict(), "data_fingerprint": data_fingerprint,
                                  "num_processes": num_processes, "zero_stage": zero_stage,
                                  "fsdp_version": fsdp_version}))


def check_resume(saved: dict, current: dict, allow: list[str], where: str) -> None:
    """Raise :class:`CheckpointError` naming the first key whose value differs between the checkpoint's ``saved``
    identity and the ``current`` run's, unless it is free or allowed."""
    if "config" not in saved:
        raise CheckpointError(f"{where} records no settings (written by sora-ds < 0.3); resume is refused")
    old, new = saved["config"], current["config"]
    derived = _follows_max_steps(old, new) if "max_steps" in allow else set()
    # Keys that explain others first: another method changes every adapter key, max_steps moves a derived ramp.
    first = ("method", "max_steps")
    for key in sorted(set(old) | set(new), key=lambda k: (first.index(k) if k in first else len(first), k)):
        if key in FREE or key in derived or old.get(key) == new.get(key):
            continue
        if key in allow:
            continue
        why = f" ({WHY[key]})" if key in WHY else ""
        fix = (f"; if the change is intended, add it to resume_allow_changes (--resume_allow_changes '[{key}]')"
               if key in RESUME_OPT_IN else "; drop the change, or start a new run (without resume_from)")
        raise CheckpointError(f"resume_from: {key} was {old.get(key)!r} when {where} was saved and is "
                              f"{new.get(key)!r} now; a resumed run must keep it{why}{fix}")
    if saved["data_fingerprint"] != current["data_fingerprint"]:
        raise CheckpointError(f"resume_from: the data of {new.get('dataset') or 'the built-in set'} differs from the "
                              f"data {where} was trained on (its files' contents changed); resume on the same data, "
                              "or start a new run")
    # (checkpoints of 0.3 record no fsdp_version: none of them was FSDP2)
    for key, what in (("num_processes", "{} processes"), ("zero_stage", "ZeRO stage {}"),
                      ("fsdp_version", "FSDP version {}")):
        if saved.get(key, 0) != current[key]:
            raise CheckpointError(f"resume_from: {where} was saved with {what.format(saved.get(key, 0))}, this run "
                                  f"has {what.format(current[key])}; the sharded optimizer state loads only into the "
                                  "same layout "
                                  "(launch with the same process count and accelerate config: DeepSpeed, FSDP2 or "
                                  "none)")


def _follows_max_steps(old: dict, new: dict) -> set[str]:
    """Keys whose value is derived from ``max_steps`` (``lambda_ramp_steps: null``) and followed it."""
    ramp = "lambda_ramp_steps"
    if ramp in old and old.get(ramp) == old.get("max_steps") and new.get(ramp) == new.get("max_steps"):
        return {ramp}
    return set()
