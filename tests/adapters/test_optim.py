"""Unit tests for sora_ds.adapters.optim: the proximal AdamW step, param groups, lambda updates and the L1 penalty."""

import pytest
import torch
from torch import nn
from transformers import LlamaForCausalLM

from sora_ds import SoRAConfig, inject
from sora_ds.adapters.inject import branch_parameters, gate_parameters, adapter_layers
from sora_ds.adapters.optim import AdapterAdamW, build_optimizer, gate_l1_penalty, set_sparse_lambda
from tests.support import build_bert as tiny_bert
from tests.support import build_llama as tiny_llama

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("single_thread")]


BETAS = (0.9, 0.999)
EPS = 1e-8


def injected_llama(**cfg_kwargs) -> LlamaForCausalLM:
    model = tiny_llama()
    kwargs = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_seed=0)
    kwargs.update(cfg_kwargs)
    inject(model, SoRAConfig(**kwargs))
    return model


def adamw_first_step(p: torch.Tensor, grad: torch.Tensor, lr: float, wd: float = 0.0) -> torch.Tensor:
    """Exact first AdamW step (torch's formula), in float64."""
    p, grad = p.double(), grad.double()
    b1, b2 = BETAS
    p = p * (1 - lr * wd)
    m = (1 - b1) * grad
    v = (1 - b2) * grad * grad
    bc1, bc2 = 1 - b1, 1 - b2
    denom = v.sqrt() / (bc2**0.5) + EPS
    return p - (lr / bc1) * m / denom


def soft(x: torch.Tensor, tau: float) -> torch.Tensor:
    return torch.sign(x) * torch.clamp(x.abs() - tau, min=0.0)


G0 = [1.0, -1.0, 0.3, -0.3, 0.12, 0.05, -0.05, 0.0, 2.0, 0.02]
GRAD = [0.5, -0.5, 1.0, -2.0, 1.0, 1.0, 1.0, 0.0, -3.0, 1.0]
LR = 0.1


def _one_gate_step(mode: str, lam: float, lr: float = LR) -> torch.Tensor:
    g = nn.Parameter(torch.tensor(G0, dtype=torch.float32))
    opt = AdapterAdamW(
        [{"params": [g], "sora_gate": True, "sparse_lambda": lam, "threshold_mode": mode, "weight_decay": 0.0}],
        lr=lr,
        betas=BETAS,
        eps=EPS,
        weight_decay=0.01,
    )
    g.grad = torch.tensor(GRAD, dtype=torch.float32)
    opt.step()
    return g.detach().clone()


def test_lr_scaled_step_exact():
    lam = 0.5  # tau = lr * lam = 0.05
    out = _one_gate_step("lr_scaled", lam)
    expected = soft(adamw_first_step(torch.tensor(G0), torch.tensor(GRAD), LR), LR * lam)
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=1e-6)
    # hand values: Adam moves each gate by ~lr*sign(grad), then the shrink is 0.05
    hand = torch.tensor([0.85, -0.85, 0.15, -0.15, 0.0, 0.0, -0.10, 0.0, 2.05, -0.03], dtype=torch.float64)
    torch.testing.assert_close(out.double(), hand, rtol=0, atol=1e-6)
    # 0.12 -> 0.02 (< tau) and 0.05 -> -0.05 (crossed zero, |.| <= tau) are exactly zero
    assert out[4].item() == 0.0
    assert out[5].item() == 0.0
    assert out[7].item() == 0.0
    # 0.02 -> -0.08 crossed zero and survives with the new sign, shrunk to -0.03
    assert out[9].item() < 0


def test_absolute_step_exact():
    lam = 0.5  # tau = lam = 0.5 whatever the lr
    out = _one_gate_step("absolute", lam)
    expected = soft(adamw_first_step(torch.tensor(G0), torch.tensor(GRAD), LR), lam)
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=1e-6)
    hand = torch.tensor([0.4, -0.4, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.6, 0.0], dtype=torch.float64)
    torch.testing.assert_close(out.double(), hand, rtol=0, atol=1e-6)
    assert (out == 0).sum().item() == 7


def test_conventions_differ_for_same_lambda():
    a = _one_gate_step("lr_scaled", 0.5)
    b = _one_gate_step("absolute", 0.5)
    assert not torch.allclose(a, b)
    # absolute with lambda = lr * 0.5 equals lr_scaled with 0.5
    c = _one_gate_step("absolute", LR * 0.5)
    torch.testing.assert_close(a, c, rtol=0, atol=1e-7)


def test_lr_scaled_follows_group_lr_changes():
    g = nn.Parameter(torch.tensor(G0, dtype=torch.float32))
    opt = AdapterAdamW(
        [{"params": [g], "sora_gate": True, "sparse_lambda": 2.0, "threshold_mode": "lr_scaled", "weight_decay": 0.0}],
        lr=LR,
    )
    opt.param_groups[0]["lr"] = 0.01  # what a LR scheduler does
    g.grad = torch.tensor(GRAD)
    opt.step()
    expected = soft(adamw_first_step(torch.tensor(G0), torch.tensor(GRAD), 0.01), 0.01 * 2.0)
    torch.testing.assert_close(g.detach().double(), expected, rtol=0, atol=1e-6)


def test_zero_lambda_is_plain_adamw_and_non_gate_groups_untouched():
    torch.manual_seed(0)
    g = nn.Parameter(torch.randn(16) * 0.01)
    w = nn.Parameter(torch.randn(4, 4) * 0.01)
    g_ref = nn.Parameter(g.detach().clone())
    w_ref = nn.Parameter(w.detach().clone())
    opt = AdapterAdamW(
        [
            {"params": [w], "weight_decay": 0.1, "sora_gate": False},
            {"params": [g], "sora_gate": True, "sparse_lambda": 0.0, "threshold_mode": "absolute", "weight_decay": 0.0},
        ],
        lr=1e-2,
    )
    ref = torch.optim.AdamW([{"params": [w_ref], "weight_decay": 0.1}, {"params": [g_ref], "weight_decay": 0.0}], lr=1e-2)
    for step in range(3):
        gg, gw = torch.randn(16), torch.randn(4, 4)
        g.grad, g_ref.grad = gg.clone(), gg.clone()
        w.grad, w_ref.grad = gw.clone(), gw.clone()
        opt.step()
        ref.step()
    assert torch.equal(g, g_ref)
    assert torch.equal(w, w_ref)


def test_non_gate_group_with_lambda_key_not_thresholded():
    w = nn.Parameter(torch.tensor([0.001, -0.001, 0.5]))
    opt = AdapterAdamW(
        [{"params": [w], "sora_gate": False, "sparse_lambda": 100.0, "threshold_mode": "absolute"}],
        lr=1e-3,
        weight_decay=0.0,
    )
    w.grad = torch.zeros(3)
    opt.step()
    assert torch.equal(w.detach(), torch.tensor([0.001, -0.001, 0.5]))


def test_step_returns_closure_loss():
    g = nn.Parameter(torch.ones(2))
    opt = AdapterAdamW([{"params": [g], "sora_gate": True, "sparse_lambda": 0.0, "threshold_mode": "lr_scaled"}], lr=0.1)

    def closure():
        opt.zero_grad()
        loss = (g**2).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert loss.item() == pytest.approx(2.0)


def test_weight_decay_never_touches_gates_but_decays_A():
    model = injected_llama()
    lr, wd = 1e-3, 0.5
    opt = build_optimizer(model, learning_rate=lr, weight_decay=wd, sparse_lambda=0.0)
    gate_groups = [g for g in opt.param_groups if g["sora_gate"]]
    assert len(gate_groups) == 1
    assert gate_groups[0]["weight_decay"] == 0.0
    gates_before = [g.detach().clone() for g in gate_parameters(model)]
    a_before = [m.lora_A.detach().clone() for _, m in adapter_layers(model)]
    b_before = [m.lora_B.detach().clone() for _, m in adapter_layers(model)]
    for group in opt.param_groups:
        for p in group["params"]:
            p.grad = torch.zeros_like(p)
    opt.step()
    for g, before in zip(gate_parameters(model), gates_before):
        assert torch.equal(g.detach(), before)
    for (_, m), before in zip(adapter_layers(model), a_before):
        torch.testing.assert_close(m.lora_A.detach(), before * (1 - lr * wd), rtol=0, atol=1e-8)
        assert not torch.equal(m.lora_A.detach(), before)
    for (_, m), before in zip(adapter_layers(model), b_before):
        assert torch.equal(m.lora_B.detach(), before)  # B = 0 stays 0


def test_gate_learning_rate_sets_gate_group_lr_and_tau():
    model = injected_llama()
    opt = build_optimizer(model, learning_rate=1e-3, gate_learning_rate=0.1, sparse_lambda=2.0)
    (gate_group,) = [g for g in opt.param_groups if g["sora_gate"]]
    assert gate_group["lr"] == 0.1
    assert all(g["lr"] == 1e-3 for g in opt.param_groups if not g["sora_gate"])
    before = [g.detach().clone() for g in gate_parameters(model)]
    for group in opt.param_groups:
        for p in group["params"]:
            p.grad = torch.zeros_like(p)
    opt.step()
    for g, b in zip(gate_parameters(model), before):
        torch.testing.assert_close(g.detach(), soft(b, 0.1 * 2.0), rtol=0, atol=1e-7)


def test_build_optimizer_groups_llama():
    model = injected_llama()
    opt = build_optimizer(model, weight_decay=0.1, sparse_lambda=0.3, threshold_mode="absolute")
    gate_ids = {id(g) for g in gate_parameters(model)}
    branch_ids = {id(p) for p in branch_parameters(model)}
    assert len(gate_ids) == 4 and len(branch_ids) == 8  # 2 layers x (q, v)
    gate_groups = [g for g in opt.param_groups if g["sora_gate"]]
    other_groups = [g for g in opt.param_groups if not g["sora_gate"]]
    assert len(gate_groups) == 1
    assert {id(p) for p in gate_groups[0]["params"]} == gate_ids
    assert gate_groups[0]["sparse_lambda"] == 0.3
    assert gate_groups[0]["threshold_mode"] == "absolute"
    assert gate_groups[0]["weight_decay"] == 0.0
    # A/B in exactly one non-gate group, with weight decay; no gate anywhere else
    ab_groups = [g for g in other_groups if {id(p) for p in g["params"]} & branch_ids]
    assert len(ab_groups) == 1
    assert {id(p) for p in ab_groups[0]["params"]} == branch_ids
    assert ab_groups[0]["weight_decay"] == 0.1
    for g in other_groups:
        assert not ({id(p) for p in g["params"]} & gate_ids)
        assert "sparse_lambda" not in g
    # no empty groups, and nothing frozen is optimized
    assert all(g["params"] for g in opt.param_groups)
    all_ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(all_ids) == len(set(all_ids))
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert set(all_ids) == trainable


def test_build_optimizer_groups_bert_with_classifier():
    model = tiny_bert()
    inject(
        model,
        SoRAConfig(r=4, lora_alpha=8, target_modules=r".*\.(query|value)", modules_to_save=["classifier"], init_seed=0),
    )
    opt = build_optimizer(model, weight_decay=0.2, sparse_lambda=0.1)
    gate_ids = {id(g) for g in gate_parameters(model)}
    branch_ids = {id(p) for p in branch_parameters(model)}
    w, b = model.classifier.weight, model.classifier.bias
    assert w.requires_grad and b.requires_grad

    def group_of(p):
        found = [g for g in opt.param_groups if any(q is p for q in g["params"])]
        assert len(found) == 1
        return found[0]

    assert group_of(w)["sora_gate"] is False
    assert group_of(b)["sora_gate"] is False
    assert group_of(w)["weight_decay"] == 0.2  # matrices decay
    assert group_of(b)["weight_decay"] == 0.0  # biases do not
    for g in gate_parameters(model):
        assert group_of(g)["sora_gate"] is True
    (gate_group,) = [g for g in opt.param_groups if g["sora_gate"]]
    assert {id(p) for p in gate_group["params"]} == gate_ids
    assert not ({id(w), id(b)} & (gate_ids | branch_ids))
    # head parameters are not in the A/B group
    assert group_of(w) is not group_of(next(iter(branch_parameters(model))))
    all_ids = {id(p) for g in opt.param_groups for p in g["params"]}
    assert all_ids == {id(p) for p in model.parameters() if p.requires_grad}


def test_build_optimizer_bad_threshold_mode():
    model = injected_llama()
    with pytest.raises(ValueError) as info:
        build_optimizer(model, threshold_mode="lr")
    assert "threshold_mode" in str(info.value)
    assert "lr_scaled" in str(info.value) and "absolute" in str(info.value)


def test_build_optimizer_negative_lambda():
    model = injected_llama()
    with pytest.raises(ValueError, match="sparse_lambda"):
        build_optimizer(model, sparse_lambda=-0.1)


def test_build_optimizer_bad_learning_rate():
    model = injected_llama()
    with pytest.raises(ValueError, match="learning_rate"):
        build_optimizer(model, learning_rate=0.0)


def test_build_optimizer_without_adapter_layers():
    model = tiny_llama()
    with pytest.raises(ValueError) as info:
        build_optimizer(model)
    assert "inject" in str(info.value)
    assert "no adapter layers" in str(info.value)


def test_set_sparse_lambda_changes_only_gate_groups():
    model = tiny_bert()
    inject(model, SoRAConfig(r=4, target_modules=r".*\.(query|value)", modules_to_save=["classifier"], init_seed=0))
    opt = build_optimizer(model, weight_decay=0.1, sparse_lambda=0.1)
    before = [dict((k, v) for k, v in g.items() if k != "params") for g in opt.param_groups]
    set_sparse_lambda(opt, 0.7)
    for g, b in zip(opt.param_groups, before):
        if g["sora_gate"]:
            assert g["sparse_lambda"] == 0.7
            assert b["sparse_lambda"] == 0.1
        else:
            assert "sparse_lambda" not in g
            assert {k: v for k, v in g.items() if k != "params"} == b
    assert sum(1 for g in opt.param_groups if g["sora_gate"]) == 1


def test_set_sparse_lambda_takes_effect_on_next_step():
    g = nn.Parameter(torch.tensor(G0))
    opt = AdapterAdamW(
        [{"params": [g], "sora_gate": True, "sparse_lambda": 0.0, "threshold_mode": "absolute", "weight_decay": 0.0}],
        lr=LR,
    )
    set_sparse_lambda(opt, 0.5)
    g.grad = torch.tensor(GRAD)
    opt.step()
    expected = soft(adamw_first_step(torch.tensor(G0), torch.tensor(GRAD), LR), 0.5)
    torch.testing.assert_close(g.detach().double(), expected, rtol=0, atol=1e-6)


def test_gate_l1_penalty_value_and_gradient():
    model = injected_llama()
    gates = gate_parameters(model)
    with torch.no_grad():
        gates[0].copy_(torch.tensor([1.0, -2.0, 0.5, 0.0]))
        gates[1].copy_(torch.tensor([-1.0, -1.0, -1.0, -1.0]))
        gates[2].copy_(torch.tensor([0.25, 0.25, -0.25, 0.25]))
        gates[3].copy_(torch.tensor([3.0, 0.0, 0.0, 0.0]))
    lam = 0.3
    pen = gate_l1_penalty(model, lam)
    expected = lam * (3.5 / 4 + 4.0 / 4 + 1.0 / 4 + 3.0 / 4)
    assert isinstance(pen, torch.Tensor)
    assert pen.item() == pytest.approx(expected, rel=1e-6)
    ref = lam * sum(g.detach().abs().sum() / g.numel() for g in gates)
    assert pen.item() == pytest.approx(ref.item(), rel=1e-6)
    pen.backward()
    for g in gates:
        assert g.grad is not None
        torch.testing.assert_close(g.grad, lam * torch.sign(g.detach()) / g.numel())
    # no gradient flows into A/B or the frozen base
    for p in branch_parameters(model):
        assert p.grad is None


def test_gate_l1_penalty_zero_is_float_zero():
    model = injected_llama()
    assert gate_l1_penalty(model, 0.0) == 0.0
    assert isinstance(gate_l1_penalty(model, 0), float)
