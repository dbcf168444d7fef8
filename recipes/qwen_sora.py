"""SoRA fine-tuning for Qwen2 / Qwen2.5 models.

    accelerate launch recipes/qwen_sora.py --config recipes/qwen/7b_sora.yaml
    accelerate launch recipes/qwen_sora.py --config recipes/qwen/7b_sora.yaml --r 16

Every key is a field of ``sora_ds.train_config.TrainConfig``; the shipped configs name the model (e.g. Qwen/Qwen2.5-7B-Instruct).
"""

from sora_ds.train import main

# Qwen2 / Qwen2.5 family choices: every linear layer of attention and MLP, start rank 8.
FAMILY_DEFAULTS = {
    "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "r": 8,
    "lora_alpha": 16.0,
    "output_dir": "outputs/qwen_sora",
}

if __name__ == "__main__":
    main(defaults=FAMILY_DEFAULTS)
