"""What runs under the adapters: where weights live and how they move.

- :mod:`.deepspeed`: every read of DeepSpeed internals and of ZeRO-partitioned parameters (the one sharding engine
  today). The rest of sora_ds only calls the functions re-exported below, so a second engine (FSDP2) can be added
  beside it by providing the same functions.
- :mod:`.quantized`: bitsandbytes 4-bit / 8-bit base layers (layout pinning, dequantizing for merges).
- :mod:`.host_memory`: glibc settings that give freed host memory back (ZeRO-3 gathers whole layers, often).
- :mod:`.atomic`: atomic folder writes (a crash mid-save leaves the last good copy intact).

Nothing here knows about adapters, data or recipes.
"""

from .deepspeed import (
    check_deepspeed_internals,
    check_deepspeed_version,
    gathered,
    is_partitioned,
    launch_deepspeed_config,
    local_numel,
    local_shard,
    optimizer_fragments,
    release_gathered,
    sharding_report,
    without_zero_init,
    zero_stage,
)
from .host_memory import return_freed_memory

__all__ = [
    "check_deepspeed_internals",
    "check_deepspeed_version",
    "gathered",
    "is_partitioned",
    "launch_deepspeed_config",
    "local_numel",
    "local_shard",
    "optimizer_fragments",
    "release_gathered",
    "return_freed_memory",
    "sharding_report",
    "without_zero_init",
    "zero_stage",
]
