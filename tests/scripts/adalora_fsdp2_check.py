"""recipes/llama_adalora.py plus a per-step look into the sharded parameters under FSDP2 (run by
tests/recipe/test_fsdp2.py).

After every optimizer step each rank reads its own rows of every E (the DTensor the optimizer steps, no gather) and
the ranks sum, in one all-reduce: how many pruned entries are not exactly zero, how many kept ones are non-zero,
and how many E entries each rank holds. Rank 0 appends them to ``fsdp2_check.jsonl`` with the budget.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from sora_ds.adapters.inject import adapter_layers
from sora_ds.adapters.optim import unwrap_optimizer
from sora_ds.engine.fsdp import shard_offset
from sora_ds.recipe.config import load_config
from sora_ds.recipe.train import train

REPO = Path(__file__).resolve().parents[2]
ADALORA_DEMO = REPO / "recipes" / "llama" / "tiny_adalora_cpu.yaml"


def main() -> None:
    cfg = load_config(sys.argv[1:], ADALORA_DEMO)
    out = Path(cfg.output_dir) / "fsdp2_check.jsonl"

    def check(step, model, optimizer):
        allocator = unwrap_optimizer(optimizer).rank_allocator
        counts = torch.zeros(4, dtype=torch.float64)  # pruned non-zero, kept non-zero, E held here, E in full
        for mi, (_, m) in enumerate(adapter_layers(model)):
            assert isinstance(m.gate, DTensor), type(m.gate)
            local = m.gate.to_local()
            start = shard_offset(m.gate)
            pruned = allocator.pruned[mi * allocator.r + start: mi * allocator.r + start + local.numel()]
            counts += torch.tensor([(local[pruned] != 0).sum(), (local[~pruned] != 0).sum(), local.numel(), 0.0],
                                   dtype=torch.float64)
            counts[3] += m.gate.numel() / dist.get_world_size()
        held_here = int(counts[2])
        dist.all_reduce(counts)
        if dist.get_rank() == 0:
            record = {"step": step, "budget": allocator.budget, "pruned": int(allocator.pruned.sum()),
                      "pruned_nonzero": int(counts[0]), "kept_nonzero": int(counts[1]),
                      "rank0_held": held_here, "held": int(counts[2]), "full": round(float(counts[3]))}
            with out.open("a") as f:
                f.write(json.dumps(record) + "\n")

    train(cfg, on_step=check)


if __name__ == "__main__":
    main()
