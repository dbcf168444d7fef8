"""sora-ds: sparse low-rank adaptation (SoRA) and AdaLoRA for large language models.

Layers (docs/ARCHITECTURE.md): :mod:`sora_ds.engine` (DeepSpeed, bitsandbytes, atomic writes) <- :mod:`sora_ds.adapters`
(the maths) and :mod:`sora_ds.data` <- :mod:`sora_ds.recipe` (config, training loop, CLI, Trainer mixin). The names
below are the library's public API.
"""

import warnings

from .adapters.allocator import RankAllocator
from .adapters.compact import compact, rank_report
from .adapters.config import AdaLoRAConfig, SoRAConfig
from .adapters.export import export_peft, merge_adapters, save_merged
from .adapters.inject import TargetError, adapter_layers, gate_parameters, inject
from .adapters.layer import GatedLoRALinear
from .adapters.optim import AdapterAdamW, adalora_budget, build_optimizer, gate_l1_penalty, set_sparse_lambda
from .adapters.orthogonal import orth_loss
from .adapters.prox import soft_threshold
from .adapters.schedule import LambdaSchedule, StageRecorder
from .adapters.serving import EXPORT_FORMATS, compatibility, export_format, serving_cost

__version__ = "0.4.0"

__all__ = [
    "AdaLoRAConfig",
    "AdapterAdamW",
    "GatedLoRALinear",
    "LambdaSchedule",
    "RankAllocator",
    "SoRAConfig",
    "StageRecorder",
    "TargetError",
    "adalora_budget",
    "adapter_layers",
    "build_optimizer",
    "compact",
    "export_peft",
    "EXPORT_FORMATS",
    "export_format",
    "compatibility",
    "serving_cost",
    "gate_l1_penalty",
    "gate_parameters",
    "inject",
    "merge_adapters",
    "orth_loss",
    "rank_report",
    "save_merged",
    "set_sparse_lambda",
    "soft_threshold",
]

# Names of 0.1, which served AdaLoRA too despite saying SoRA; kept importable for one release.
_RENAMED = {"SoRALinear": "GatedLoRALinear", "SoRAAdamW": "AdapterAdamW", "sora_modules": "adapter_layers"}


def __getattr__(name: str):
    if name in _RENAMED:
        warnings.warn(f"sora_ds.{name} is now sora_ds.{_RENAMED[name]}", DeprecationWarning, stacklevel=2)
        return globals()[_RENAMED[name]]
    raise AttributeError(f"module 'sora_ds' has no attribute {name!r}")
