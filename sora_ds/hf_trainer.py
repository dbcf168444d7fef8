"""SoRA inside the transformers ``Trainer`` (and subclasses such as TRL's ``SFTTrainer``).

    from sora_ds import SoRAConfig, LambdaSchedule, inject
    from sora_ds.hf_trainer import SoRATrainer, SoRATrainerMixin

    inject(model, SoRAConfig(r=8, target_modules=["q_proj", "v_proj"]))
    trainer = SoRATrainer(model=model, args=training_args, train_dataset=ds, data_collator=collate,
                          sora_schedule=LambdaSchedule(sparse_lambda=1e-3, lambda_schedule="linear",
                                                       lambda_ramp_steps=1000), threshold_mode="absolute")
    trainer.train()
    sora_ds.export_peft(trainer.model, "adapter/")

    class SoRASFTTrainer(SoRATrainerMixin, trl.SFTTrainer): ...   # the same for TRL

The mixin only replaces ``create_optimizer`` (the Trainer's optimizer becomes :class:`sora_ds.SoRAAdamW` with the
gates as their flagged group) and sets lambda before every optimizer step; everything else, DeepSpeed included, is
the Trainer's own. The proximal step runs inside the optimizer, so it is correct under ZeRO as in the recipe.
"""

from __future__ import annotations

from transformers import Trainer, TrainerCallback

from .compact import rank_report
from .optim import build_optimizer, set_sparse_lambda
from .schedule import LambdaSchedule


class _LambdaCallback(TrainerCallback):
    def __init__(self, schedule: LambdaSchedule) -> None:
        self.schedule = schedule

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        if optimizer is not None:
            set_sparse_lambda(optimizer, self.schedule(state.global_step))


class SoRATrainerMixin:
    """Mix in front of ``Trainer`` or a subclass. Extra keyword arguments: ``sora_schedule`` (a
    :class:`LambdaSchedule`; a float means a constant lambda), ``threshold_mode``, ``gate_learning_rate``."""

    def __init__(self, *args, sora_schedule: LambdaSchedule | float = 0.0, threshold_mode: str = "lr_scaled",
                 gate_learning_rate: float | None = None, **kwargs):
        if not isinstance(sora_schedule, LambdaSchedule):
            sora_schedule = LambdaSchedule(sparse_lambda=float(sora_schedule))
        self.sora_schedule = sora_schedule
        self.sora_threshold_mode = threshold_mode
        self.sora_gate_learning_rate = gate_learning_rate
        super().__init__(*args, **kwargs)
        self.add_callback(_LambdaCallback(sora_schedule))

    def log(self, logs: dict, *args, **kwargs) -> None:
        # Here rather than in a callback: Trainer records log_history before callbacks see the logs. Every rank
        # logs, so the (ZeRO-3: batched, collective) gate gather in rank_report is entered by all of them.
        if "loss" in logs:
            logs["lambda"] = self.sora_schedule(self.state.global_step)
            logs["active_ranks"] = sum(r["kept"] for r in rank_report(self.model).values())
        super().log(logs, *args, **kwargs)

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            self.optimizer = build_optimizer(
                model if model is not None else self.model,
                learning_rate=self.args.learning_rate,
                weight_decay=self.args.weight_decay,
                sparse_lambda=self.sora_schedule(0),
                threshold_mode=self.sora_threshold_mode,
                gate_learning_rate=self.sora_gate_learning_rate,
                betas=(self.args.adam_beta1, self.args.adam_beta2),
                eps=self.args.adam_epsilon,
            )
        return self.optimizer


class SoRATrainer(SoRATrainerMixin, Trainer):
    """``transformers.Trainer`` training SoRA adapters."""
