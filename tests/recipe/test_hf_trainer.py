"""SoRA inside transformers' Trainer: its optimizer is AdapterAdamW, lambda follows the schedule, gates prune."""

from __future__ import annotations

import functools

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

import sora_ds
from sora_ds.data.chat import build_datasets, collate
from sora_ds.recipe.hf_trainer import AdapterTrainer
from sora_ds.adapters.schedule import LambdaSchedule
from sora_ds.data.tokenizer import build_byte_tokenizer
from sora_ds.recipe.config import TINY_LLAMA

pytestmark = pytest.mark.recipe


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """A Trainer leaves accelerate's process-wide state configured (TRL's SFTConfig with bf16); later tests build
    their own Accelerator, which must not inherit it."""
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


def test_trainer_trains_sora_with_schedule(tmp_path):
    tok = build_byte_tokenizer()
    train_ds = build_datasets(None, tok, 128, 0, 0).train
    cfg = {k: v for k, v in TINY_LLAMA.items() if k != "model_type"}
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), pad_token_id=tok.pad_token_id, **cfg))
    sora_ds.inject(model, sora_ds.SoRAConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                                             init_seed=0))
    # no lambda_ramp_steps: the ramp spans the Trainer's max_steps (20), as in the recipe
    given = LambdaSchedule(sparse_lambda=2.0, lambda_schedule="linear", lambda_start=0.5)
    schedule = given.over(20)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=20, per_device_train_batch_size=8,
                             learning_rate=1e-2, weight_decay=0.1, logging_steps=10, report_to=[], use_cpu=True,
                             save_strategy="no", lr_scheduler_type="constant", seed=0)
    trainer = AdapterTrainer(model=model, args=args, train_dataset=train_ds,
                          data_collator=functools.partial(collate, pad_token_id=tok.pad_token_id),
                          sora_schedule=given, threshold_mode="lr_scaled")
    result = trainer.train()

    assert isinstance(trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer,
                      sora_ds.AdapterAdamW)
    gate_groups = [g for g in trainer.optimizer.param_groups if g.get("sora_gate")]
    assert len(gate_groups) == 1 and gate_groups[0]["weight_decay"] == 0.0
    assert gate_groups[0]["sparse_lambda"] == schedule(19)  # set before the last optimizer step
    logs = [h for h in trainer.state.log_history if "active_ranks" in h]
    assert [h["lambda"] for h in logs] == [schedule(10), schedule(20)]
    report = sora_ds.rank_report(trainer.model)
    assert 0 < sum(r["kept"] for r in report.values()) < sum(r["initial"] for r in report.values())
    assert logs[-1]["active_ranks"] == sum(r["kept"] for r in report.values())
    assert result.training_loss < 8.0


def tiny_model_and_data():
    tok = build_byte_tokenizer()
    train_ds = build_datasets(None, tok, 128, 0, 0).train
    cfg = {k: v for k, v in TINY_LLAMA.items() if k != "model_type"}
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), pad_token_id=tok.pad_token_id, **cfg))
    return tok, train_ds, model


ADALORA = dict(r=6, target_r=3, lora_alpha=12, target_modules=["q_proj", "v_proj", "down_proj"], t_init=2,
               t_final=4, delta_t=2, total_step=12, init_seed=0)


def train_adalora_with_trainer(tmp_path, batch: int, accumulation: int):
    tok, train_ds, model = tiny_model_and_data()
    sora_ds.inject(model, sora_ds.AdaLoRAConfig(**ADALORA))
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=12, per_device_train_batch_size=batch,
                             gradient_accumulation_steps=accumulation, learning_rate=1e-2, logging_steps=6,
                             report_to=[], use_cpu=True, save_strategy="no", lr_scheduler_type="constant", seed=0,
                             dataloader_drop_last=True)
    trainer = AdapterTrainer(model=model, args=args, train_dataset=train_ds,
                          data_collator=functools.partial(collate, pad_token_id=tok.pad_token_id))
    trainer.train()
    return trainer


def test_trainer_trains_adalora_counting_optimizer_steps(tmp_path):
    """AdaLoRA in the Trainer: no update_and_allocate call; 12 optimizer steps of 2 x 4 accumulated equal 12 steps
    of 8 (the schedule counts optimizer steps; the orthogonality penalty counts once per step), and the final
    budget (3 per matrix on average) is reached."""
    accumulated = train_adalora_with_trainer(tmp_path / "acc", batch=4, accumulation=2)
    whole = train_adalora_with_trainer(tmp_path / "whole", batch=8, accumulation=1)
    inner = accumulated.optimizer.optimizer if hasattr(accumulated.optimizer, "optimizer") else accumulated.optimizer
    assert isinstance(inner, sora_ds.AdapterAdamW)
    assert [g["adalora_step"] for g in inner.param_groups if g.get("adalora")] == [12]
    report = sora_ds.rank_report(accumulated.model)
    assert sum(r["kept"] for r in report.values()) == 3 * len(report)
    assert report == sora_ds.rank_report(whole.model)
    for (_, a), (_, b) in zip(sora_ds.adapter_layers(accumulated.model), sora_ds.adapter_layers(whole.model)):
        torch.testing.assert_close(a.gate, b.gate, rtol=1e-4, atol=1e-5)
    logs = [h for h in accumulated.state.log_history if "budget" in h]
    assert [h["budget"] for h in logs] == [sora_ds.adapters.budget.BudgetSchedule(6, 3, 6, 2, 4, 12, 2)(s)[0] for s in (6, 12)]


def test_trl_sft_trainer_with_the_mixin_trains_sora(tmp_path):
    """TRL's SFTTrainer with AdapterTrainerMixin in front, on TRL's own data path (pre-tokenized prompt-completion
    data, loss on the completion tokens via ``completion_mask``, TRL's collator): the SoRA optimizer, lambda
    schedule and pruning work unchanged."""
    trl = pytest.importorskip("trl")
    from sora_ds.recipe.hf_trainer import AdapterTrainerMixin

    class SoRASFTTrainer(AdapterTrainerMixin, trl.SFTTrainer):
        pass

    tok, train_ds, model = tiny_model_and_data()
    train_ds = train_ds.map(lambda e: {"completion_mask": [int(label != -100) for label in e["labels"]]},
                            remove_columns=["labels", "attention_mask"])
    sora_ds.inject(model, sora_ds.SoRAConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_seed=0))
    args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=20, per_device_train_batch_size=8, learning_rate=1e-2,
                         logging_steps=10, report_to=[], use_cpu=True, save_strategy="no", seed=0,
                         lr_scheduler_type="constant", max_length=128, bf16=False)
    trainer = SoRASFTTrainer(model=model, args=args, train_dataset=train_ds, processing_class=tok, sora_schedule=2.0)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "active_ranks" in h]
    assert [h["lambda"] for h in logs] == [2.0, 2.0]
    report = sora_ds.rank_report(trainer.model)
    assert 0 < sum(r["kept"] for r in report.values()) < sum(r["initial"] for r in report.values())
    assert logs[-1]["loss"] < logs[0]["loss"]
