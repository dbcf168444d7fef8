"""AdaLoRA fine-tuning for Llama-family models: the same entry, outputs and keys as llama_sora.py, method adalora.

    accelerate launch recipes/llama_adalora.py                            # embedded CPU default (tiny Llama)
    accelerate launch recipes/llama_adalora.py --config recipes/llama/8b_adalora.yaml

With no arguments it trains the tiny Llama of the SoRA demo on the shipped chat data, offline: every matrix starts
at rank 12 and the global budget falls to an average rank of 8 between steps 20 and 120 of 200, re-allocated every
10 steps. Every key is a field of ``sora_ds.train_config.TrainConfig``.
"""

from sora_ds.train import main

# AdaLoRA's paper settings (12 -> 8, importance smoothing 0.85) on every linear layer; the budget-decreasing phase
# is half of training, as its author recommends.
FAMILY_DEFAULTS = {
    "method": "adalora",
    "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "r": 12,
    "target_r": 8,
    "lora_alpha": 16.0,
    "t_init": 20,
    "t_final": 80,
    "delta_t": 10,
    "orth_reg_weight": 0.5,
    "output_dir": "outputs/llama_adalora",
}

if __name__ == "__main__":
    main(defaults=FAMILY_DEFAULTS)
