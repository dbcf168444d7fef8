"""AdaLoRA through ``AdapterTrainer`` (transformers Trainer) on the tiny Llama, optionally under DeepSpeed (run by
tests/recipe/test_distributed.py on 1 process and on 2 ranks with ZeRO-3). Writes ``result.json`` in OUT on rank 0:
per-step losses and the kept ranks per module.

    python tests/scripts/trainer_adalora.py OUT PER_DEVICE_BATCH [DEEPSPEED_JSON]
"""

import functools
import json
import sys
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

import sora_ds
from sora_ds.data.chat import build_datasets, collate
from sora_ds.adapters.compact import adapter_tensors
from sora_ds.recipe.hf_trainer import AdapterTrainer
from sora_ds.data.tokenizer import build_byte_tokenizer
from sora_ds.recipe.config import TINY_LLAMA
from sora_ds.engine import sharding_report


def main(out: str, batch: int, deepspeed: str | None) -> None:
    extra = {}
    if deepspeed and not torch.cuda.is_available():
        # transformers' TrainingArguments picks no process-group backend for DeepSpeed without a GPU (it would train
        # 2 independent copies); set up the distributed state with gloo first and let the Trainer reuse it.
        import os

        from accelerate import PartialState

        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
        PartialState(backend="gloo")
        extra["accelerator_config"] = {"use_configured_state": True}
    args = TrainingArguments(output_dir=out, max_steps=10, per_device_train_batch_size=batch, learning_rate=2e-3,
                             logging_steps=1, report_to=[], use_cpu=deepspeed is None, save_strategy="no",
                             lr_scheduler_type="constant", seed=0, dataloader_drop_last=True, deepspeed=deepspeed, **extra)
    tok = build_byte_tokenizer()
    train_ds = build_datasets(None, tok, 128, 0, 0).train
    torch.manual_seed(0)
    config = {k: v for k, v in TINY_LLAMA.items() if k != "model_type"}
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), pad_token_id=tok.pad_token_id, **config))
    sora_ds.inject(model, sora_ds.AdaLoRAConfig(r=6, target_r=3, lora_alpha=12, target_modules=["q_proj", "v_proj"],
                                                t_init=2, t_final=3, delta_t=1, total_step=10, init_seed=0))
    trainer = AdapterTrainer(model=model, args=args, train_dataset=train_ds,
                          data_collator=functools.partial(collate, pad_token_id=tok.pad_token_id))
    trainer.train()
    report = sora_ds.rank_report(trainer.model)  # collective under ZeRO-3
    modules = [m for _, m in sora_ds.adapter_layers(trainer.model)]
    sharding = sharding_report(trainer.model, adapter_tensors(modules))
    if trainer.is_world_process_zero():
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        kept = {n: r["kept"] for n, r in report.items()}
        budgets = [h["budget"] for h in trainer.state.log_history if "budget" in h]
        Path(out, "result.json").write_text(json.dumps({"losses": losses, "kept": kept, "budgets": budgets, **sharding}))
    if torch.distributed.is_initialized():
        # This script made the process group (the Trainer does not end it, unlike the recipe's end_training): left to
        # interpreter exit, gloo's threads were torn down mid-use and a rank aborted after a good run (about 1 in 12,
        # "terminate called without an active exception").
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else None)
