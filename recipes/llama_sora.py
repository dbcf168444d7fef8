"""SoRA fine-tuning: the entry script of every recipe YAML.

    accelerate launch recipes/llama_sora.py                                         # the CPU demo, tiny_sora_cpu.yaml
    accelerate launch recipes/llama_sora.py --config recipes/llama/8b_sora.yaml    # any recipe YAML
    accelerate launch recipes/llama_sora.py --config my.yaml --r 16                # plus overrides of any key

With no ``--config`` it runs ``recipes/llama/tiny_sora_cpu.yaml``: a tiny Llama built from a config, trained on the
chat data shipped with sora_ds, offline, in about a minute on 2 CPU cores. A YAML holds the whole run (model, method,
adapter, schedule, data, outputs); every key is documented in ``sora_ds/recipe/config.py``.
"""

from pathlib import Path

from sora_ds.recipe.train import main

if __name__ == "__main__":
    main(default_config=Path(__file__).parent / "llama" / "tiny_sora_cpu.yaml")
