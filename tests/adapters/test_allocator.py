"""AdaLoRA's maths against PEFT's AdaLoRA: the same allocation at every step, the sticky-mask difference, the
orthogonality penalty's gradient, and schedule errors."""

from __future__ import annotations

import copy

import pytest
import torch

from sora_ds import AdaLoRAConfig, adapter_layers, build_optimizer, inject, orth_loss
from sora_ds.adapters.orthogonal import with_orth_penalty
from tests.support import build_llama

pytestmark = pytest.mark.unit


def tiny_llama():
    return build_llama(vocab_size=64, hidden_size=32, intermediate_size=64, initializer_range=0.15)


def twin_models(total_step, t_init, t_final, delta_t):
    """PEFT's AdaLoRA model and ours on the same base, with PEFT's initial P and Q copied into ours (E = 0 in both)."""
    from peft import AdaLoraConfig, get_peft_model

    base = tiny_llama()
    ours = copy.deepcopy(base)
    schedule = dict(total_step=total_step, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    # task_type matters: without it PEFT's generic PeftModel.forward bypasses AdaLoraModel.forward, and the
    # orthogonality penalty is silently not added.
    peft = get_peft_model(base, AdaLoraConfig(init_r=6, target_r=2, tinit=t_init, tfinal=t_final, deltaT=delta_t,
                                              task_type="CAUSAL_LM", orth_reg_weight=0.5, **schedule))
    inject(ours, AdaLoRAConfig(r=6, target_r=2, t_init=t_init, t_final=t_final, delta_t=delta_t, orth_reg_weight=0.5,
                               **schedule))
    peft_modules = {}
    with torch.no_grad():
        for name, m in adapter_layers(ours):
            pm = peft.base_model.model.get_submodule(name)
            m.lora_A.copy_(pm.lora_A["default"])
            m.lora_B.copy_(pm.lora_B["default"])
            peft_modules[name] = pm
    return peft, ours, peft_modules


def train_twins(total_step, t_init, t_final, delta_t):
    """Train both on the same batches with AdamW(lr 1e-2); yield (step, PEFT's E, our E, our budget)."""
    peft, ours, peft_modules = twin_models(total_step, t_init, t_final, delta_t)
    peft_opt = torch.optim.AdamW([p for p in peft.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    our_opt = build_optimizer(ours, learning_rate=1e-2)
    gen = torch.Generator().manual_seed(1)
    for step in range(1, total_step + 1):
        ids = torch.randint(0, 64, (4, 16), generator=gen)
        peft(input_ids=ids, labels=ids).loss.backward()  # PEFT adds the orthogonality penalty in its forward
        peft_opt.step()
        peft.base_model.update_and_allocate(step)  # after step, before zero_grad, with our 1-based step count
        peft_opt.zero_grad()
        (ours(input_ids=ids, labels=ids).loss + orth_loss(ours, 0.5)).backward()
        our_opt.step()  # scoring, allocation and masking happen inside
        our_opt.zero_grad()
        peft_e = torch.cat([peft_modules[n].lora_E["default"].detach().reshape(-1) for n, _ in adapter_layers(ours)])
        our_e = torch.cat([m.gate.detach() for _, m in adapter_layers(ours)])
        yield step, peft_e, our_e, our_opt.rank_allocator.budget


def test_allocation_equals_peft_adalora_at_every_step():
    """delta_t = 1 (PEFT's default): the same triplets survive at every step of warm-up, the cubic decrease and
    the final phase, and the singular values agree to float rounding."""
    survivors = []
    for step, peft_e, our_e, budget in train_twins(total_step=30, t_init=4, t_final=6, delta_t=1):
        assert torch.equal(peft_e != 0, our_e != 0), step
        torch.testing.assert_close(our_e, peft_e, rtol=0, atol=1e-6)
        survivors.append(int((our_e != 0).sum()))
        if step > 4:
            assert survivors[-1] == budget, (step, survivors[-1], budget)
    assert survivors[0] == 24 and survivors[-1] == 8  # 4 matrices: 6 -> 2 each on average
    assert len(set(survivors)) > 4  # the budget really decreased in steps


def test_pruned_triplets_stay_zero_between_allocations_unlike_peft():
    """The documented difference (delta_t > 1): PEFT zeroes E only at allocation steps, so Adam's momentum revives
    pruned entries at the next step; ours are re-zeroed after every update until an allocation says otherwise."""
    revived_in_peft, first_allocation_agrees = 0, False
    last_allocation = None
    for step, peft_e, our_e, budget in train_twins(total_step=30, t_init=4, t_final=6, delta_t=3):
        if step == 6:  # the first allocation step (step % delta_t == 0 after t_init): identical histories so far
            first_allocation_agrees = torch.equal(peft_e != 0, our_e != 0)
            last_allocation = int((our_e != 0).sum())
            assert last_allocation == budget
        elif step in (7, 8):  # between allocations
            assert int((our_e != 0).sum()) == last_allocation
            revived_in_peft = max(revived_in_peft, int((peft_e != 0).sum()) - last_allocation)
    assert first_allocation_agrees
    assert revived_in_peft > 0


def test_orth_penalty_value_and_gradient_match_autograd():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(4, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(24, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    out = torch.randn(3, 24, generator=gen, dtype=torch.float64, requires_grad=True)
    eye = torch.eye(4, dtype=torch.float64)
    ref = torch.linalg.matrix_norm(a @ a.T - eye) + torch.linalg.matrix_norm(b.T @ b - eye)
    ref_grads = torch.autograd.grad(ref * 0.7 + out.sum(), (a, b, out))
    passed, pen = with_orth_penalty(out, a, b)
    torch.testing.assert_close(pen, ref)
    grads = torch.autograd.grad(pen * 0.7 + passed.sum(), (a, b, out))
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(t_init=10, t_final=10, total_step=20), r"^AdaLoRAConfig.t_init=10 leaves no budget-decreasing phase: "
                                                     r"it must be < total_step - t_final"),
        (dict(r=4, target_r=6), r"^AdaLoRAConfig.target_r must be in \[1, the initial rank 4\], got 6$"),
        (dict(delta_t=0), r"delta_t must be >= 1"),
        (dict(importance_beta1=1.0), r"importance_beta1 must be in \[0, 1\)"),
    ],
)
def test_impossible_schedules_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AdaLoRAConfig(**kwargs)
