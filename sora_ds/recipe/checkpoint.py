"""Training checkpoints: optimizer/scheduler/RNG state through accelerate (DeepSpeed's sharded engine state under
ZeRO), only the trainable weights (never the frozen base), the loop's own state, and the PEFT adapter.

Layout: ``output_dir/checkpoints/step-0000100/`` plus ``output_dir/checkpoints/latest`` (the newest folder's name).
Every rank writes into a hidden ``.step-N.tmp`` folder; only after all ranks finished does rank 0 rename it and
then repoint ``latest``, so a crash mid-save leaves the previous checkpoint and pointer intact.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from ..adapters.export import export_peft

STATE_FILE = "trainer_state.json"


def _is_deepspeed(accelerator) -> bool:
    return accelerator.state.deepspeed_plugin is not None


def keep_trainable_only(accelerator, plain_model) -> None:
    """Make ``accelerator.save_state`` store the trainable weights only (DeepSpeed: ``exclude_frozen_parameters``)."""
    trainable = {n for n, p in plain_model.named_parameters() if p.requires_grad}

    def hook(models, weights, output_dir):
        for i, sd in enumerate(weights):
            weights[i] = {k: v for k, v in sd.items() if k in trainable}

    accelerator.register_save_state_pre_hook(hook)


def save_checkpoint(
    accelerator, plain_model, output_dir: str | Path, step: int, loop_state: dict, keep: int = 0
) -> Path:
    """Collective: every rank calls it. Returns the checkpoint folder. ``keep > 0``: afterwards only the newest
    ``keep`` checkpoints remain (older ones are deleted only once the new one and its pointer are in place)."""
    root = Path(output_dir) / "checkpoints"
    name = f"step-{step:07d}"
    tmp, final = root / f".{name}.tmp", root / name
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    extra = {"exclude_frozen_parameters": True} if _is_deepspeed(accelerator) else {}
    accelerator.save_state(str(tmp), **extra)
    export_peft(plain_model, tmp / "adapter")
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps(loop_state))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        pointer = root / ".latest.tmp"
        pointer.write_text(name)
        os.replace(pointer, root / "latest")
        if keep > 0:
            for old in sorted(root.glob("step-*"))[:-keep]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def resolve_checkpoint(resume_from: str, output_dir: str | Path) -> Path:
    """``"latest"`` -> the folder named by ``output_dir/checkpoints/latest``; anything else is a folder path."""
    if resume_from == "latest":
        pointer = Path(output_dir) / "checkpoints" / "latest"
        if not pointer.is_file():
            raise FileNotFoundError(f"resume_from='latest' but {pointer} does not exist (no checkpoint saved yet)")
        path = pointer.parent / pointer.read_text().strip()
    else:
        path = Path(resume_from)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"resume_from={resume_from!r}: {path} is not a complete sora-ds checkpoint")
    return path


def load_checkpoint(accelerator, path: Path) -> dict:
    """Restore accelerate/DeepSpeed state from ``path`` and return the loop state saved with it."""
    extra = {"load_module_strict": False} if _is_deepspeed(accelerator) else {"strict": False}
    accelerator.load_state(str(path), **extra)
    return json.loads((path / STATE_FILE).read_text())
