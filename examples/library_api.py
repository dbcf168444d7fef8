"""The library API with your own training loop, on a tiny Llama built from a config (CPU, seconds)."""
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import sora_ds


def tiny_llama():  # any Llama-class model; from_pretrained works the same
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2))


ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
batch = {"input_ids": ids, "labels": ids}

model = tiny_llama()
sora_ds.inject(model, sora_ds.SoRAConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
optimizer = sora_ds.build_optimizer(model, learning_rate=1e-2, sparse_lambda=5.0, threshold_mode="lr_scaled")
for step in range(10):
    model(**batch).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
print(sora_ds.rank_report(model))                      # {module: {"initial": 8, "kept": 5}, ...}
sora_ds.export_peft(model, "adapter/")                 # PEFT LoRA adapter with per-module ranks
sora_ds.export_format(model, "vllm", "adapter_vllm/")  # or "peft", "uniform", "merged" (sora_ds.EXPORT_FORMATS)
sora_ds.compact(model)                                 # in place: plain LoRA modules of their kept rank
sora_ds.save_merged(model, "merged/")                  # adapters folded into the base weights

# AdaLoRA: same calls; the optimizer allocates ranks itself, the loss takes the orthogonality penalty
model = tiny_llama()
sora_ds.inject(model, sora_ds.AdaLoRAConfig(r=12, target_r=8, t_init=2, t_final=2, delta_t=2, total_step=10,
                                            target_modules=["q_proj", "v_proj"]))
optimizer = sora_ds.build_optimizer(model, learning_rate=1e-2)
for step in range(10):
    loss = model(**batch).loss + sora_ds.orth_loss(model, 0.5)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
print(sora_ds.rank_report(model))                      # 8 of 12 ranks kept on average
