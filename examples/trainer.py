"""SoRA and AdaLoRA inside the transformers Trainer (and any subclass, TRL's SFTTrainer too), on a tiny Llama and
random tokens (CPU, seconds)."""
import torch
import trl
from datasets import Dataset
from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments, default_data_collator

from sora_ds import AdaLoRAConfig, LambdaSchedule, SoRAConfig, export_peft, inject, rank_report
from sora_ds.data.tokenizer import build_byte_tokenizer
from sora_ds.recipe.hf_trainer import AdapterTrainer, AdapterTrainerMixin

torch.manual_seed(0)
config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2)
ids = torch.randint(0, 128, (32, 16)).tolist()
ds = Dataset.from_dict({"input_ids": ids, "labels": ids})
collate = default_data_collator
training_args = TrainingArguments(output_dir="trainer_out", max_steps=10, per_device_train_batch_size=8,
                                  learning_rate=1e-2, logging_steps=5, report_to=[], save_strategy="no", use_cpu=True)

model = LlamaForCausalLM(config)
inject(model, SoRAConfig(r=8, target_modules=["q_proj", "v_proj"]))
trainer = AdapterTrainer(model=model, args=training_args, train_dataset=ds, data_collator=collate,
                         sora_schedule=LambdaSchedule(sparse_lambda=1e-3, lambda_schedule="linear"),  # over max_steps
                         threshold_mode="absolute")
trainer.train()
export_peft(trainer.model, "adapter/")


# TRL's SFTTrainer (any Trainer subclass): the mixin goes first. Prompt-completion text, loss on the completions.
class SoRASFTTrainer(AdapterTrainerMixin, trl.SFTTrainer): ...


tokenizer = build_byte_tokenizer()  # offline; any tokenizer works (AutoTokenizer.from_pretrained(...))
pairs = Dataset.from_dict({"prompt": [f"{a} + {b} = " for a in range(8) for b in range(4)],
                           "completion": [f"{a + b}" for a in range(8) for b in range(4)]})
model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                     pad_token_id=tokenizer.pad_token_id))
inject(model, SoRAConfig(r=8, target_modules=["q_proj", "v_proj"]))
sft_args = trl.SFTConfig(output_dir="sft_out", max_steps=10, per_device_train_batch_size=8, learning_rate=1e-2,
                         logging_steps=5, report_to=[], save_strategy="no", use_cpu=True, bf16=False)
trainer = SoRASFTTrainer(model=model, args=sft_args, train_dataset=pairs, processing_class=tokenizer,
                         sora_schedule=1e-3, threshold_mode="absolute")
trainer.train()
print("SFTTrainer kept ranks:", {name: r["kept"] for name, r in rank_report(trainer.model).items()})


# AdaLoRA: inject an AdaLoRAConfig instead; total_step = the Trainer's max_steps. No update_and_allocate call.
model = LlamaForCausalLM(config)
inject(model, AdaLoRAConfig(r=12, target_r=8, t_init=2, t_final=2, delta_t=2, total_step=10,
                            target_modules=["q_proj", "v_proj"]))
trainer = AdapterTrainer(model=model, args=training_args, train_dataset=ds, data_collator=collate)
trainer.train()
