"""``sora-ds generate``: one reply from an adapter on its base model, through PEFT and the base's chat template.

The quickest check that an exported adapter is the one that was trained: it loads the files a serving engine loads
(any export format) the way PEFT does, on the base that ``adapter_config.json`` names (or ``--base``), and answers one
prompt greedily. CPU or GPU; nothing is written.
"""

from __future__ import annotations

import json
from pathlib import Path


class GenerateError(Exception):
    """The adapter's base cannot be found or loaded (``sora-ds generate`` and ``eval``); one line, exit code 2."""


def base_of(adapter: Path, base: Path | str | None) -> str:
    """The base model to load: ``base`` when given, else the one the adapter's config names."""
    name = str(base) if base else json.loads((adapter / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not name:
        raise GenerateError(f"{adapter}/adapter_config.json names no base model (base_model_name_or_path); pass --base")
    # A Hub id is "name" or "org/name"; anything else is a folder, and a missing one is said as such (transformers
    # would call it an invalid repo id).
    if (Path(name).is_absolute() or name.startswith((".", "~")) or name.count("/") > 1) and not Path(name).is_dir():
        where = "--base" if base else f"{adapter}/adapter_config.json's base_model_name_or_path"
        raise GenerateError(f"{where} is {name!r}: no such folder; pass --base with the base model's folder or Hub id")
    return name


def tokenizer_for(adapter: Path, base: str):
    """The tokenizer saved beside the adapter (a run saves the one it trained with there), else the base's."""
    from transformers import AutoTokenizer

    has_own = any((adapter / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))
    tokenizer = AutoTokenizer.from_pretrained(adapter if has_own else base)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def peft_model(adapter: Path, base: str, dtype: str = "float32"):
    """The base model ``base`` (from :func:`base_of`) with the adapter applied by PEFT, in eval mode."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()  # the reply or the metrics are the output
    try:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=getattr(torch, dtype))
    except OSError as e:  # neither a model folder nor a Hub id that is reachable or cached
        raise GenerateError(f"base model {base}: cannot load it: {str(e).splitlines()[0]}") from e
    return PeftModel.from_pretrained(model, adapter).eval()


def load_with_adapter(adapter: Path, base: Path | str | None = None):
    """``(model, tokenizer)`` for :func:`reply`: the adapter on its base (or ``base``), float32."""
    name = base_of(adapter, base)
    return peft_model(adapter, name), tokenizer_for(adapter, name)


def reply(model, tokenizer, prompt: str, max_new_tokens: int = 64) -> str:
    """The greedy assistant turn for one user ``prompt`` (the chat template's generation prompt appended)."""
    import torch

    if tokenizer.chat_template:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]
    else:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=stop_ids(tokenizer))
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def stop_ids(tokenizer) -> list[int]:
    """The ids that end a reply: EOS and the special token the chat template closes an assistant turn with (which
    the base's generation config may not know, e.g. ``<|end|>``): the first special token after a rendered answer."""
    stops = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if tokenizer.chat_template:
        user = [{"role": "user", "content": "a"}]
        prompt = tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=True, return_dict=True)
        full = tokenizer.apply_chat_template([*user, {"role": "assistant", "content": "b"}], tokenize=True,
                                             return_dict=True)
        after = full["input_ids"][len(prompt["input_ids"]):]
        special = set(tokenizer.all_special_ids)
        stops += [i for i in after if i in special][:1]
    return sorted(set(stops))
