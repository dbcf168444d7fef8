"""SoRA inside transformers' Trainer: its optimizer is SoRAAdamW, lambda follows the schedule, gates prune."""

from __future__ import annotations

import functools

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

import sora_ds
from sora_ds.chat_data import build_datasets, collate
from sora_ds.hf_trainer import SoRATrainer
from sora_ds.schedule import LambdaSchedule
from sora_ds.tokenizer import build_byte_tokenizer
from sora_ds.train_config import TINY_LLAMA

pytestmark = pytest.mark.recipe


def test_trainer_trains_sora_with_schedule(tmp_path):
    tok = build_byte_tokenizer()
    train_ds, _ = build_datasets(None, tok, 128, 0, 0)
    cfg = {k: v for k, v in TINY_LLAMA.items() if k != "model_type"}
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), pad_token_id=tok.pad_token_id, **cfg))
    sora_ds.inject(model, sora_ds.SoRAConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                                             init_seed=0))
    schedule = LambdaSchedule(sparse_lambda=2.0, lambda_schedule="linear", lambda_start=0.5, lambda_ramp_steps=20)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=20, per_device_train_batch_size=8,
                             learning_rate=1e-2, weight_decay=0.1, logging_steps=10, report_to=[], use_cpu=True,
                             save_strategy="no", lr_scheduler_type="constant", seed=0)
    trainer = SoRATrainer(model=model, args=args, train_dataset=train_ds,
                          data_collator=functools.partial(collate, pad_token_id=tok.pad_token_id),
                          sora_schedule=schedule, threshold_mode="lr_scaled")
    result = trainer.train()

    assert isinstance(trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer,
                      sora_ds.SoRAAdamW)
    gate_groups = [g for g in trainer.optimizer.param_groups if g.get("sora_gate")]
    assert len(gate_groups) == 1 and gate_groups[0]["weight_decay"] == 0.0
    assert gate_groups[0]["sparse_lambda"] == schedule(19)  # set before the last optimizer step
    logs = [h for h in trainer.state.log_history if "active_ranks" in h]
    assert [h["lambda"] for h in logs] == [schedule(10), schedule(20)]
    report = sora_ds.rank_report(trainer.model)
    assert 0 < sum(r["kept"] for r in report.values()) < sum(r["initial"] for r in report.values())
    assert logs[-1]["active_ranks"] == sum(r["kept"] for r in report.values())
    assert result.training_loss < 8.0
