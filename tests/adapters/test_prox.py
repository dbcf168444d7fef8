"""Unit tests for sora_ds.adapters.prox: the soft threshold and the threshold conventions."""

import math

import pytest
import torch

from sora_ds.adapters.prox import THRESHOLD_MODES, soft_threshold, threshold

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("single_thread")]


TAU = 0.5


def _reference(x: torch.Tensor, tau: float) -> torch.Tensor:
    """sign(x) * max(|x| - tau, 0), element by element in Python double precision."""
    vals = [math.copysign(max(abs(v) - tau, 0.0), v) if abs(v) > tau else 0.0 for v in x.double().tolist()]
    return torch.tensor(vals, dtype=torch.float64)


def test_just_above_tau_gives_tiny_result_with_correct_sign():
    x = torch.tensor([TAU + 1e-6, -(TAU + 1e-6)], dtype=torch.float32)
    out = soft_threshold(x, TAU)
    assert out.dtype == torch.float32
    # fp32 nearest value to 0.500001 is 0.50000101327896..., so the exact shrink is x32 - 0.5
    expected = x.double().abs() - TAU
    assert out[0].item() > 0 and out[1].item() < 0
    assert out[0].item() == pytest.approx(expected[0].item(), rel=0, abs=0)
    assert out[1].item() == pytest.approx(-expected[1].item(), rel=0, abs=0)
    assert 1e-6 < out[0].item() < 1.1e-6


def test_values_between_tau_and_two_tau_are_shrunk_not_zeroed():
    # The authors' implementation zeroed these; the correct prox shrinks them by tau.
    x = torch.tensor([0.6, 0.75, 0.9, 0.99, -0.6, -0.75, -0.99], dtype=torch.float32)
    out = soft_threshold(x, TAU)
    assert torch.all(out != 0)
    torch.testing.assert_close(out, (x.abs() - TAU) * torch.sign(x), rtol=0, atol=0)
    torch.testing.assert_close(out.double(), _reference(x, TAU), rtol=0, atol=1e-7)


def test_exactly_tau_gives_zero():
    x = torch.tensor([TAU, -TAU], dtype=torch.float32)
    out = soft_threshold(x, TAU)
    assert out.tolist() == [0.0, 0.0]


def test_below_tau_gives_zero():
    x = torch.tensor([0.1, -0.1, 0.4999, -0.4999, 1e-30], dtype=torch.float32)
    out = soft_threshold(x, TAU)
    assert torch.all(out == 0)


def test_zero_stays_positive_zero_without_nan():
    x = torch.zeros(4, dtype=torch.float32)
    out = soft_threshold(x, TAU)
    assert not torch.isnan(out).any()
    assert torch.all(out == 0)
    # +0 in, +0 out (copysign(1, +0) == 1)
    assert all(math.copysign(1.0, v) == 1.0 for v in out.tolist())
    out0 = soft_threshold(x, 0.0)
    assert not torch.isnan(out0).any()
    assert all(v == 0.0 and math.copysign(1.0, v) == 1.0 for v in out0.tolist())


def test_negative_values_symmetric():
    pos = torch.tensor([0.2, 0.5, 0.6, 1.0, 3.25, 100.0], dtype=torch.float32)
    torch.testing.assert_close(soft_threshold(-pos, TAU), -soft_threshold(pos, TAU), rtol=0, atol=0)


def test_large_values_shrunk_by_exactly_tau():
    x = torch.tensor([1.0, 2.5, 10.0, -7.0, 1024.0], dtype=torch.float32)
    out = soft_threshold(x, TAU)
    assert out.tolist() == [0.5, 2.0, 9.5, -6.5, 1023.5]


def test_returns_new_tensor_and_does_not_modify_input():
    x = torch.tensor([1.0, -0.2, 0.7])
    before = x.clone()
    out = soft_threshold(x, TAU)
    assert out.data_ptr() != x.data_ptr()
    assert torch.equal(x, before)


def test_bf16_in_bf16_out_rounded_once_from_fp32():
    torch.manual_seed(0)
    x = (torch.randn(4096) * 2).to(torch.bfloat16)
    # include values just above tau in bf16 (the bf16 grid spacing at 0.5 is 2**-8)
    x = torch.cat([x, torch.tensor([0.5 + 2**-8, -(0.5 + 2**-8), 0.5 + 2**-7, 0.5], dtype=torch.bfloat16)])
    out = soft_threshold(x, TAU)
    assert out.dtype == torch.bfloat16
    x32 = x.float()
    expected = (torch.sign(x32) * torch.clamp(x32.abs() - TAU, min=0.0)).to(torch.bfloat16)
    assert torch.equal(out, expected)
    # a value one bf16 ulp above tau is shrunk, not lost
    assert out[-4].item() == 2**-8 and out[-3].item() == -(2**-8)
    assert out[-2].item() == 2**-7
    assert out[-1].item() == 0.0


def test_bf16_shrink_rounds_once_not_twice():
    # 0.75 - 0.3 = 0.45 computed in fp32 then rounded once to bf16.
    x = torch.tensor([0.75, -1.5, 3.0], dtype=torch.bfloat16)
    tau = 0.3
    out = soft_threshold(x, tau)
    exact = torch.tensor([0.75 - tau, -(1.5 - tau), 3.0 - tau], dtype=torch.float64)
    expected = exact.float().to(torch.bfloat16)
    assert torch.equal(out, expected)


def test_fp16_roundtrip_dtype():
    x = torch.tensor([0.75, -0.25, -2.0], dtype=torch.float16)
    out = soft_threshold(x, TAU)
    assert out.dtype == torch.float16
    assert out.tolist() == [0.25, 0.0, -1.5]


def test_fp64_input_keeps_fp64_precision():
    # The docstring promises an exact prox and only *low-precision* inputs are computed in fp32;
    # an fp64 input must not lose precision by a round trip through fp32.
    x = torch.tensor([0.5 + 1e-12, 1.0 + 1e-12, -(0.5 + 1e-12)], dtype=torch.float64)
    out = soft_threshold(x, TAU)
    assert out.dtype == torch.float64
    expected = torch.sign(x) * torch.clamp(x.abs() - TAU, min=0.0)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-15)


def test_tau_zero_is_identity():
    torch.manual_seed(1)
    x = torch.randn(257)
    assert torch.equal(soft_threshold(x, 0.0), x)
    xb = x.to(torch.bfloat16)
    assert torch.equal(soft_threshold(xb, 0.0), xb)


def test_negative_tau_raises():
    with pytest.raises(ValueError, match="tau"):
        soft_threshold(torch.ones(3), -1e-9)


def test_elementwise_on_slices():
    torch.manual_seed(2)
    x = torch.randn(100)
    whole = soft_threshold(x, 0.3)
    parts = torch.cat([soft_threshold(x[:37], 0.3), soft_threshold(x[37:], 0.3)])
    assert torch.equal(whole, parts)


def test_preserves_shape():
    x = torch.randn(3, 4, 5)
    assert soft_threshold(x, 0.1).shape == (3, 4, 5)


@pytest.mark.parametrize(
    "lr,lam,mode,expected",
    [
        (1e-3, 0.5, "lr_scaled", 5e-4),
        (2e-2, 3.0, "lr_scaled", 6e-2),
        (0.0, 3.0, "lr_scaled", 0.0),
        (1e-3, 0.5, "absolute", 0.5),
        (123.0, 0.25, "absolute", 0.25),
        (1e-3, 0.0, "absolute", 0.0),
    ],
)
def test_threshold_modes(lr, lam, mode, expected):
    assert threshold(lr, lam, mode) == pytest.approx(expected, rel=1e-15, abs=0)


def test_threshold_mode_names():
    assert THRESHOLD_MODES == ("lr_scaled", "absolute")


@pytest.mark.parametrize("bad", ["lr-scaled", "Absolute", "", "relative"])
def test_threshold_unknown_mode_names_allowed_values(bad):
    with pytest.raises(ValueError) as info:
        threshold(1e-3, 0.1, bad)
    msg = str(info.value)
    assert "threshold_mode" in msg
    assert "lr_scaled" in msg and "absolute" in msg
    assert repr(bad) in msg


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_batched_in_place_soft_threshold_equals_reference(dtype):
    """The optimizer's batched in-place form gives the reference values bit for bit (zeros as +-0 alike)."""
    from sora_ds.adapters.prox import soft_threshold_

    tau = 0.25
    edge = torch.tensor([0.0, tau, -tau, 0.3, -0.3, 0.5, -0.5, 0.49, 1e-9, 7.0], dtype=dtype)
    tensors = [edge.clone(), torch.randn(257, dtype=torch.float64).to(dtype), torch.randn(3, 5).to(dtype)]
    expected = [soft_threshold(t, tau) for t in tensors]
    soft_threshold_(tensors, tau)
    for got, ref in zip(tensors, expected):
        assert got.dtype == dtype
        assert torch.equal(got, ref)
    untouched = [torch.randn(4).to(dtype)]
    before = untouched[0].clone()
    soft_threshold_(untouched, 0.0)
    assert torch.equal(untouched[0], before)
    with pytest.raises(ValueError, match="tau must be >= 0"):
        soft_threshold_(untouched, -1.0)
