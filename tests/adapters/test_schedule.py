"""Unit tests for sora_ds.adapters.schedule: lambda ramps, the staged sparsifying scheduler and StageRecorder."""

import dataclasses
import math
import re

import pytest

import sora_ds.adapters.schedule as schedule_mod
from sora_ds.adapters.schedule import LAMBDA_SCHEDULES, LambdaSchedule, StageRecorder

pytestmark = pytest.mark.unit

LO, HI, RAMP = 1e-3, 1e-1, 100


def ramp(kind: str, **kw) -> LambdaSchedule:
    return LambdaSchedule(sparse_lambda=HI, lambda_schedule=kind, lambda_start=LO, lambda_ramp_steps=RAMP, **kw)


def exp_value(frac: float, lo: float = LO, hi: float = HI) -> float:
    return lo + (hi - lo) * (1 - math.exp(-5.0 * frac)) / (1 - math.exp(-5.0))


def test_schedule_names():
    assert LAMBDA_SCHEDULES == ("constant", "linear", "loglinear", "exp")


@pytest.mark.parametrize("step", [0, 1, 50, 99, 100, 10_000])
def test_constant_every_step(step):
    assert ramp("constant")(step) == HI
    assert LambdaSchedule(sparse_lambda=0.25)(step) == 0.25


@pytest.mark.parametrize(
    "step,expected",
    [(0, 1e-3), (1, 1e-3 + 0.099 * 0.01), (25, 0.02575), (50, 0.0505), (75, 0.07525), (100, 0.1)],
)
def test_linear_values(step, expected):
    assert ramp("linear")(step) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(
    "step,expected",
    [(0, 1e-3), (25, 1e-3 * 100**0.25), (50, 0.01), (75, 1e-3 * 100**0.75), (100, 0.1)],
)
def test_loglinear_values(step, expected):
    assert ramp("loglinear")(step) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("step", [0, 10, 25, 50, 90, 100])
def test_exp_values(step):
    assert ramp("exp")(step) == pytest.approx(exp_value(step / RAMP), rel=1e-12)


def test_exp_worked_example_value():
    # 1e-3 + 0.099 * (1 - e^-2.5) / (1 - e^-5) = 0.092490...
    value = ramp("exp")(50)
    assert value == pytest.approx(0.09249004017789689, rel=1e-12)
    assert round(value, 4) == 0.0925
    # "~92% of the rise by mid-ramp"
    assert (value - LO) / (HI - LO) == pytest.approx(0.9241, abs=1e-4)


def test_exp_rises_mostly_early_and_monotonically():
    s = ramp("exp")
    values = [s(k) for k in range(RAMP + 1)]
    assert values == sorted(values)
    assert values[0] == pytest.approx(LO, rel=1e-12)
    assert values[-1] == pytest.approx(HI, rel=1e-12)
    lin = ramp("linear")
    assert all(s(k) > lin(k) for k in range(1, RAMP))


def _docstring_number(pattern: str) -> float:
    m = re.search(pattern, schedule_mod.__doc__)
    assert m, f"worked example {pattern!r} not found in sora_ds.adapters.schedule docstring"
    return float(m.group(1))


def test_docstring_worked_numbers_match_implementation():
    """The module docstring's worked example (lambda_start=1e-3, sparse_lambda=1e-1, ramp 100, step 50).

    FAILS at the time of writing: the docstring gives 0.0927 for ``exp`` but the formula it states (and the
    implementation) give 0.092490 -> 0.0925.
    """
    assert _docstring_number(r"\* ``linear``: .*?= ([0-9.]+)") == pytest.approx(ramp("linear")(50), abs=5e-5)
    assert _docstring_number(r"\* ``loglinear``: .*?= ([0-9.]+)") == pytest.approx(ramp("loglinear")(50), abs=5e-5)
    assert _docstring_number(r"\* ``constant``: ([0-9.e-]+) at every step") == pytest.approx(ramp("constant")(50))
    assert _docstring_number(r"\* ``exp``: .*?= ([0-9.]+)") == pytest.approx(ramp("exp")(50), abs=5e-5)


@pytest.mark.parametrize("kind", ["linear", "loglinear", "exp"])
@pytest.mark.parametrize("step", [100, 101, 150, 1_000_000])
def test_ramps_hold_after_ramp(kind, step):
    assert ramp(kind)(step) == pytest.approx(HI, rel=1e-12)


def test_linear_ramp_down():
    s = LambdaSchedule(sparse_lambda=0.0, lambda_schedule="linear", lambda_start=0.2, lambda_ramp_steps=4)
    assert [s(k) for k in range(6)] == pytest.approx([0.2, 0.15, 0.1, 0.05, 0.0, 0.0])


def test_loglinear_towards_zero_reaches_zero():
    s = LambdaSchedule(sparse_lambda=0.0, lambda_schedule="loglinear", lambda_start=0.2, lambda_ramp_steps=4)
    assert s(0) == pytest.approx(0.2)
    assert s(4) == 0.0
    assert s(100) == 0.0


# ------------------------------------------------------------------ staged (sparsifying scheduler)


def test_staged_linear_staircase():
    s = ramp("linear", sparsify_stages=4)
    assert s.stage_steps == 25
    levels = [LO + (HI - LO) * k / 3 for k in range(4)]
    assert levels == pytest.approx([0.001, 0.034, 0.067, 0.1])
    for step in range(0, 25):
        assert s(step) == pytest.approx(levels[0], rel=1e-12)
    for step in range(25, 50):
        assert s(step) == pytest.approx(levels[1], rel=1e-12)
    for step in range(50, 75):
        assert s(step) == pytest.approx(levels[2], rel=1e-12)
    for step in (75, 99, 100, 500):
        assert s(step) == pytest.approx(levels[3], rel=1e-12)


def test_staged_loglinear_and_exp_levels():
    s = ramp("loglinear", sparsify_stages=3)
    assert [s(0), s(40), s(80)] == pytest.approx([1e-3, 1e-2, 1e-1], rel=1e-12)
    e = ramp("exp", sparsify_stages=3)
    assert [e(0), e(40), e(80)] == pytest.approx([LO, exp_value(0.5), HI], rel=1e-12)


def test_staged_first_and_last_stage_are_endpoints():
    for kind in ("linear", "loglinear", "exp"):
        s = ramp(kind, sparsify_stages=5)
        assert s(0) == pytest.approx(LO, rel=1e-12)
        assert s(RAMP + 7) == pytest.approx(HI, rel=1e-12)


def test_staged_constant_is_flat_at_sparse_lambda():
    # constant ignores lambda_start (docstring: "lambda_start unused"), so its staircase is flat.
    s = LambdaSchedule(sparse_lambda=0.3, lambda_schedule="constant", lambda_start=0.01, lambda_ramp_steps=10,
                       sparsify_stages=2)
    assert [s(k) for k in (0, 4, 5, 9, 50)] == [0.3] * 5
    assert s.stage(4) == 0 and s.stage(5) == 1


@pytest.mark.parametrize(
    "step,stage", [(0, 0), (24, 0), (25, 1), (49, 1), (50, 2), (74, 2), (75, 3), (99, 3), (100, 3), (9999, 3)]
)
def test_stage_boundaries(step, stage):
    assert ramp("linear", sparsify_stages=4).stage(step) == stage


def test_is_stage_end_at_boundaries():
    s = ramp("linear", sparsify_stages=4)
    ends = [step for step in range(300) if s.is_stage_end(step)]
    assert ends == [24, 49, 74]  # never after the final stage


def test_stages_with_uneven_ramp():
    s = LambdaSchedule(sparse_lambda=0.3, lambda_schedule="linear", lambda_start=0.0, lambda_ramp_steps=10,
                       sparsify_stages=3)
    assert s.stage_steps == 3
    assert [s.stage(k) for k in range(12)] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 2, 2]
    assert [k for k in range(40) if s.is_stage_end(k)] == [2, 5]
    assert [s(k) for k in (0, 3, 6, 11)] == pytest.approx([0.0, 0.15, 0.3, 0.3])


def test_no_stages_means_stage_zero_and_no_stage_ends():
    s = ramp("linear")
    assert s.stage_steps == 0
    assert all(s.stage(k) == 0 for k in range(0, 300, 7))
    assert not any(s.is_stage_end(k) for k in range(300))


def test_schedule_is_frozen():
    s = ramp("linear")
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.sparse_lambda = 1.0


# ------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(sparse_lambda=0.1, lambda_schedule="cosine"), r"^LambdaSchedule\.lambda_schedule must be one of"),
        (dict(sparse_lambda=0.1, lambda_schedule="Linear", lambda_ramp_steps=10), r"^LambdaSchedule\.lambda_schedule must be one of"),
        (dict(sparse_lambda=0.1, lambda_schedule="exp", lambda_ramp_steps=0), r"^LambdaSchedule\.lambda_ramp_steps must be >= 1"),
        (dict(sparse_lambda=0.1, lambda_schedule="loglinear", lambda_start=1e-3, lambda_ramp_steps=-5),
         r"^LambdaSchedule\.lambda_ramp_steps must be >= 1"),
        (dict(sparse_lambda=0.1, lambda_schedule="loglinear", lambda_ramp_steps=10), r"^LambdaSchedule\.lambda_start must be > 0 for lambda_schedule='loglinear'"),
        (dict(sparse_lambda=0.1, lambda_schedule="loglinear", lambda_start=0.0, lambda_ramp_steps=10),
         r"^LambdaSchedule\.lambda_start must be > 0 for lambda_schedule='loglinear'"),
        (dict(sparse_lambda=0.1, lambda_schedule="linear", lambda_ramp_steps=10, sparsify_stages=1),
         r"^LambdaSchedule\.sparsify_stages must be 0 \(off\) or >= 2"),
        (dict(sparse_lambda=0.1, sparsify_stages=-1), r"^LambdaSchedule\.sparsify_stages must be 0 \(off\) or >= 2"),
        (dict(sparse_lambda=0.1, lambda_schedule="linear", lambda_ramp_steps=4, sparsify_stages=5),
         r"^LambdaSchedule\.sparsify_stages=5 exceeds lambda_ramp_steps=4"),
        (dict(sparse_lambda=-0.1), r"sparse_lambda"),
        (dict(sparse_lambda=0.1, lambda_start=-1e-3, lambda_schedule="linear", lambda_ramp_steps=5), r"lambda_start"),
    ],
)
def test_invalid_configs_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        LambdaSchedule(**kwargs)


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(keep_fraction=0.0), r"^LambdaSchedule\.keep_fraction must be in \(0, 1\]"),
        (dict(keep_fraction=1.5), r"^LambdaSchedule\.keep_fraction must be in \(0, 1\]"),
        (dict(keep_fraction=-0.2), r"^LambdaSchedule\.keep_fraction must be in \(0, 1\]"),
        (dict(keep_fraction=0.5, sparse_lambda=0.0), r"^LambdaSchedule\.sparse_lambda must be > 0 with keep_fraction"),
        (dict(keep_fraction=0.5, lambda_schedule="constant"),
         r"^LambdaSchedule\.lambda_schedule='constant' gives keep_fraction no ramp to follow"),
        (dict(keep_fraction=0.5, lambda_start=0.1), r"^LambdaSchedule\.lambda_start=0.1 has no role with keep_fraction"),
        (dict(keep_fraction=0.5, sparsify_stages=4), r"^LambdaSchedule\.sparsify_stages steps lambda .* use one or the other"),
    ],
)
def test_keep_fraction_invalid_configs_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        LambdaSchedule(**{"sparse_lambda": 1.0, "lambda_schedule": "linear", "lambda_ramp_steps": 40, **kwargs})


def test_valid_edge_configs_accepted():
    LambdaSchedule(sparse_lambda=0.0)
    LambdaSchedule(sparse_lambda=0.1, lambda_schedule="linear", lambda_ramp_steps=1)
    LambdaSchedule(sparse_lambda=0.1, lambda_schedule="linear", lambda_ramp_steps=4, sparsify_stages=4)


# ------------------------------------------------------------------ StageRecorder


def _rec(r: StageRecorder, stage: int, mem: float, gen: float):
    return r.record(stage=stage, step=10 * (stage + 1), sparse_lambda=0.1 * stage, nonzero_params=1000 - stage,
                    memorization_score=mem, generalization_score=gen)


def test_stage_recorder_ratios_relative_to_best():
    r = StageRecorder()
    first = _rec(r, 0, 0.5, 0.6)
    assert (first.memorization_ratio, first.generalization_ratio) == (1.0, 1.0)
    _rec(r, 1, 0.8, 0.3)
    last = _rec(r, 2, 0.4, 0.9)
    assert last.stage == 2
    assert [x.memorization_ratio for x in r.records] == pytest.approx([0.5 / 0.8, 1.0, 0.5])
    assert [x.generalization_ratio for x in r.records] == pytest.approx([0.6 / 0.9, 0.3 / 0.9, 1.0])
    dicts = r.as_dicts()
    assert len(dicts) == 3
    assert dicts[1] == {
        "stage": 1,
        "step": 20,
        "sparse_lambda": 0.1,
        "nonzero_params": 999,
        "memorization_score": 0.8,
        "generalization_score": 0.3,
        "memorization_ratio": 1.0,
        "generalization_ratio": pytest.approx(1 / 3),
    }


def test_stage_recorder_zero_best_gives_zero_ratios():
    r = StageRecorder()
    _rec(r, 0, 0.0, 0.0)
    _rec(r, 1, 0.0, 0.5)
    assert [x.memorization_ratio for x in r.records] == [0.0, 0.0]
    assert [x.generalization_ratio for x in r.records] == [0.0, 1.0]


def test_stage_recorder_rejects_unknown_field():
    with pytest.raises(TypeError):
        StageRecorder().record(stage=0, step=0, sparse_lambda=0.1, nonzero_params=1, memorization_score=1.0,
                               generalization_score=1.0, accuracy=0.3)


# ------------------------------------------------------------------ keep_fraction: lambda steered by the ranks kept


def steered(kind: str = "linear", keep: float = 0.5, ramp_steps: int = 40) -> LambdaSchedule:
    return LambdaSchedule(sparse_lambda=1.0, lambda_schedule=kind, lambda_ramp_steps=ramp_steps, keep_fraction=keep)


def test_keep_fraction_target_follows_the_ramp_shape():
    assert [steered().target_keep(d) for d in (0, 10, 20, 40, 400)] == pytest.approx([1.0, 0.875, 0.75, 0.5, 0.5])
    assert steered("loglinear", keep=0.25).target_keep(20) == pytest.approx(0.5)  # geometric: 0.25 ** 0.5
    assert steered("exp").target_keep(20) == pytest.approx(1 - 0.5 * (1 - math.exp(-2.5)) / (1 - math.exp(-5)))
    assert steered(keep=1.0).target_keep(40) == 1.0


def test_keep_fraction_docstring_worked_example():
    s = steered()
    assert s.target_keep(20) == pytest.approx(0.75)
    assert s.next_lambda(1.0, 20, 0.78) == pytest.approx(math.exp(0.3))
    assert round(math.exp(0.3), 2) == 1.35
    assert s.next_lambda(1.0, 20, 0.72) == pytest.approx(math.exp(-0.3))


def test_next_lambda_raises_when_too_much_is_kept_and_lowers_when_too_little():
    s = steered()
    assert s.next_lambda(2.0, 20, 0.75) == 2.0  # on target: unchanged
    assert s.next_lambda(2.0, 20, 0.76) == pytest.approx(2.0 * math.exp(schedule_mod.KEEP_GAIN * 0.01))
    assert s.next_lambda(2.0, 20, 0.74) == pytest.approx(2.0 * math.exp(-schedule_mod.KEEP_GAIN * 0.01))
    # a large error moves lambda by at most e^KEEP_MAX_STEP per step
    assert s.next_lambda(2.0, 20, 1.0) == pytest.approx(2.0 * math.exp(schedule_mod.KEEP_MAX_STEP))
    assert s.next_lambda(2.0, 20, 0.0) == pytest.approx(2.0 * math.exp(-schedule_mod.KEEP_MAX_STEP))
    # and stays within KEEP_RANGE of sparse_lambda (1.0 here) either way
    assert s.next_lambda(999.0, 20, 1.0) == schedule_mod.KEEP_RANGE
    assert s.next_lambda(0.0011, 20, 0.0) == 1 / schedule_mod.KEEP_RANGE


def test_steered_schedule_has_no_open_loop_value():
    with pytest.raises(ValueError, match="next_lambda"):
        steered()(0)


def gate_plant(lam_tau: float, gates: list[float], push: list[float]) -> list[float]:
    """A stand-in for the gates under the proximal step: each moves by its own push (a gradient step of fixed size
    and sign), then is soft-thresholded by ``tau``; a zero gate comes back when its push exceeds tau."""
    moved = [g + p for g, p in zip(gates, push)]
    return [math.copysign(max(abs(m) - lam_tau, 0.0), m) for m in moved]


@pytest.mark.parametrize("kind", ["linear", "exp", "loglinear"])
@pytest.mark.parametrize("keep", [0.25, 0.5, 0.8])
@pytest.mark.parametrize("start", [0.01, 1.0, 10.0])
def test_controller_reaches_the_target_on_a_synthetic_plant(kind, keep, start):
    """112 gates ~ N(0, 1) pushed by up to +-lr per step (lr 1e-2, tau = lr * lambda), a 40-step ramp, then 40 steps
    holding; sparse_lambda from 100x too low to 10x too high. The plant has a cliff (every dead gate whose push beats
    tau revives in the same step), so single steps swing while the target is held (up to 0.18 at keep 0.25); the
    bounds below are those measured with some margin."""
    import random

    rng = random.Random(0)
    n, ramp_steps, lr = 112, 40, 1e-2
    gates = [rng.gauss(0.0, 1.0) for _ in range(n)]
    push = [rng.uniform(-lr, lr) for _ in range(n)]
    s = LambdaSchedule(sparse_lambda=start, lambda_schedule=kind, lambda_ramp_steps=ramp_steps, keep_fraction=keep)
    lam, kept = s.sparse_lambda, []
    for done in range(1, 2 * ramp_steps + 1):
        gates = gate_plant(lr * lam, gates, push)
        kept.append(sum(g != 0 for g in gates) / n)
        lam = s.next_lambda(lam, done, kept[-1])
    held = kept[ramp_steps:]
    assert abs(kept[ramp_steps - 1] - keep) <= 0.12, kept  # measured: at most 0.116
    assert abs(sum(held) / len(held) - keep) <= 0.04, held  # measured: at most 0.031
    assert 0 < min(kept) and max(abs(k - s.target_keep(d)) for d, k in enumerate(kept, start=1)) < 0.6


def test_unset_ramp_spans_the_run_given_by_over():
    unset = LambdaSchedule(sparse_lambda=0.1, lambda_schedule="linear")  # no lambda_ramp_steps: the whole run
    with pytest.raises(ValueError, match=r"^LambdaSchedule\.lambda_ramp_steps is not set: .*over\(total_steps\)"):
        unset(5)
    assert unset.over(10)(5) == LambdaSchedule(sparse_lambda=0.1, lambda_schedule="linear", lambda_ramp_steps=10)(5)
    assert LambdaSchedule(sparse_lambda=0.1, lambda_schedule="linear", lambda_ramp_steps=4).over(10).lambda_ramp_steps == 4
    assert LambdaSchedule(sparse_lambda=0.1, sparsify_stages=3).over(9).stage_steps == 3
    with pytest.raises(ValueError, match=r"^LambdaSchedule\.lambda_ramp_steps must be >= 1"):
        unset.over(0)
