"""recipes/llama_adalora.py plus a per-step look into DeepSpeed's fp32 master (run by tests/recipe/test_distributed.py).

After every optimizer step, every rank gathers the fp32 master copy of each E (``safe_get_full_fp32_param``, a
collective) and rank 0 appends to ``master_check.jsonl``: the step, the budget, how many triplets the allocator
has pruned, and how many of those are not exactly zero in the master. A mask written only to the model's
low-precision copy (PEFT's way) would show up here as non-zero pruned entries after the next step.
"""

import json
import sys
from pathlib import Path

import torch
from deepspeed.utils import safe_get_full_fp32_param

from sora_ds.adapters.inject import adapter_layers
from sora_ds.adapters.optim import unwrap_optimizer
from sora_ds.recipe.train import train
from sora_ds.recipe.config import load_config

REPO = Path(__file__).resolve().parents[2]
ADALORA_DEMO = REPO / "recipes" / "llama" / "tiny_adalora_cpu.yaml"


def main() -> None:
    cfg = load_config(sys.argv[1:], ADALORA_DEMO)
    out = Path(cfg.output_dir) / "master_check.jsonl"

    def check(step, model, optimizer):
        allocator = unwrap_optimizer(optimizer).rank_allocator
        gates = [m.gate for _, m in adapter_layers(model)]
        master = torch.cat([safe_get_full_fp32_param(g).reshape(-1) for g in gates])
        pruned = allocator.pruned
        record = {
            "step": step,
            "budget": allocator.budget,
            "pruned": int(pruned.sum()),
            "pruned_nonzero_in_master": int((master[pruned] != 0).sum()),
            "kept_nonzero_in_master": int((master[~pruned] != 0).sum()),
        }
        if torch.distributed.get_rank() == 0:
            with out.open("a") as f:
                f.write(json.dumps(record) + "\n")

    train(cfg, on_step=check)


if __name__ == "__main__":
    main()
