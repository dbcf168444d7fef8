"""AdaLoRA's cubic budget schedule: worked values, equality with PEFT's RankAllocator, rejected schedules."""

import pytest
from peft import AdaLoraConfig, get_peft_model

from sora_ds.adapters.budget import BudgetSchedule
from tests.support import build_llama

pytestmark = pytest.mark.unit


def test_worked_example_from_the_docstring():
    s = BudgetSchedule(init_r=12, target_r=8, n_matrices=4, t_init=10, t_final=20, total_step=110, delta_t=5)
    assert s(0) == (48, False) and s(10) == (48, False)
    assert s(50) == (34, True)
    assert s(51) == (33, False)  # between masking intervals: budget moves, the mask is not recomputed
    assert s(90) == (32, True) and s(91) == (32, True) and s(110) == (32, True)


def test_equals_peft_rank_allocator_at_every_step():
    model = build_llama(vocab_size=64, hidden_size=32, intermediate_size=64)
    cfg = AdaLoraConfig(init_r=12, target_r=8, tinit=7, tfinal=13, deltaT=3, total_step=97,
                        target_modules=["q_proj", "v_proj"])
    allocator = get_peft_model(model, cfg).base_model.rankallocator
    ours = BudgetSchedule(init_r=12, target_r=8, n_matrices=4, t_init=7, t_final=13, total_step=97, delta_t=3)
    for step in range(0, 98):
        assert ours(step) == allocator.budget_schedule(step), step


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(t_init=50, t_final=50, total_step=100), "t_init=50 leaves no budget-decreasing phase"),
        (dict(t_init=60, t_final=50, total_step=100), "lower t_init or t_final"),
        (dict(target_r=13), "target_r must be in"),
        (dict(delta_t=0), "delta_t must be >= 1"),
        (dict(t_init=-1), "t_init must be >= 0"),
    ],
)
def test_impossible_schedules_are_rejected(kwargs, match):
    args = dict(init_r=12, target_r=8, n_matrices=4, t_init=10, t_final=10, total_step=100) | kwargs
    with pytest.raises(ValueError, match=match):
        BudgetSchedule(**args)
