"""AdaLoRA fine-tuning: the same entry as llama_sora.py, whose demo is AdaLoRA.

    accelerate launch recipes/llama_adalora.py                                      # the CPU demo, tiny_adalora_cpu.yaml
    accelerate launch recipes/llama_adalora.py --config recipes/llama/8b_adalora.yaml

With no ``--config`` it runs ``recipes/llama/tiny_adalora_cpu.yaml``. With one, the YAML decides everything,
including ``method``: this script and llama_sora.py then do the same thing.
"""

from pathlib import Path

from sora_ds.recipe.train import main

if __name__ == "__main__":
    main(default_config=Path(__file__).parent / "llama" / "tiny_adalora_cpu.yaml")
