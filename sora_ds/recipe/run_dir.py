"""The output-folder policy of a training run (the same rule as ``sora-ds export``/``merge``, see
:mod:`sora_ds.recipe.outputs`): a run never writes over another run's files unless told to.

``output_dir`` may hold anything that is not a run file (``RUN_FILES``). When it holds run files, they must belong to
the run being resumed (``resume_from`` a checkpoint of that folder, and only the checkpoints of its lineage);
anything else is refused before a byte is written, naming what is there and the two ways out. With
``overwrite_output_dir: true`` exactly those run files are removed (never other files), after every check passed.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from .checkpoint import checkpoint_run_ids, point_latest, remove_partial_saves
from .outputs import OutputError

# Every file and folder a run writes into output_dir.
RUN_FILES = ("config.yaml", "metrics.jsonl", "summary.json", "rank_heatmap.png", "adapter", "adapter_uniform",
             "adapter_vllm", "merged", "base_model", "checkpoints", "eval_samples.jsonl",
             "tensorboard")


def conflicting_files(out: Path, resumed: Path | None, lineage: list[str], overwrite: bool) -> list[Path]:
    """The run files in ``out`` that this run must not write beside: all of them, unless ``resumed`` (the checkpoint
    being resumed) lies in ``out/checkpoints``; then only the checkpoints outside its ``lineage``. Raises
    :class:`OutputError` if there are any and ``overwrite`` is off; returns them (to be removed) otherwise."""
    if out.exists() and not out.is_dir():
        raise OutputError(f"output_dir={str(out)!r} is a file, not a folder; choose a folder for the run's outputs")
    root = out / "checkpoints"
    if resumed is not None and resumed.resolve().parent == root.resolve():
        found = [root / name for name in checkpoint_run_ids(root) if name not in lineage]
        what = "checkpoints that are not in the history of the one you resume (another run's, or steps after it)"
    else:
        found = [out / name for name in RUN_FILES if (out / name).exists()]
        what = "the files of another run"
    if found and not overwrite:
        names = ", ".join(str(p.relative_to(out)) for p in found)
        raise OutputError(
            f"output_dir={str(out)!r} holds {what}: {names}. Nothing was written. Continue that run with "
            "--resume_from latest, choose another output_dir, or pass --overwrite_output_dir true to delete exactly "
            "these and start over"
        )
    return found


def prepare(out: Path, remove: list[Path], resumed: Path | None) -> None:
    """Main process, after every check: remove the conflicting run files (``overwrite_output_dir``), the temporary
    folders of killed saves and exports, and point ``latest`` at the resumed checkpoint if the newer ones were removed."""
    for path in remove:
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    root = out / "checkpoints"
    remove_partial_saves(root)
    for name in RUN_FILES:  # atomic_dir's temporary folders (".NAME.tmp-*") of a killed earlier run
        for tmp in out.glob(f".{name}.tmp-*"):
            shutil.rmtree(tmp, ignore_errors=True)
    if resumed is not None and remove and resumed.resolve().parent == root.resolve():
        point_latest(root, resumed.name)
    out.mkdir(parents=True, exist_ok=True)
