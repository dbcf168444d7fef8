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
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass

from .errors import ConfigError

LAMBDA_SCHEDULES = ("constant", "linear", "loglinear", "exp")
_EXP_RATE = 5.0  # shape of the saturating "exp" ramp: ~92% of the rise by mid-ramp


@dataclass(frozen=True)
class LambdaSchedule:
    sparse_lambda: float = 1.0
    lambda_schedule: str = "constant"
    lambda_start: float = 0.0
    lambda_ramp_steps: int | None = None  # None: the whole run; the recipe and AdapterTrainer fill in max_steps (over)
    sparsify_stages: int = 0

    def __post_init__(self) -> None:
        if self.lambda_schedule not in LAMBDA_SCHEDULES:
            raise self.error("lambda_schedule", f"must be one of {list(LAMBDA_SCHEDULES)}, got {self.lambda_schedule!r}")
        for key in ("sparse_lambda", "lambda_start"):
            if getattr(self, key) < 0:
                raise self.error(key, f"must be >= 0, got {getattr(self, key)}")
        if self.ramped and self.lambda_ramp_steps is not None and self.lambda_ramp_steps < 1:
            raise self.error("lambda_ramp_steps", f"must be >= 1 for lambda_schedule={self.lambda_schedule!r} / "
                             f"sparsify_stages={self.sparsify_stages}, got {self.lambda_ramp_steps}")
        if self.lambda_schedule == "loglinear" and self.lambda_start <= 0:
            raise self.error("lambda_start", f"must be > 0 for lambda_schedule='loglinear', got {self.lambda_start}")
        if self.sparsify_stages < 0 or self.sparsify_stages == 1:
            raise self.error("sparsify_stages", f"must be 0 (off) or >= 2, got {self.sparsify_stages}")
        if self.sparsify_stages > (self.lambda_ramp_steps or 0) > 0:
            raise self.error("sparsify_stages", f"={self.sparsify_stages} exceeds lambda_ramp_steps={self.lambda_ramp_steps}")

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

    def _ramp(self, frac: float) -> float:
        lo, hi = self.lambda_start, self.sparse_lambda
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
        if not self.ramped:
            return self.sparse_lambda
        if self.sparsify_stages:
            return self._ramp(self.stage(step) / (self.sparsify_stages - 1))
        return self._ramp(min(step / self._ramp_steps, 1.0))


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
