"""Helpers the tests share (fixtures built on them are in conftest.py)."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import torch

from sora_ds import SoRAConfig, inject
from sora_ds.adapters.inject import adapter_layers
from sora_ds.adapters.optim import build_optimizer

REPO = Path(__file__).resolve().parents[1]
SORA_DEMO = REPO / "recipes" / "llama" / "tiny_sora_cpu.yaml"  # what `recipes/llama_sora.py` runs with no --config
ADALORA_DEMO = REPO / "recipes" / "llama" / "tiny_adalora_cpu.yaml"  # and `recipes/llama_adalora.py`

# bitsandbytes' two CPU 4-bit code paths (see the bnb_cpu_path fixture in conftest.py): every 4-bit test runs on both.
BNB_CPU_PATHS = ("avx512_bf16", "generic")

# A Llama small enough for unit tests; tests pass other sizes as overrides where they need them.
TINY_LLAMA = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128)
DECODERS = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "mistral": ("MistralConfig", "MistralForCausalLM"),
            "qwen2": ("Qwen2Config", "Qwen2ForCausalLM")}


def build_decoder(kind: str = "llama", seed: int = 0, **overrides):
    """A randomly initialised (seeded) causal LM of family ``kind`` (llama, mistral, qwen2): ``TINY_LLAMA`` sizes with
    ``overrides``."""
    import transformers

    config_cls, model_cls = (getattr(transformers, name) for name in DECODERS[kind])
    torch.manual_seed(seed)
    return model_cls(config_cls(**{**TINY_LLAMA, **overrides}))


def build_llama(seed: int = 0, **overrides):
    return build_decoder("llama", seed, **overrides)


def build_bert(seed: int = 0):
    """A tiny BERT sequence classifier (a non-decoder with a head to train in full: ``modules_to_save``)."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    return BertForSequenceClassification(BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2,
                                                    num_attention_heads=4, intermediate_size=128, num_labels=2))


def free_port() -> int:
    """A TCP port that is free now (for a launcher's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Crash(Exception):
    """Raised by :func:`crash_at` to stand for a process that died mid-run."""


def crash_at(step: int):
    """An ``on_step`` callback for :func:`sora_ds.recipe.train.train` that raises :class:`Crash` after ``step``."""

    def on_step(done, model, optimizer):
        if done == step:
            raise Crash

    return on_step


def metrics(out: Path) -> list[dict]:
    """The records of a run's ``metrics.jsonl``."""
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def assert_same_losses(run_a: Path, run_b: Path, tol: float = 1e-5) -> None:
    """Two runs logged the same per-step training losses (to ``tol``)."""
    a, b = ([r["loss"] for r in metrics(run)] for run in (run_a, run_b))
    torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=tol, atol=tol)


def assert_run_reloads_in_peft(model, run_dir: Path, atol: float = 1e-5) -> None:
    """A recipe run's ``adapter/`` on its ``base_model/``, loaded by PEFT, gives the trained model's logits."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = torch.randint(7, 200, (2, 24), generator=torch.Generator().manual_seed(0))
    model.eval()
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(run_dir / "base_model"), run_dir / "adapter")
        got = loaded.eval()(input_ids=ids).logits
    assert (got - ref).abs().max().item() <= atol


# --- adapters on tiny models: inputs, logits, a few training steps ---


def token_ids(seed: int = 123, batch: int = 2, length: int = 12) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 128, (batch, length), generator=g)


@torch.no_grad()
def logits(model, ids) -> torch.Tensor:
    model.eval()
    return model(input_ids=ids).logits.detach().clone()


def adapter_param_ids(model) -> set[int]:
    return {id(p) for _, m in adapter_layers(model) for p in (m.lora_A, m.lora_B, m.gate) if p is not None}


def train_steps(model, steps: int, lam: float, *, labels=None, lr: float = 1e-2, mode: str = "absolute"):
    opt = build_optimizer(model, learning_rate=lr, sparse_lambda=lam, threshold_mode=mode)
    ids = token_ids(7, batch=4, length=10)
    model.train()
    for _ in range(steps):
        if labels is None:
            loss = model(input_ids=ids, labels=ids).loss
        else:
            loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    return model


def trained_llama(steps: int = 3, lam: float = 0.3, r: int = 8):
    """A tiny Llama with q/v SoRA branches after a few steps of strong absolute-lambda training."""
    model = build_decoder("llama").eval()
    inject(model, SoRAConfig(r=r, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_seed=0))
    torch.manual_seed(0)
    train_steps(model, steps, lam)
    return model


def zero_counts(model) -> dict[str, int]:
    return {n: int((m.gate == 0).sum()) for n, m in adapter_layers(model)}
