"""SoRA fine-tuning for Llama-family models.

    accelerate launch recipes/llama_sora.py                               # embedded CPU default (tiny Llama)
    accelerate launch recipes/llama_sora.py --config my.yaml --r 16       # YAML plus overrides of any key

With no arguments it builds a tiny Llama from a config and trains it on the chat data shipped with sora_ds,
offline, in about a minute on 2 CPU cores. Every key is a field of ``sora_ds.train_config.TrainConfig``.
"""

from sora_ds.train import main

# Llama family choices (also SmolLM2, which is a Llama): every linear layer of attention and MLP, start rank 8 (the SoRA paper's setting).
FAMILY_DEFAULTS = {
    "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "r": 8,
    "lora_alpha": 16.0,
    "output_dir": "outputs/llama_sora",
}

if __name__ == "__main__":
    main(defaults=FAMILY_DEFAULTS)
