"""The gate proximal step on DeepSpeed-style flat shards equals the step on the whole gate vectors.

DeepSpeed calls the client optimizer once per (sub-)group with ``params`` replaced by one flat fp32 slice; the
slices of all gates are concatenated. Here the same thing is done by hand: the gates of several modules are
flattened, cut in two unequal slices, and each slice is stepped by its own AdapterAdamW, as two ranks would.
"""

import pytest
import torch

from sora_ds.adapters.optim import AdapterAdamW

pytestmark = pytest.mark.unit


def gate_group(params, mode, lam):
    return [{"params": params, "sora_gate": True, "sparse_lambda": lam, "threshold_mode": mode, "weight_decay": 0.0}]


@pytest.mark.parametrize("mode, lam", [("lr_scaled", 2.0), ("absolute", 0.03)])
def test_prox_step_on_flat_shards_equals_full(mode, lam):
    gen = torch.Generator().manual_seed(0)
    gates = [torch.randn(8, generator=gen) * 0.2 for _ in range(3)]
    grads = [[torch.randn(8, generator=gen) for _ in range(3)] for _ in range(4)]

    full = [torch.nn.Parameter(g.clone()) for g in gates]
    opt_full = AdapterAdamW(gate_group(full, mode, lam), lr=1e-2)

    flat = torch.cat(gates)
    cut = 11  # an uneven split that crosses a module boundary, like a ZeRO partition
    shards = [torch.nn.Parameter(flat[:cut].clone()), torch.nn.Parameter(flat[cut:].clone())]
    opts = [AdapterAdamW(gate_group([s], mode, lam), lr=1e-2) for s in shards]

    for step_grads in grads:
        for p, g in zip(full, step_grads):
            p.grad = g.clone()
        opt_full.step()
        flat_grad = torch.cat(step_grads)
        shards[0].grad, shards[1].grad = flat_grad[:cut].clone(), flat_grad[cut:].clone()
        for opt in opts:
            opt.step()

    whole = torch.cat([p.detach() for p in full])
    sharded = torch.cat([s.detach() for s in shards])
    assert torch.equal(whole, sharded)
    assert (whole == 0).any() and (whole != 0).any()  # the threshold bit on some entries and not others
