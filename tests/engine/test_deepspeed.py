"""The DeepSpeed guard: a version outside the tested range, or one whose ZeRO internals moved, stops the run at
start-up with a message instead of failing mid-run."""

from __future__ import annotations

import types

import pytest
import torch

from sora_ds.engine.deepspeed import (
    ALLOW_UNTESTED_DEEPSPEED,
    TESTED_DEEPSPEED,
    UnsupportedDeepSpeed,
    check_deepspeed_internals,
    check_deepspeed_version,
)

pytestmark = pytest.mark.unit


def test_installed_deepspeed_is_in_the_tested_range():
    check_deepspeed_version()  # CI installs what pyproject allows: that must be a tested version


@pytest.mark.parametrize("version", [*TESTED_DEEPSPEED, f"{TESTED_DEEPSPEED[1]}+cu124"])
def test_tested_versions_pass(version):
    check_deepspeed_version(version)


@pytest.mark.parametrize("version", ["0.14.5", "0.20.0", "1.0.0"])
def test_untested_version_is_refused_with_the_range_and_the_way_out(version, monkeypatch):
    monkeypatch.delenv(ALLOW_UNTESTED_DEEPSPEED, raising=False)
    with pytest.raises(UnsupportedDeepSpeed) as err:
        check_deepspeed_version(version)
    message = str(err.value)
    assert version in message and TESTED_DEEPSPEED[0] in message and TESTED_DEEPSPEED[1] in message
    assert ALLOW_UNTESTED_DEEPSPEED in message
    monkeypatch.setenv(ALLOW_UNTESTED_DEEPSPEED, "1")
    check_deepspeed_version(version)


def param(**attrs) -> torch.nn.Parameter:
    p = torch.nn.Parameter(torch.zeros(2))
    for k, v in attrs.items():
        setattr(p, k, v)
    return p


def test_moved_zero3_internals_are_named():
    z3 = types.SimpleNamespace(grad_position={}, get_param_id=lambda p: 0)  # no fp32_partitioned_groups_flat
    with pytest.raises(UnsupportedDeepSpeed, match="fp32_partitioned_groups_flat"):
        check_deepspeed_internals([param(ds_id=0, _z3_optimizer=z3)], stage=3)
    with pytest.raises(UnsupportedDeepSpeed, match="_z3_optimizer"):
        check_deepspeed_internals([param(ds_id=0)], stage=3)
    z3.fp32_partitioned_groups_flat = []
    check_deepspeed_internals([param(ds_id=0, _z3_optimizer=z3)], stage=3)


def test_moved_zero2_internals_are_named():
    with pytest.raises(UnsupportedDeepSpeed, match="ZeRO-2 internals.*_hp_mapping"):
        check_deepspeed_internals([param()], stage=2)
    check_deepspeed_internals([param(_hp_mapping=None)], stage=2)
    check_deepspeed_internals([param()], stage=0)  # no DeepSpeed: nothing to check
