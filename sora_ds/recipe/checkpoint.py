"""Training checkpoints: optimizer/scheduler/RNG state through accelerate (DeepSpeed's sharded engine state under
ZeRO), only the trainable weights (never the frozen base), the loop's own state, the PEFT adapter and a manifest.

Layout: ``output_dir/checkpoints/checkpoint-100/`` (the Trainer's naming) plus ``output_dir/checkpoints/latest``, a
relative symlink to the newest complete one (so ``.../checkpoints/latest/adapter`` is a path any tool can open).
Every rank writes into a hidden ``.checkpoint-N.tmp`` folder; only after all ranks finished does rank 0 write the manifest
(:mod:`sora_ds.recipe.manifest`), rename the folder and then repoint ``latest``, so a crash mid-save leaves the
previous checkpoint and pointer intact, and a failed save removes its temporary folder.

Lineage: a run has an id (kept across resumes) and its loop state lists the checkpoints of its own history. Rotation
(``save_total_limit``) deletes only those, oldest first, never the one just written: checkpoints of other runs or of
an abandoned branch in the same folder are never touched.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from ..adapters.export import export_peft
from ..engine.atomic import publish
from .fsdp2 import load_shards, save_shards
from .manifest import CheckpointError, verify_manifest, write_manifest
from .outputs import OutputError, describe_write_error

STATE_FILE = "trainer_state.json"
TMP_GLOB = ".checkpoint-*.tmp"


def _is_deepspeed(accelerator) -> bool:
    return accelerator.state.deepspeed_plugin is not None


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{step}"


def keep_trainable_only(accelerator, plain_model) -> None:
    """Make ``accelerator.save_state`` store the trainable weights only (DeepSpeed: ``exclude_frozen_parameters``)."""
    trainable = {n for n, p in plain_model.named_parameters() if p.requires_grad}

    def hook(models, weights, output_dir):
        for i, sd in enumerate(weights):
            weights[i] = {k: v for k, v in sd.items() if k in trainable}

    accelerator.register_save_state_pre_hook(hook)


def save_checkpoint(
    accelerator, plain_model, output_dir: str | Path, step: int, loop_state: dict, keep: int = 0,
    lineage: list[str] | None = None,
) -> Path:
    """Collective: every rank calls it. Returns the checkpoint folder. ``loop_state`` (with ``run_id``) is saved
    with it; ``lineage`` (this run's checkpoint names, oldest first) gains the new name, in place, and is saved as
    ``loop_state["checkpoints"]``. ``keep > 0``: afterwards at most ``keep`` checkpoints of the lineage remain (older
    ones are deleted only once the new one and its pointer are in place)."""
    root = Path(output_dir) / "checkpoints"
    name = checkpoint_name(step)
    tmp, final = root / f".{name}.tmp", root / name
    lineage = [] if lineage is None else lineage
    lineage[:] = [n for n in lineage if n != name] + [name]
    loop_state = {**loop_state, "checkpoints": list(lineage)}
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    try:
        extra = {"exclude_frozen_parameters": True} if _is_deepspeed(accelerator) else {}
        accelerator.save_state(str(tmp), **extra)
        save_shards(accelerator, plain_model, tmp)
        export_peft(plain_model, tmp / "adapter")
        if accelerator.is_main_process:
            (tmp / STATE_FILE).write_text(json.dumps(loop_state))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            publish(tmp)
            write_manifest(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            point_latest(root, name)
    except (OSError, RuntimeError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if not _write_failure(e):
            raise
        raise OutputError(f"checkpoint at step {step}: {describe_write_error(e, tmp)}") from e
    if accelerator.is_main_process and keep > 0:
        rotate(root, lineage, keep, loop_state["run_id"])
    accelerator.wait_for_everyone()
    return final


def point_latest(root: Path, name: str) -> None:
    """Repoint ``root/latest`` at checkpoint ``name`` in one rename (a relative link: the run folder can move)."""
    pointer = root / ".latest.tmp"
    pointer.unlink(missing_ok=True)
    pointer.symlink_to(name, target_is_directory=True)
    os.replace(pointer, root / "latest")


def latest_checkpoint(root: Path) -> Path | None:
    """The checkpoint ``root/latest`` points at, or None (no pointer, or it names nothing)."""
    pointer = root / "latest"
    if not pointer.is_symlink():
        return None
    target = root / os.readlink(pointer)
    return target if target.is_dir() else None


def _write_failure(e: BaseException) -> bool:
    """An OS write error, or torch.save's RuntimeError for one (a full disk shows as "unexpected pos" or "file
    write failed"); not a collective's timeout, which is a RuntimeError too."""
    text = str(e)
    return isinstance(e, OSError) or any(s in text for s in ("inline_container", "write failed", "No space left"))


def rotate(root: Path, lineage: list[str], keep: int, run_id: str) -> None:
    """Delete the checkpoints of ``lineage`` but the newest ``keep``: only folders whose saved run id is ``run_id``."""
    for name in lineage[:-keep]:
        folder = root / name
        if folder.is_dir() and read_state(folder, check=False).get("run_id") == run_id:
            shutil.rmtree(folder)


def checkpoint_run_ids(root: Path) -> dict[str, str | None]:
    """Name -> run id of every checkpoint folder under ``root`` (None where the state is unreadable)."""
    return {p.name: read_state(p, check=False).get("run_id") for p in sorted(root.glob("checkpoint-*")) if p.is_dir()}


def remove_partial_saves(root: Path) -> None:
    """Temporary folders of saves that were killed (the ``.checkpoint-N.tmp`` of this layout only)."""
    for tmp in root.glob(TMP_GLOB):
        shutil.rmtree(tmp, ignore_errors=True)


def resolve_checkpoint(resume_from: str, output_dir: str | Path) -> Path:
    """``"latest"`` -> the checkpoint ``output_dir/checkpoints/latest`` points at; anything else is a folder path
    (a ``latest`` link included)."""
    if resume_from == "latest":
        root = Path(output_dir) / "checkpoints"
        path = latest_checkpoint(root)
        if path is None:
            raise CheckpointError(f"resume_from='latest' but {root / 'latest'} names no checkpoint (none saved yet)")
    else:
        path = Path(resume_from)
        if path.is_symlink() and path.name == "latest":  # the checkpoint it names (its own name says which step)
            path = latest_checkpoint(path.parent) or path
    if not (path / STATE_FILE).is_file():
        raise CheckpointError(f"resume_from={resume_from!r}: {path} is not a complete sora-ds checkpoint")
    return path


def read_state(path: Path, check: bool = True) -> dict:
    """The loop state saved in checkpoint ``path``; ``check``: verify the manifest first (before any resume)."""
    if check:
        verify_manifest(path)
    try:
        return json.loads((path / STATE_FILE).read_text())
    except (OSError, ValueError):
        if check:
            raise
        return {}


def load_checkpoint(accelerator, path: Path, plain_model=None) -> None:
    """Restore accelerate/DeepSpeed/FSDP2 state from ``path`` (whose manifest :func:`read_state` has verified)."""
    extra = {"load_module_strict": False} if _is_deepspeed(accelerator) else {"strict": False}
    accelerator.load_state(str(path), **extra)
    if plain_model is not None:
        load_shards(accelerator, plain_model, path)
