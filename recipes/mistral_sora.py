"""SoRA fine-tuning for Mistral models.

    accelerate launch recipes/mistral_sora.py --config recipes/mistral/7b_sora.yaml
    accelerate launch recipes/mistral_sora.py --config recipes/mistral/7b_sora.yaml --r 16

Every key is a field of ``sora_ds.train_config.TrainConfig``; the shipped configs name the model (e.g. mistralai/Mistral-7B-Instruct-v0.3).
"""

from sora_ds.train import main

# Mistral family choices: every linear layer of attention and MLP, start rank 8.
FAMILY_DEFAULTS = {
    "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "r": 8,
    "lora_alpha": 16.0,
    "output_dir": "outputs/mistral_sora",
}

if __name__ == "__main__":
    main(defaults=FAMILY_DEFAULTS)
