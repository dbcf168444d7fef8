"""Where trackers write inside a run folder.

accelerate's TensorBoard tracker writes scalars to ``output_dir/<project name>/`` and its hyperparameters to a second
run in ``output_dir/<project name>/<timestamp>/`` (``SummaryWriter.add_hparams`` without a run name), so one run shows
up in TensorBoard as two, and a resumed run as a third. Here TensorBoard gets one folder, ``output_dir/tensorboard``:
scalars and hyperparameters together (``tensorboard --logdir OUTPUT_DIR`` finds it), and a resumed run drops the
events logged after its checkpoint (``purge_step``) instead of drawing them twice. Other trackers are accelerate's.
"""

from __future__ import annotations

from pathlib import Path

from accelerate.tracking import TensorBoardTracker, on_main_process

TENSORBOARD_DIR = "tensorboard"


class RunTensorBoard(TensorBoardTracker):
    """accelerate's TensorBoard tracker with the run's folder layout (module docstring)."""

    def __init__(self, output_dir: str | Path) -> None:
        super().__init__(TENSORBOARD_DIR, str(output_dir))

    def resume_at(self, step: int) -> None:
        """Before ``start``: events after ``step`` (from the run that was interrupted) are dropped."""
        if step:
            self.init_kwargs["purge_step"] = step + 1

    @on_main_process
    def store_init_configuration(self, values: dict) -> None:
        # "." keeps the hyperparameters in the scalars' run; config.yaml beside them is the readable copy.
        self.writer.add_hparams(values, metric_dict={}, run_name=".")
        self.writer.flush()


def trackers(report_to: list[str], output_dir: str | Path) -> list:
    """``log_with`` for the Accelerator: ``report_to`` with TensorBoard swapped for :class:`RunTensorBoard`."""
    return [RunTensorBoard(output_dir) if name == TENSORBOARD_DIR else name for name in report_to]
