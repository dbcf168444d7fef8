"""Adapter configurations: SoRA (gated LoRA with a proximal gate step) and AdaLoRA (SVD form with a global budget).

Example::

    inject(model, SoRAConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    inject(model, AdaLoRAConfig(r=12, target_r=8, t_init=20, t_final=60, total_step=200))

Both put the same layer in the model, ``scale * B diag(g) A`` with ``scale = lora_alpha / r``: SoRA's gate ``g`` is
AdaLoRA's singular-value vector ``E``. The scale is fixed by the *initial* rank and is not re-scaled when ranks die
(AdaLoRA's authors found re-scaling hurt), which is what lets a pruned module keep its outputs exactly; so
compaction and the PEFT LoRA export are shared.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .budget import BudgetSchedule
from .errors import ConfigError

GATE_INITS = ("normal", "ones")


@dataclass
class AdapterConfig:
    """What every adapter shares.

    Attributes:
        r: start rank of every branch (the gate has ``r`` entries).
        lora_alpha: numerator of the fixed branch scale ``lora_alpha / r``.
        target_modules: module-name suffixes (``["q_proj", "v_proj"]``, matched on whole dotted components) or one
            regular expression matched against the full module name (``r".*\\.(q|v)_proj"``).
        lora_dropout: dropout on the branch input.
        modules_to_save: modules trained in full beside the adapters (e.g. ``["classifier"]`` for a sequence
            classification head); exported the way PEFT's ``modules_to_save`` are.
        init_seed: if set, branch weights are drawn from a generator seeded per module name, so the same model gets
            the same adapter whatever the global RNG state (used by tests and by multi-rank runs).
    """

    r: int = 8
    lora_alpha: float = 16.0
    target_modules: list[str] | str = field(default_factory=lambda: ["q_proj", "v_proj"])
    lora_dropout: float = 0.0
    modules_to_save: list[str] = field(default_factory=list)
    init_seed: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.r, int) or self.r < 1:
            raise self.error("r", f"must be a positive integer, got {self.r!r}")
        if not self.lora_alpha > 0:
            raise self.error("lora_alpha", f"must be > 0, got {self.lora_alpha!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise self.error("lora_dropout", f"must be in [0, 1), got {self.lora_dropout!r}")
        targets = self.target_modules
        if isinstance(targets, str):
            if not targets:
                raise self.error("target_modules", "is an empty string; give names or a regex")
            try:
                re.compile(targets)
            except re.error as e:
                raise self.error("target_modules", f"{targets!r} is not a valid regular expression: {e}") from None
        elif not targets or not all(isinstance(t, str) and t for t in targets):
            raise self.error(
                "target_modules", f"must be a non-empty list of module names or a regex string, got {targets!r}"
            )

    def error(self, key: str, problem: str) -> ConfigError:
        return ConfigError(key, problem, type(self).__name__)

    @property
    def scale(self) -> float:
        return self.lora_alpha / self.r

    @property
    def layer_init(self) -> str:
        """How :class:`sora_ds.adapters.layer.GatedLoRALinear` initialises the branch."""
        raise NotImplementedError


@dataclass
class SoRAConfig(AdapterConfig):
    """SoRA. ``gate_init``: ``"normal"`` (standard normal, the authors' choice) or ``"ones"`` (starts as plain
    LoRA). The sparsity strength is an optimizer setting (``sparse_lambda``, see :func:`sora_ds.build_optimizer`)."""

    gate_init: str = "normal"  # normal (standard normal, the authors' choice) or ones (starts as plain LoRA)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.gate_init not in GATE_INITS:
            raise self.error("gate_init", f"must be one of {list(GATE_INITS)}, got {self.gate_init!r}")

    @property
    def layer_init(self) -> str:
        return self.gate_init


@dataclass
class AdaLoRAConfig(AdapterConfig):
    """AdaLoRA (Zhang et al., ICLR 2023): ``delta W = P diag(E) Q * lora_alpha / r``, P and Q ~ N(0, 0.02), E = 0.

    ``r`` is the initial rank of every matrix; one global budget of ``target_r * n_matrices`` triplets is reached by
    the cubic schedule of :class:`sora_ds.adapters.budget.BudgetSchedule` (``t_init``, ``t_final``, ``delta_t``,
    ``total_step``, all counted in optimizer steps). ``importance_beta1`` / ``importance_beta2`` smooth the
    sensitivity and its uncertainty; ``orth_reg_weight`` weighs the orthogonality penalty on P and Q.
    """

    r: int = 12
    target_r: int = 8  # the average rank the global budget ends at
    t_init: int = 0  # steps before the budget starts to decrease
    t_final: int = 0  # steps at the end with the final budget (masks fixed)
    delta_t: int = 1  # steps between rank re-allocations
    total_step: int = 1000
    importance_beta1: float = 0.85  # EMA factor of the sensitivity
    importance_beta2: float = 0.85  # EMA factor of its uncertainty
    orth_reg_weight: float = 0.5  # weight of the orthogonality penalty on P and Q

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in ("importance_beta1", "importance_beta2"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise self.error(key, f"must be in [0, 1), got {getattr(self, key)!r}")
        if self.orth_reg_weight < 0:
            raise self.error("orth_reg_weight", f"must be >= 0, got {self.orth_reg_weight!r}")
        self.budget(1)  # schedule errors (e.g. no budget-decreasing phase) now, not mid-training

    def budget(self, n_matrices: int) -> BudgetSchedule:
        try:
            return BudgetSchedule(
                init_r=self.r,
                target_r=self.target_r,
                n_matrices=n_matrices,
                t_init=self.t_init,
                t_final=self.t_final,
                total_step=self.total_step,
                delta_t=self.delta_t,
            )
        except ConfigError as e:
            raise self.error("r" if e.key == "init_r" else e.key, e.problem) from None

    @property
    def layer_init(self) -> str:
        return "adalora"
