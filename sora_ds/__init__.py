"""sora-ds: sparse low-rank adaptation (SoRA) and AdaLoRA for large language models."""

from .compact import compact, rank_report
from .adalora import RankAllocator
from .config import AdaLoRAConfig, SoRAConfig
from .export import export_peft, merge_adapters, save_merged
from .inject import TargetError, gate_parameters, inject, sora_modules
from .layer import SoRALinear
from .optim import SoRAAdamW, adalora_budget, build_optimizer, gate_l1_penalty, set_sparse_lambda
from .orthogonal import orth_loss
from .prox import soft_threshold
from .schedule import LambdaSchedule, StageRecorder

__version__ = "0.1.0"

__all__ = [
    "AdaLoRAConfig",
    "LambdaSchedule",
    "RankAllocator",
    "SoRAAdamW",
    "SoRAConfig",
    "SoRALinear",
    "StageRecorder",
    "TargetError",
    "adalora_budget",
    "build_optimizer",
    "compact",
    "export_peft",
    "gate_l1_penalty",
    "gate_parameters",
    "inject",
    "merge_adapters",
    "orth_loss",
    "rank_report",
    "save_merged",
    "set_sparse_lambda",
    "soft_threshold",
    "sora_modules",
]
