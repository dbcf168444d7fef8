"""SoRA and AdaLoRA inside the transformers ``Trainer`` (and subclasses such as TRL's ``SFTTrainer``).

    from sora_ds import SoRAConfig, LambdaSchedule, inject
    from sora_ds.recipe.hf_trainer import AdapterTrainer, AdapterTrainerMixin

    inject(model, SoRAConfig(r=8, target_modules=["q_proj", "v_proj"]))
    trainer = AdapterTrainer(model=model, args=training_args, train_dataset=ds, data_collator=collate,
                          sora_schedule=LambdaSchedule(sparse_lambda=1e-3, lambda_schedule="linear"),
                          threshold_mode="absolute")    # the ramp spans max_steps unless lambda_ramp_steps is given
    trainer.train()
    sora_ds.export_peft(trainer.model, "adapter/")

    class SoRASFTTrainer(AdapterTrainerMixin, trl.SFTTrainer): ...   # the same for TRL

    inject(model, AdaLoRAConfig(r=12, target_r=8, t_init=100, t_final=300, delta_t=10, total_step=1000))
    trainer = AdapterTrainer(model=model, args=training_args, ...)     # AdaLoRA: the same trainer, no schedule args

The mixin replaces ``create_optimizer`` (the Trainer's optimizer becomes :class:`sora_ds.AdapterAdamW`: the gates as
their flagged group, or for AdaLoRA the adapter with its rank allocator), sets lambda before every optimizer step
(SoRA) and adds AdaLoRA's orthogonality penalty to the loss; everything else, DeepSpeed included, is the Trainer's
own. The proximal step and the rank allocation run inside the optimizer, so they are correct under ZeRO as in the
recipe, and AdaLoRA needs no ``update_and_allocate`` call. AdaLoRA's ``total_step`` should equal the Trainer's
``max_steps`` (optimizer steps).
"""

from __future__ import annotations

from transformers import Trainer, TrainerCallback

from ..adapters.compact import rank_report
from ..adapters.config import AdaLoRAConfig
from ..adapters.optim import adalora_budget, build_optimizer, set_sparse_lambda
from ..adapters.orthogonal import orth_loss
from ..adapters.schedule import LambdaSchedule


class _LambdaCallback(TrainerCallback):
    def __init__(self, lambda_at) -> None:
        self.lambda_at = lambda_at

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        if optimizer is not None:
            set_sparse_lambda(optimizer, self.lambda_at(state.global_step))


class AdapterTrainerMixin:
    """Mix in front of ``Trainer`` or a subclass. Extra keyword arguments: ``sora_schedule`` (a
    :class:`LambdaSchedule`; a float means a constant lambda), ``threshold_mode``, ``gate_learning_rate``."""

    def __init__(self, *args, sora_schedule: LambdaSchedule | float = 0.0, threshold_mode: str = "lr_scaled",
                 gate_learning_rate: float | None = None, **kwargs):
        if not isinstance(sora_schedule, LambdaSchedule):
            sora_schedule = LambdaSchedule(sparse_lambda=float(sora_schedule))
        if sora_schedule.keep_fraction is not None:
            raise ValueError("sora_schedule.keep_fraction is supported by the sora-ds recipe only (it steers lambda "
                             "from the kept ranks after every step); here give sparse_lambda and a lambda_schedule")
        self.sora_schedule = sora_schedule
        self.sora_threshold_mode = threshold_mode
        self.sora_gate_learning_rate = gate_learning_rate
        super().__init__(*args, **kwargs)
        self.add_callback(_LambdaCallback(self._lambda))

    def _lambda(self, step: int) -> float:
        # lambda_ramp_steps None ramps over the whole run, as in the recipe: the Trainer's max_steps (known once
        # train() has started; args.max_steps before that)
        return self.sora_schedule.over(self.state.max_steps or self.args.max_steps)(step)

    def log(self, logs: dict, *args, **kwargs) -> None:
        # Here rather than in a callback: Trainer records log_history before callbacks see the logs. Every rank
        # logs, so the (ZeRO-3: batched, collective) gate gather in rank_report is entered by all of them.
        if "loss" in logs:
            if self._adalora_config() is not None:
                logs["budget"] = adalora_budget(self.optimizer)
            else:
                logs["lambda"] = self._lambda(self.state.global_step)
            logs["active_ranks"] = sum(r["kept"] for r in rank_report(self.model).values())
        super().log(logs, *args, **kwargs)

    def _adalora_config(self) -> AdaLoRAConfig | None:
        config = getattr(self.model, "adapter_config", None)
        return config if isinstance(config, AdaLoRAConfig) else None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        config = self._adalora_config()
        if config is None or not model.training:
            return result
        # The penalty counts once per optimizer step. The Trainer divides a micro-batch's loss by the accumulation
        # steps unless the loss was already normalised over the whole step (num_items_in_batch); ranks are averaged.
        scaled = self.loss_is_scaled_for_ga if getattr(self, "loss_is_scaled_for_ga", None) is not None else (
            (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func is not None)
        weight = config.orth_reg_weight / (self.current_gradient_accumulation_steps if scaled else 1)
        penalty = orth_loss(self.model, weight)
        if return_outputs:
            loss, outputs = result
            return loss + penalty, outputs
        return result + penalty

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            self.optimizer = build_optimizer(
                model if model is not None else self.model,
                learning_rate=self.args.learning_rate,
                weight_decay=self.args.weight_decay,
                sparse_lambda=self._lambda(0),
                threshold_mode=self.sora_threshold_mode,
                gate_learning_rate=self.sora_gate_learning_rate,
                betas=(self.args.adam_beta1, self.args.adam_beta2),
                eps=self.args.adam_epsilon,
            )
        return self.optimizer


class AdapterTrainer(AdapterTrainerMixin, Trainer):
    """``transformers.Trainer`` training SoRA or AdaLoRA adapters."""
