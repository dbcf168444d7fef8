"""Load a run's adapter with PEFT: a 5-step run of the tiny CPU demo (seconds), then its base_model/ and adapter/."""
from peft import AutoPeftModelForCausalLM, PeftModel
from transformers import AutoModelForCausalLM

from sora_ds.recipe.config import load_config
from sora_ds.recipe.train import train

train(load_config(["--max_steps", "5", "--output_dir", "outputs/example_sora", "--overwrite_output_dir", "true"]))

base = AutoModelForCausalLM.from_pretrained("outputs/example_sora/base_model")
model = PeftModel.from_pretrained(base, "outputs/example_sora/adapter")
# or in one call: adapter_config.json names its base model (base_model_name_or_path)
model = AutoPeftModelForCausalLM.from_pretrained("outputs/example_sora/adapter")
