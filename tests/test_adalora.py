"""AdaLoRA on one process: equality with PEFT's AdaLoRA, the sticky-mask difference, the orthogonality penalty's
gradient, schedule errors, and the recipe end to end (optimizer-step counting, export round trip, resume, 4-bit)."""

from __future__ import annotations

import copy
import json
import runpy
from pathlib import Path

import pytest
import torch

from sora_ds import AdaLoRAConfig, build_optimizer, inject, orth_loss, sora_modules
from sora_ds.budget import BudgetSchedule
from sora_ds.orthogonal import with_orth_penalty
from sora_ds.train import train
from sora_ds.train_config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]
DEFAULTS = runpy.run_path(str(REPO / "recipes" / "llama_adalora.py"), run_name="recipe")["FAMILY_DEFAULTS"]


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, initializer_range=0.15)
    return LlamaForCausalLM(cfg)


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
        for name, m in sora_modules(ours):
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
        peft_e = torch.cat([peft_modules[n].lora_E["default"].detach().reshape(-1) for n, _ in sora_modules(ours)])
        our_e = torch.cat([m.gate.detach() for _, m in sora_modules(ours)])
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
        (dict(t_init=10, t_final=10, total_step=20), r"t_init=10 must be < total_step - t_final"),
        (dict(r=4, target_r=6), r"target_r must be in \[1, r=4\]"),
        (dict(delta_t=0), r"delta_t must be >= 1"),
        (dict(importance_beta1=1.0), r"importance_beta1 must be in \[0, 1\)"),
    ],
)
def test_impossible_schedules_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AdaLoRAConfig(**kwargs)


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--t_init", "150", "--t_final", "60"], r"t_init=150 must be < max_steps - t_final = 200 - 60"),
        (["--target_r", "20"], r"target_r must be in \[1, r=12\]"),
        (["--sparsify_stages", "3"], r"sparsify_stages=3 .* SoRA settings"),
        (["--method", "lora"], r"method='lora' is not allowed; choose one of \['sora', 'adalora'\]"),
    ],
)
def test_recipe_config_errors_name_the_key(argv, match):
    with pytest.raises(ConfigError, match=match):
        load_config(argv, DEFAULTS)


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def recipe_run(tmp_path_factory):
    """The AdaLoRA recipe for 24 optimizer steps of 2 accumulated micro-batches each."""
    out = tmp_path_factory.mktemp("adalora_recipe")
    args = ["--max_steps", "24", "--t_init", "4", "--t_final", "6", "--delta_t", "2", "--log_every", "1",
            "--gradient_accumulation_steps", "2", "--per_device_train_batch_size", "8", "--output_dir", str(out)]
    cfg = load_config(args, DEFAULTS)
    model, summary = train(cfg)
    return cfg, out, model, summary


def test_recipe_budget_follows_optimizer_steps(recipe_run):
    """With gradient accumulation the schedule advances once per optimizer step, not per micro-batch."""
    cfg, out, _, summary = recipe_run
    n = len(summary["kept_ranks"])
    schedule = BudgetSchedule(cfg.r, cfg.target_r, n, cfg.t_init, cfg.t_final, cfg.max_steps, cfg.delta_t)
    records = metrics(out)
    assert [r["step"] for r in records] == list(range(1, 25))
    for r in records:
        step = r["step"]
        assert r["budget"] == (schedule(step)[0] if step > cfg.t_init else n * cfg.r), step
        if step >= cfg.max_steps - cfg.t_final:  # the final mask is in place from the last allocation on
            assert r["active_ranks"] == n * cfg.target_r, step
    assert summary["total_kept_ranks"] == n * cfg.target_r
    assert summary["method"] == "adalora"
    assert any(k != cfg.target_r for k in summary["kept_ranks"].values())  # budget moved between matrices


def test_recipe_exports_a_peft_lora_that_reproduces_the_model(recipe_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _, out, model, summary = recipe_run
    for name in ("summary.json", "rank_heatmap.png", "config.yaml", "adapter/adapter_config.json"):
        assert (out / name).exists(), name
    adapter_cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter_cfg["peft_type"] == "LORA"
    assert sorted(adapter_cfg["rank_pattern"].values()) == sorted(k for k in summary["kept_ranks"].values() if k)
    ids = torch.randint(7, 200, (2, 24), generator=torch.Generator().manual_seed(0))
    model.eval()
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out / "base_model"), out / "adapter")
        got = loaded.eval()(input_ids=ids).logits
    assert (got - ref).abs().max().item() <= 1e-5


def test_resume_mid_schedule_reproduces_the_uninterrupted_run(recipe_run, tmp_path):
    """Importance EMAs, masks and the step count live in the optimizer state: a run that dies at step 12 (inside
    the budget-decreasing phase) and resumes from its step-10 checkpoint ends as the one that never stopped."""
    _, reference, _, ref_summary = recipe_run
    args = ["--max_steps", "24", "--t_init", "4", "--t_final", "6", "--delta_t", "2", "--log_every", "1",
            "--gradient_accumulation_steps", "2", "--per_device_train_batch_size", "8", "--output_dir", str(tmp_path),
            "--save_every", "5"]

    class Crash(Exception):
        pass

    def crash_at_12(step, model, optimizer):
        if step == 12:
            raise Crash

    with pytest.raises(Crash):
        train(load_config(args, DEFAULTS), on_step=crash_at_12)
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step-0000010"
    train(load_config([*args, "--resume_from", "latest"], DEFAULTS))
    assert [r["step"] for r in metrics(tmp_path)] == list(range(1, 25))
    for key in ("loss", "budget", "active_ranks"):
        got, want = [r[key] for r in metrics(tmp_path)], [r[key] for r in metrics(reference)]
        torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-5, atol=1e-6)
    assert json.loads((tmp_path / "summary.json").read_text())["kept_ranks"] == ref_summary["kept_ranks"]


def test_orth_penalty_survives_gradient_checkpointing(tmp_path):
    base = ["--max_steps", "3", "--log_every", "1", "--t_init", "0", "--t_final", "1"]
    train(load_config([*base, "--gradient_checkpointing", "true", "--output_dir", str(tmp_path / "gc")], DEFAULTS))
    train(load_config([*base, "--output_dir", str(tmp_path / "plain")], DEFAULTS))
    with_gc = [r["loss"] for r in metrics(tmp_path / "gc")]
    without = [r["loss"] for r in metrics(tmp_path / "plain")]
    torch.testing.assert_close(torch.tensor(with_gc), torch.tensor(without), rtol=1e-5, atol=1e-5)


def test_adalora_on_a_4bit_base_trains_prunes_and_exports(tmp_path):
    """nf4 base (bitsandbytes on CPU): the adapter trains in fp32 beside it and reaches the target budget."""
    pytest.importorskip("bitsandbytes")
    quant = "{load_in_4bit: true, bnb_4bit_quant_type: nf4, bnb_4bit_compute_dtype: float32}"
    args = ["--max_steps", "12", "--t_init", "2", "--t_final", "4", "--delta_t", "2", "--log_every", "1",
            "--quantization", quant, "--output_dir", str(tmp_path)]
    model, summary = train(load_config(args, DEFAULTS))
    assert type(next(m for _, m in sora_modules(model)).base_layer).__name__ == "Linear4bit"
    records = metrics(tmp_path)
    assert records[-1]["loss"] < records[0]["loss"]
    assert summary["total_kept_ranks"] == len(summary["kept_ranks"]) * 8
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
