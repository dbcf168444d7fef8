"""What runs under the adapters: where weights live and how they move.

- :mod:`.deepspeed`: every read of DeepSpeed internals and of ZeRO-partitioned parameters.
- :mod:`.fsdp`: the same for PyTorch FSDP2 (DTensor parameters of ``fully_shard``), and how sora-ds shards a model.
- :mod:`.sharded`: the interface below, dispatched per parameter to the engine that shards it. The rest of sora_ds
  only calls the functions re-exported here.
- :mod:`.quantized`: bitsandbytes 4-bit / 8-bit base layers (layout pinning, dequantizing for merges).
- :mod:`.host_memory`: glibc settings that give freed host memory back (ZeRO-3 gathers whole layers, often).
- :mod:`.atomic`: atomic folder writes (a crash mid-save leaves the last good copy intact).

Nothing here knows about adapters, data or recipes.
"""

from .deepspeed import (
    check_deepspeed_internals,
    check_deepspeed_version,
    launch_deepspeed_config,
    release_gathered,
    without_zero_init,
    zero_stage,
)
from .host_memory import return_freed_memory
from .sharded import (gathered, is_partitioned, local_numel, local_shard, optimizer_fragments, sharding_report,
                      stepped_values)

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
    "stepped_values",
    "without_zero_init",
    "zero_stage",
]
