"""AdaLoRA's global rank budget over training (Zhang et al., ICLR 2023): the building block of rank allocation.

With ``b_0 = init_r * n`` and ``b_T = target_r * n`` triplets over ``n`` adapted matrices and ``T = total_step``
optimizer steps (with gradient accumulation: optimizer steps, not micro-batches):

* ``step <= t_init``: full budget ``b_0``, no masking (warm-up);
* ``t_init < step <= T - t_final``: ``b_T + (b_0 - b_T) * (1 - (step - t_init) / (T - t_final - t_init)) ** 3``,
  rounded down; the mask is recomputed when ``step % delta_t == 0``;
* ``step > T - t_final``: ``b_T`` and the mask is fixed (re-applied every step).

Worked example, ``init_r=12, target_r=8, n=4, t_init=10, t_final=20, total_step=110``: b_0 = 48, b_T = 32; at
step 50 the fraction is 0.5, so the budget is int(32 + 16 * 0.125) = 34. The author suggests the decreasing phase
be about half of training.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ConfigError


@dataclass(frozen=True)
class BudgetSchedule:
    init_r: int
    target_r: int
    n_matrices: int
    t_init: int
    t_final: int
    total_step: int
    delta_t: int = 1

    def __post_init__(self) -> None:
        for key in ("init_r", "n_matrices", "total_step", "delta_t"):
            if getattr(self, key) < 1:
                raise ConfigError(key, f"must be >= 1, got {getattr(self, key)}")
        if not 1 <= self.target_r <= self.init_r:
            raise ConfigError("target_r", f"must be in [1, the initial rank {self.init_r}], got {self.target_r}")
        for key in ("t_init", "t_final"):
            if getattr(self, key) < 0:
                raise ConfigError(key, f"must be >= 0, got {getattr(self, key)}")
        if self.t_init >= self.total_step - self.t_final:
            # PEFT issue #2337: an empty budget-decreasing phase ended in an index crash mid-training.
            raise ConfigError(
                "t_init",
                f"={self.t_init} leaves no budget-decreasing phase: it must be < total_step - t_final = "
                f"{self.total_step} - {self.t_final} = {self.total_step - self.t_final}; lower t_init or t_final, "
                "or raise total_step",
            )

    @property
    def initial_budget(self) -> int:
        return self.init_r * self.n_matrices

    @property
    def target_budget(self) -> int:
        return self.target_r * self.n_matrices

    def __call__(self, step: int) -> tuple[int, bool]:
        """``(budget, mask_now)`` after optimizer step ``step``."""
        if step <= self.t_init:
            return self.initial_budget, False
        if step > self.total_step - self.t_final:
            return self.target_budget, True
        frac = 1 - (step - self.t_init) / (self.total_step - self.t_final - self.t_init)
        budget = int((self.initial_budget - self.target_budget) * frac**3 + self.target_budget)
        return budget, step % self.delta_t == 0
