"""Throughput figures of a run: tokens/s (per device and total), an MFU estimate and, on CUDA, peak memory.

How the FLOPs are counted (per trained token, :func:`flops_per_token`):

* the frozen base: ``4 x N`` where ``N`` is the parameters of its matrix multiplications (every linear layer and the
  output head, from the model config; the embedding lookup does no multiply). Forward is ``2N`` (a multiply and an
  add per weight); backward computes the gradient of the inputs only (``2N``), since no base weight gets a gradient.
  Full fine-tuning would be ``6N``.
* attention: ``12 x layers x (heads x head_dim) x seq_len`` (forward ``Q K^T`` and ``P V``, ``2 x 2 x d x s``; backward
  twice that), counted over the whole row as in the PaLM paper's MFU, without halving for the causal mask; with
  packing ``seq_len`` is ``max_length`` (an upper bound: examples attend only within themselves).
* the adapters: ``6 x`` their trainable parameters (forward, input gradient and weight gradient, ``2`` each).

Recomputation under gradient checkpointing is not counted (that would be hardware FLOPs utilisation, not MFU), nor
the dequantization of a 4-bit base. ``mfu = flops_per_token x tokens/s per device / peak FLOP/s of one device``;
the peak is the dense bf16 tensor-core figure of the device (:data:`PEAK_FLOPS`, matched by the CUDA device name),
``peak_flops_per_device`` when the config sets it, else unknown (CPU, an unlisted GPU): ``mfu`` is then None. An
fp32 run is measured against the bf16 peak too, so it reads low.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Dense (no 2:4 sparsity) bf16 tensor-core peaks in FLOP/s, from the vendors' data sheets; the first entry whose
# name occurs in the device name wins, so the more specific names come first.
PEAK_FLOPS = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989.4e12),  # SXM (device name "NVIDIA H100 80GB HBM3")
    ("H200", 989.4e12),
    ("GH200", 989.4e12),
    ("H800", 989.4e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("A6000", 154.8e12),
    ("A10G", 70e12),
    ("A10", 125e12),
    ("L4", 121e12),
    ("RTX 4090", 165.2e12),
    ("MI300X", 1307.4e12),
)
GIB = 2**30


def peak_flops(device_name: str | None) -> float | None:
    """The dense bf16 peak FLOP/s of a device known by its name (``torch.cuda.get_device_name()``), else None."""
    if not device_name:
        return None
    return next((flops for name, flops in PEAK_FLOPS if name in device_name), None)


def matmul_params(config) -> int | None:
    """Weights of the matrix multiplications of a Llama-style decoder (attention q/k/v/o, gated MLP, output head),
    from its config; None when the config lacks one of the sizes this needs."""
    try:
        d, layers, inter = config.hidden_size, config.num_hidden_layers, config.intermediate_size
        heads, vocab = config.num_attention_heads, config.vocab_size
    except AttributeError:
        return None
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or d // heads
    attention = d * head_dim * (2 * heads + 2 * kv)  # q and o: heads; k and v: kv heads
    mlp = 3 * d * inter  # gate, up, down
    return layers * (attention + mlp) + d * vocab


def flops_per_token(config, adapter_params: int, seq_len: int) -> float | None:
    """Model FLOPs per trained token: ``4 x`` frozen matmul params + attention + ``6 x`` adapter params (see the
    module docstring); None when the config is not a shape :func:`matmul_params` knows."""
    n = matmul_params(config)
    if n is None:
        return None
    heads = config.num_attention_heads
    attn_width = heads * (getattr(config, "head_dim", None) or config.hidden_size // heads)
    return 4.0 * n + 12.0 * config.num_hidden_layers * attn_width * seq_len + 6.0 * adapter_params


def mfu(tokens_per_s_per_device: float, flops: float | None, peak: float | None) -> float | None:
    """Model FLOPs utilisation in [0, 1]: achieved model FLOP/s of one device over its peak (None if unknown)."""
    if flops is None or not peak or tokens_per_s_per_device != tokens_per_s_per_device:
        return None
    return flops * tokens_per_s_per_device / peak


@dataclass
class Throughput:
    """The throughput fields of every metrics record, and their run averages for the summary.

    ``record`` is called on every rank (the peak memory is gathered, a collective on CUDA)."""

    num_processes: int
    flops_per_token: float | None
    peak_flops_per_device: float | None
    cuda: bool
    tokens: float = 0.0  # all ranks, over the records so far
    seconds: float = 0.0
    peak_memory_gib: list | None = None

    @classmethod
    def for_run(cls, model_config, adapter_params: int, seq_len: int, accelerator,
                peak_override: float | None = None) -> Throughput:
        cuda = accelerator.device.type == "cuda"
        peak = peak_override or (peak_flops(torch.cuda.get_device_name(accelerator.device)) if cuda else None)
        if cuda:
            torch.cuda.reset_peak_memory_stats(accelerator.device)  # the run's own peak, not its predecessors'
        return cls(accelerator.num_processes, flops_per_token(model_config, adapter_params, seq_len), peak, cuda)

    def record(self, tokens: float, seconds: float, accelerator) -> dict:
        """``tokens_per_s_per_device``, ``mfu``, ``peak_memory_gib`` (per rank, since the start; None off CUDA) of
        a window of ``tokens`` (all ranks) in ``seconds``."""
        self.tokens += tokens
        self.seconds += seconds
        per_device = tokens / seconds / self.num_processes if seconds > 0 else float("nan")
        if self.cuda:
            mem = torch.tensor([torch.cuda.max_memory_allocated(accelerator.device) / GIB], device=accelerator.device)
            self.peak_memory_gib = [round(m, 3) for m in accelerator.gather(mem).tolist()]
        return {"tokens_per_s_per_device": per_device,
                "mfu": mfu(per_device, self.flops_per_token, self.peak_flops_per_device),
                "peak_memory_gib": self.peak_memory_gib}

    def summary(self) -> dict:
        """Run averages (total tokens over total logged seconds), the FLOPs counted and the peak memory per rank."""
        total = self.tokens / self.seconds if self.seconds > 0 else None
        per_device = total / self.num_processes if total is not None else None
        return {"tokens_per_s": total, "tokens_per_s_per_device": per_device,
                "mfu": mfu(per_device, self.flops_per_token, self.peak_flops_per_device) if per_device else None,
                "flops_per_token": self.flops_per_token, "peak_flops_per_device": self.peak_flops_per_device,
                "peak_memory_gib": self.peak_memory_gib}
