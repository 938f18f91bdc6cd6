"""Log2 / log√2 quantizers for attention probabilities: grid values, zero code, STE gradients, bit bounds
and the exact log√2 -> log2 (shift + odd-code correction) reparameterisation."""

from __future__ import annotations

import math

import pytest
import torch

from lrquant.errors import ConfigError
from lrquant.quant.log import (
    Log2Quantizer,
    LogSqrt2Quantizer,
    log2_codes,
    log2_fake_quant,
    log_sqrt2_codes,
    log_sqrt2_fake_quant,
    reparam_dequant,
    reparam_log_sqrt2_to_log2,
)

BITS = (2, 3, 4, 6, 8)


def _probs(n: int = 4096, seed: int = 0) -> torch.Tensor:
    """Softmax rows ``[n // 64, 64]`` (peaked enough to reach deep codes) plus exact zeros."""
    gen = torch.Generator().manual_seed(seed)
    p = torch.softmax(torch.randn(n // 64, 64, generator=gen) * 6, dim=-1)
    p[0, :4] = 0.0
    return p


def test_known_values_log2_4bit():
    p = torch.tensor([1.0, 0.5, 0.3, 0.25, 2.0**-14, 2.0**-14.6, 2.0**-15, 0.0])
    # 0.3 -> -log2 = 1.74 -> code 2; 2^-14 is the smallest level (code 14); code 15 means 0
    assert log2_codes(p, 4).tolist() == [0, 1, 2, 2, 14, 15, 15, 15]
    expected = torch.tensor([1.0, 0.5, 0.25, 0.25, 2.0**-14, 0.0, 0.0, 0.0])
    assert torch.equal(log2_fake_quant(p, 4), expected)
    # scale multiplies the grid
    assert torch.equal(log2_fake_quant(p * 0.5, 4, 0.5), expected * 0.5)


def test_known_values_log_sqrt2_3bit():
    p = torch.tensor([1.0, 0.75, 0.7, 0.5, 0.125, 0.1, 0.07, 0.0])
    # -2*log2: 0, 0.83, 1.03, 2, 6, 6.64, 7.67, inf -> clamp at 7 (the zero code)
    assert log_sqrt2_codes(p, 3).tolist() == [0, 1, 1, 2, 6, 7, 7, 7]
    got = log_sqrt2_fake_quant(p, 3)
    expected = torch.tensor([1.0, 2**-0.5, 2**-0.5, 0.5, 0.125, 0.0, 0.0, 0.0])
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-7)


@pytest.mark.parametrize("num_bits", BITS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_reparam_equals_log_sqrt2_exactly(num_bits, dtype):
    p = _probs().to(dtype)
    scale = torch.tensor(0.83, dtype=dtype)
    fq = log_sqrt2_fake_quant(p, num_bits, scale)
    shift, odd, zero = reparam_log_sqrt2_to_log2(log_sqrt2_codes(p, num_bits, scale), num_bits)
    assert shift.dtype == torch.int32 and odd.dtype == zero.dtype == torch.bool
    assert torch.equal(reparam_dequant(shift, odd, zero, scale, dtype=dtype), fq)  # bit for bit
    assert odd.any() and (~odd & ~zero).any()  # both branches of the correction exercised


def test_reparam_covers_every_code_exactly():
    """Every 8-bit code: the shift form equals 2^(-c/2) (float64 reference within float32 rounding) and
    the fake quantizer's value on the grid point itself."""
    codes = torch.arange(256, dtype=torch.int32)
    shift, odd, zero = reparam_log_sqrt2_to_log2(codes, 8)
    assert shift.tolist() == [c // 2 for c in range(256)]
    assert odd.tolist() == [c % 2 == 1 for c in range(256)]
    assert zero.tolist() == [c == 255 for c in range(256)]
    value = reparam_dequant(shift, odd, zero)
    ref = torch.tensor([2.0 ** (-c / 2) for c in range(255)] + [0.0], dtype=torch.float64)
    assert torch.allclose(value.double(), ref, rtol=2**-23, atol=0)
    # the grid points quantize to themselves, and to exactly the shift-form value
    grid = value[:-1]
    assert log_sqrt2_codes(grid, 8).tolist() == list(range(255))
    assert torch.equal(log_sqrt2_fake_quant(grid, 8), grid)


def test_reparam_refuses_out_of_range_codes():
    with pytest.raises(ConfigError, match=r"\[0, 15\]"):
        reparam_log_sqrt2_to_log2(torch.tensor([3, 16]), 4)


@pytest.mark.parametrize("fn", [log2_fake_quant, log_sqrt2_fake_quant])
def test_log2_values_are_powers_of_two(fn):
    p = _probs()
    v = fn(p, 4)
    nz = v[v > 0]
    steps = 1 if fn is log2_fake_quant else 2
    exps = -torch.log2(nz.double()) * steps
    torch.testing.assert_close(exps, exps.round(), rtol=0, atol=1e-6)  # integer (half-)octaves


@pytest.mark.parametrize("codes_fn, fq",
                         [(log2_codes, log2_fake_quant), (log_sqrt2_codes, log_sqrt2_fake_quant)])
@pytest.mark.parametrize("num_bits", BITS)
def test_codes_monotone_and_bounded(codes_fn, fq, num_bits):
    p = torch.linspace(0, 1.5, 5001)  # past the scale: saturates at code 0
    codes = codes_fn(p, num_bits)
    values = fq(p, num_bits)
    assert codes.dtype == torch.int32
    assert codes.min() == 0 and codes.max() == 2**num_bits - 1
    assert (codes[1:] <= codes[:-1]).all()  # larger probability, smaller code
    assert (values[1:] >= values[:-1]).all()
    assert values.max() == 1.0  # p > scale clips to the scale
    # at most 2^b levels, and a dense sweep in the log domain reaches every one float32 can hold
    # (8-bit log2 would go down to 2^-254; float32 stops at 2^-149)
    steps = 1 if codes_fn is log2_codes else 2
    deepest = min(2**num_bits - 2, 149 * steps)
    q = torch.exp2(-torch.linspace(0, (deepest + 2) / steps, 50001))
    assert len(torch.unique(codes_fn(q, num_bits))) == deepest + 2  # codes 0..deepest and the zero code
    assert len(torch.unique(fq(q, num_bits))) == deepest + 2


@pytest.mark.parametrize("fq", [log2_fake_quant, log_sqrt2_fake_quant])
def test_zero_handling(fq):
    p = torch.tensor([0.0, 1e-30, 0.0, 0.5], requires_grad=True)
    out = fq(p, 4)
    assert out[:3].tolist() == [0.0, 0.0, 0.0] and out[3] == 0.5
    out.sum().backward()
    assert torch.isfinite(p.grad).all()
    assert p.grad[:3].tolist() == [0.0, 0.0, 0.0]
    # a whole row of zeros stays zero (no NaN from log2(0))
    assert torch.equal(fq(torch.zeros(3, 5), 8), torch.zeros(3, 5))


@pytest.mark.parametrize("fq", [log2_fake_quant, log_sqrt2_fake_quant])
def test_gradient_flows_straight_through(fq):
    p = _probs().requires_grad_(True)
    scale = torch.tensor(0.5, requires_grad=True)
    weight = torch.rand(p.shape, generator=torch.Generator().manual_seed(1)) + 0.5
    out = fq(p, 4, scale)
    (out * weight).sum().backward()
    steps = 1 if fq is log2_fake_quant else 2
    inside = (out > 0) & (p.detach() < 0.5)
    clipped = p.detach() > 0.5 * 2 ** (0.5 / steps)  # code below -0.5 before the clamp to 0
    assert inside.sum() > 100 and clipped.sum() > 5
    # STE: d out / d p = out / p (out = 2^(-c) * scale with the rounding treated as identity)
    torch.testing.assert_close((p.grad / weight)[inside], (out / p).detach()[inside])
    assert p.grad[clipped].abs().max() == 0  # saturated at code 0
    assert p.grad[out.detach() == 0].abs().max() == 0  # the zero code passes no gradient
    # inside the grid the STE output does not depend on the scale; clipped entries (= scale) do
    torch.testing.assert_close(scale.grad, weight[clipped].sum(), rtol=1e-4, atol=1e-4)


def test_bit_width_bounds_are_checked():
    p = _probs()
    for bad in (1, 9, 16):
        with pytest.raises(ConfigError, match="2-8 bits"):
            log2_fake_quant(p, bad)
        with pytest.raises(ConfigError):
            LogSqrt2Quantizer(bad)
    with pytest.raises(ConfigError, match="positive"):
        Log2Quantizer(4, scale=0.0)


def test_more_bits_never_hurt():
    p = _probs()
    err = {b: (log_sqrt2_fake_quant(p, b) - p).abs().sum().item() for b in BITS}
    assert all(err[a] >= err[b] for a, b in zip(BITS[:-1], BITS[1:], strict=True))
    # log sqrt2 is finer than log2 at the same bit-width where both reach the small probabilities
    assert (log_sqrt2_fake_quant(p, 8) - p).abs().sum() < (log2_fake_quant(p, 8) - p).abs().sum()


def test_modules_match_functions_and_calibrate():
    p = _probs() * 0.6
    q2, qs = Log2Quantizer(4), LogSqrt2Quantizer(3)
    assert torch.equal(q2(p), log2_fake_quant(p, 4, 1.0))
    assert torch.equal(qs(p), log_sqrt2_fake_quant(p, 3, 1.0))
    qs.calibrate(p)
    assert float(qs.scale) == pytest.approx(float(p.max()))
    assert torch.equal(qs(p), log_sqrt2_fake_quant(p, 3, p.max()))
    assert torch.equal(qs.codes(p), log_sqrt2_codes(p, 3, p.max()))
    shift, odd, zero = qs.shift_form(p)
    assert torch.equal(reparam_dequant(shift, odd, zero, qs.scale), qs(p))
    assert "num_bits=3" in repr(qs)
    assert "scale" in dict(qs.named_buffers())
    x = p.clone().requires_grad_(True)
    q2(x).sum().backward()
    assert x.grad.abs().sum() > 0
    with pytest.raises(ConfigError):
        qs.calibrate(torch.zeros(4))


def test_sqrt2_constant():
    value = reparam_dequant(torch.tensor([0]), torch.tensor([True]), torch.tensor([False])).item()
    assert value == pytest.approx(1 / math.sqrt(2), abs=1e-7)
