"""Sparsity-pressure schedules for lambda, and the staged sparsifying scheduler of the SoRA paper.

Ramps go from ``lambda_start`` to ``sparse_lambda`` over ``lambda_ramp_steps`` optimizer steps, then hold.
Worked example, ``lambda_start=1e-3, sparse_lambda=1e-1, lambda_ramp_steps=100``, value at step 50:

* ``constant``: 1e-1 at every step (``lambda_start`` unused)
* ``linear``: 1e-3 + (1e-1 - 1e-3) * 0.5 = 0.0505
* ``loglinear``: geometric, 1e-3 * (1e-1 / 1e-3) ** 0.5 = 0.01 (needs ``lambda_start > 0``)
* ``exp``: saturating, 1e-3 + (1e-1 - 1e-3) * (1 - e^-2.5) / (1 - e^-5) = 0.0925 (most of the rise comes early)

With ``sparsify_stages = S > 0`` the ramp becomes a staircase of S equal stages (the paper's sparsifying
scheduler): stage k of S holds the ramp's value at fraction k / (S - 1), so stage 0 is ``lambda_start`` and the
last stage is ``sparse_lambda``. :class:`StageRecorder` keeps, per stage, the non-zero adapter parameters and the
memorization / generalization ratios.

With ``keep_fraction = k`` lambda is not scheduled but steered (:meth:`LambdaSchedule.next_lambda`): the ramp shape
is applied to the *kept fraction of gate entries* instead, from 1.0 at step 0 to ``k`` at ``lambda_ramp_steps``
(a ramp is required: a jump to the target overshoots), and after every step lambda is multiplied by
``exp(KEEP_GAIN * (kept - target))`` (at most ``e^KEEP_MAX_STEP`` either way), starting from ``sparse_lambda``.
Worked example, ``k = 0.5``, linear ramp of 40 steps: after step 20 the target is 0.75; measuring 0.78 kept raises
lambda by ``e^(10 * 0.03)`` = 1.35x, measuring 0.72 lowers it by the same factor.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass

from .errors import ConfigError

LAMBDA_SCHEDULES = ("constant", "linear", "loglinear", "exp")
_EXP_RATE = 5.0  # shape of the saturating "exp" ramp: ~92% of the rise by mid-ramp
# keep_fraction's controller: lambda changes by e^(KEEP_GAIN * error) per step, the error being kept - target in
# fractions of all gate entries, and stays within KEEP_RANGE times sparse_lambda (a bounded climb back either way).
KEEP_GAIN = 10.0
KEEP_MAX_STEP = 0.5  # at most e^0.5 = 1.65x per step: gates die some steps after lambda rises, so a large error
# met at full gain would overshoot (measured on the CPU demo: a wave of deaths, then lambda swinging)
KEEP_RANGE = 1e3


@dataclass(frozen=True)
class LambdaSchedule:
    sparse_lambda: float = 1.0  # the sparsity strength lambda the schedule ends at (see threshold_mode)
    lambda_schedule: str = "constant"  # constant, linear, loglinear or exp: the ramp from lambda_start
    lambda_start: float = 0.0  # lambda at step 0 of a ramp
    lambda_ramp_steps: int | None = None  # None: the whole run; the recipe and AdapterTrainer fill in max_steps (over)
    sparsify_stages: int = 0  # >= 2: lambda rises in that many equal steps, each stage's scores recorded
    keep_fraction: float | None = None  # None: lambda follows the schedule; else the fraction of gate entries to keep

    def __post_init__(self) -> None:
        if self.lambda_schedule not in LAMBDA_SCHEDULES:
            raise self.error("lambda_schedule", f"must be one of {list(LAMBDA_SCHEDULES)}, got {self.lambda_schedule!r}")
        for key in ("sparse_lambda", "lambda_start"):
            if getattr(self, key) < 0:
                raise self.error(key, f"must be >= 0, got {getattr(self, key)}")
        if self.ramped and self.lambda_ramp_steps is not None and self.lambda_ramp_steps < 1:
            raise self.error("lambda_ramp_steps", f"must be >= 1 for lambda_schedule={self.lambda_schedule!r} / "
                             f"sparsify_stages={self.sparsify_stages}, got {self.lambda_ramp_steps}")
        if self.keep_fraction is not None:
            self._check_keep_fraction()
        elif self.lambda_schedule == "loglinear" and self.lambda_start <= 0:
            raise self.error("lambda_start", f"must be > 0 for lambda_schedule='loglinear', got {self.lambda_start}")
        if self.sparsify_stages < 0 or self.sparsify_stages == 1:
            raise self.error("sparsify_stages", f"must be 0 (off) or >= 2, got {self.sparsify_stages}")
        if self.sparsify_stages > (self.lambda_ramp_steps or 0) > 0:
            raise self.error("sparsify_stages", f"={self.sparsify_stages} exceeds lambda_ramp_steps={self.lambda_ramp_steps}")

    def _check_keep_fraction(self) -> None:
        if not 0 < self.keep_fraction <= 1:
            raise self.error("keep_fraction", f"must be in (0, 1] (the fraction of gate entries to keep), got "
                             f"{self.keep_fraction}")
        if self.sparse_lambda <= 0:
            raise self.error("sparse_lambda", "must be > 0 with keep_fraction: it is the controller's first lambda, "
                             "which it scales up or down")
        if self.lambda_schedule == "constant":
            raise self.error("lambda_schedule", "='constant' gives keep_fraction no ramp to follow (jumping to the "
                             "target kills ranks in a wave and lambda swings); choose linear (the usual), exp or "
                             "loglinear")
        if self.lambda_start != 0:
            raise self.error("lambda_start", f"={self.lambda_start} has no role with keep_fraction (the target ramps "
                             "from keeping everything; lambda starts at sparse_lambda); leave it out")
        if self.sparsify_stages:
            raise self.error("sparsify_stages", "steps lambda through fixed levels, and keep_fraction steers lambda "
                             "itself: use one or the other")

    @property
    def ramped(self) -> bool:
        return self.lambda_schedule != "constant" or self.sparsify_stages > 0

    def over(self, total_steps: int) -> LambdaSchedule:
        """This schedule with an unset ``lambda_ramp_steps`` set to ``total_steps`` (the length of the run)."""
        if self.lambda_ramp_steps is not None:
            return self
        return dataclasses.replace(self, lambda_ramp_steps=total_steps)

    def error(self, key: str, problem: str) -> ConfigError:
        return ConfigError(key, problem, type(self).__name__)

    def _ramp(self, frac: float, lo: float | None = None, hi: float | None = None) -> float:
        """The schedule's shape between ``lo`` (frac 0) and ``hi`` (frac 1); lambda's own endpoints by default."""
        lo = self.lambda_start if lo is None else lo
        hi = self.sparse_lambda if hi is None else hi
        if self.lambda_schedule == "linear":
            return lo + (hi - lo) * frac
        if self.lambda_schedule == "loglinear":
            return math.exp(math.log(lo) + (math.log(hi) - math.log(lo)) * frac) if hi > 0 else lo * (1 - frac)
        if self.lambda_schedule == "exp":
            return lo + (hi - lo) * (1 - math.exp(-_EXP_RATE * frac)) / (1 - math.exp(-_EXP_RATE))
        return hi

    @property
    def _ramp_steps(self) -> int:
        if self.lambda_ramp_steps is None:
            raise self.error("lambda_ramp_steps", "is not set: give it, or the run's length with .over(total_steps) "
                             "(the recipe and AdapterTrainer do that with max_steps)")
        return self.lambda_ramp_steps

    @property
    def stage_steps(self) -> int:
        return self._ramp_steps // self.sparsify_stages if self.sparsify_stages else 0

    def stage(self, step: int) -> int:
        """0-based stage of optimizer step ``step`` (the last stage lasts until the end of training)."""
        if not self.sparsify_stages:
            return 0
        return min(step // self.stage_steps, self.sparsify_stages - 1)

    def is_stage_end(self, step: int) -> bool:
        """True after the last optimizer step of a (non-final) stage: the trainer evaluates there."""
        return bool(self.sparsify_stages) and (step + 1) % self.stage_steps == 0 and self.stage(step) < self.stage(
            step + 1
        )

    def __call__(self, step: int) -> float:
        """lambda for optimizer step ``step`` (0-based)."""
        if self.keep_fraction is not None:
            raise ValueError("with keep_fraction lambda depends on the ranks kept so far: start from sparse_lambda "
                             "and call next_lambda after each step")
        if not self.ramped:
            return self.sparse_lambda
        if self.sparsify_stages:
            return self._ramp(self.stage(step) / (self.sparsify_stages - 1))
        return self._ramp(min(step / self._ramp_steps, 1.0))

    def target_keep(self, done: int) -> float:
        """The fraction of gate entries the run should keep after ``done`` optimizer steps (with ``keep_fraction``)."""
        return self._ramp(min(done / self._ramp_steps, 1.0), 1.0, self.keep_fraction)

    def next_lambda(self, current: float, done: int, kept: float) -> float:
        """lambda for the step after ``done`` steps, from the ``current`` one and the fraction of gate entries
        ``kept`` (non-zero) now: raised while more is kept than :meth:`target_keep`, lowered while less is.

        Lowering lambda also lets pruned ranks come back: a zero gate still gets a gradient (through its rank's
        A row and B column, which stay as they were), and once the AdamW move exceeds ``tau`` it is non-zero again.
        """
        step = math.exp(min(max(KEEP_GAIN * (kept - self.target_keep(done)), -KEEP_MAX_STEP), KEEP_MAX_STEP))
        lo, hi = self.sparse_lambda / KEEP_RANGE, self.sparse_lambda * KEEP_RANGE
        return min(max(current * step, lo), hi)


@dataclass
class StageRecord:
    stage: int
    step: int
    sparse_lambda: float
    nonzero_params: int
    memorization_score: float
    generalization_score: float
    memorization_ratio: float = 1.0
    generalization_ratio: float = 1.0


class StageRecorder:
    """Per-stage records; ratios are each stage's score over the best score of any stage (higher is better)."""

    def __init__(self) -> None:
        self.records: list[StageRecord] = []

    def record(self, **fields) -> StageRecord:
        self.records.append(StageRecord(**fields))
        best_mem = max(r.memorization_score for r in self.records)
        best_gen = max(r.generalization_score for r in self.records)
        for r in self.records:
            r.memorization_ratio = r.memorization_score / best_mem if best_mem else 0.0
            r.generalization_ratio = r.generalization_score / best_gen if best_gen else 0.0
        return self.records[-1]

    @classmethod
    def from_dicts(cls, records: list[dict]) -> StageRecorder:
        recorder = cls()
        recorder.records = [StageRecord(**r) for r in records]
        return recorder

    def as_dicts(self) -> list[dict]:
        return [asdict(r) for r in self.records]
