"""Run a recipe script with bitsandbytes forced onto one of its CPU code paths (see tests/conftest.py).

    accelerate launch ... tests/scripts/with_bnb_cpu_path.py avx512_bf16 recipes/llama_sora.py --max_steps 8 ...

Each 4-bit layer reads ``has_avx512bf16()`` when it is built, so patching it before the recipe loads the model puts
every layer of every rank on that path, whatever the CPU.
"""

import runpy
import sys

import bitsandbytes.nn.modules as bnb_modules

PATHS = ("avx512_bf16", "generic")

if __name__ == "__main__":
    path, script, *args = sys.argv[1:]
    if path not in PATHS:
        raise SystemExit(f"bnb CPU path must be one of {PATHS}, got {path!r}")
    bnb_modules.has_avx512bf16 = lambda: path == "avx512_bf16"
    sys.argv = [script, *args]
    runpy.run_path(script, run_name="__main__")
