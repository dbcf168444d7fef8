"""Adapter configuration for SoRA.

Example::

    cfg = SoRAConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    inject(model, cfg)

Every SoRA branch computes ``scale * B (g * (A x))`` with ``scale = lora_alpha / r``. The scale is fixed by the
*initial* rank and is not re-scaled when ranks die, which is what lets a pruned module keep its outputs exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

GATE_INITS = ("normal", "ones")


@dataclass
class SoRAConfig:
    """Shape and placement of the SoRA branches.

    Attributes:
        r: start rank of every branch (the gate has ``r`` entries).
        lora_alpha: numerator of the fixed branch scale ``lora_alpha / r``.
        target_modules: module-name suffixes (``["q_proj", "v_proj"]``, matched on whole dotted components) or one
            regular expression matched against the full module name (``r".*\\.(q|v)_proj"``).
        lora_dropout: dropout on the branch input.
        gate_init: ``"normal"`` (standard normal, the authors' choice) or ``"ones"`` (starts as plain LoRA).
        modules_to_save: modules trained in full beside the adapters (e.g. ``["classifier"]`` for a sequence
            classification head); exported the way PEFT's ``modules_to_save`` are.
        init_seed: if set, branch weights are drawn from a generator seeded per module name, so the same model gets
            the same adapter whatever the global RNG state (used by tests and by multi-rank runs).
    """

    r: int = 8
    lora_alpha: float = 16.0
    target_modules: list[str] | str = field(default_factory=lambda: ["q_proj", "v_proj"])
    lora_dropout: float = 0.0
    gate_init: str = "normal"
    modules_to_save: list[str] = field(default_factory=list)
    init_seed: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"SoRAConfig.r must be a positive integer, got {self.r!r}")
        if not self.lora_alpha > 0:
            raise ValueError(f"SoRAConfig.lora_alpha must be > 0, got {self.lora_alpha!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"SoRAConfig.lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.gate_init not in GATE_INITS:
            raise ValueError(f"SoRAConfig.gate_init must be one of {GATE_INITS}, got {self.gate_init!r}")
        targets = self.target_modules
        if isinstance(targets, str):
            if not targets:
                raise ValueError("SoRAConfig.target_modules is an empty string; give names or a regex")
        elif not targets or not all(isinstance(t, str) and t for t in targets):
            raise ValueError(
                f"SoRAConfig.target_modules must be a non-empty list of module names or a regex string, got {targets!r}"
            )

    @property
    def scale(self) -> float:
        return self.lora_alpha / self.r
