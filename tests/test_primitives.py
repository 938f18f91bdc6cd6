"""The pure functions of :mod:`lrquant.quant.primitives`: grid, STE, granularity, parameters, fake quant,
integer codes and int32 packing."""

from __future__ import annotations

import pytest
import torch

from lrquant.config import QuantArgs
from lrquant.errors import ConfigError
from lrquant.quant.primitives import (
    SCALE_EPS,
    as_rows,
    dequantize,
    fake_quant,
    fake_quant_rows,
    minmax_qparams,
    pack_int32,
    qparams_from_range,
    qrange,
    quantize,
    round_ste,
    signed_offset,
    unpack_int32,
)

BITS = [2, 3, 4, 8]


# ---- integer grid --------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", BITS)
def test_grid_and_signed_offset(bits):
    """``qrange`` is the grid ``QuantArgs`` reports; ``signed_offset`` maps it onto the signed grid."""
    assert qrange(bits, True) == (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    assert qrange(bits, False) == (0, 2**bits - 1)
    for symmetric in (True, False):
        args = QuantArgs(bits, symmetric)
        assert (args.qmin, args.qmax) == qrange(bits, symmetric)
    lo, hi = qrange(bits, False)
    off = signed_offset(bits, False)
    assert (lo - off, hi - off) == qrange(bits, True)  # asymmetric codes shifted onto the signed grid
    assert signed_offset(bits, True) == 0 and signed_offset(bits, False) == 2 ** (bits - 1)


# ---- straight-through estimator -----------------------------------------------------------------------
def test_round_ste_rounds_forward_and_passes_gradient():
    x = torch.tensor([-1.6, -0.4, 0.49, 1.5, 2.51], requires_grad=True)
    y = round_ste(x)
    assert torch.equal(y.detach(), x.detach().round())
    (y * torch.arange(5.0)).sum().backward()
    assert torch.equal(x.grad, torch.arange(5.0))  # identity gradient


# ---- granularity ---------------------------------------------------------------------------------------
def test_as_rows_shapes():
    w = torch.arange(48.0).reshape(6, 8)
    assert as_rows(w, "tensor").shape == (1, 48)
    assert torch.equal(as_rows(w, "channel"), w)
    assert torch.equal(as_rows(w, "group", 4), w.reshape(12, 4))  # groups run along each row
    assert as_rows(torch.zeros(2, 3, 8), "token").shape == (6, 8)


def test_as_rows_refuses_bad_groups_and_strategies():
    w = torch.zeros(6, 8)
    with pytest.raises(ConfigError, match="does not divide"):
        as_rows(w, "group", 3)
    with pytest.raises(ConfigError, match="does not divide"):
        as_rows(w, "group")
    with pytest.raises(ConfigError, match="unknown strategy"):
        as_rows(w, "block")


# ---- parameters ----------------------------------------------------------------------------------------
def test_qparams_from_range_asymmetric():
    xmin, xmax = torch.tensor([[-1.0], [0.5], [-3.0]]), torch.tensor([[3.0], [2.0], [-1.0]])
    scale, zp = qparams_from_range(xmin, xmax, 0, 15, symmetric=False)
    # the range is widened to contain 0: [0, 2] and [-3, 0]
    torch.testing.assert_close(scale, torch.tensor([[4 / 15], [2 / 15], [3 / 15]]))
    torch.testing.assert_close(zp, torch.tensor([[4.0], [0.0], [15.0]]))  # round(1 / (4/15)) = 4
    assert scale.shape == zp.shape == (3, 1)


def test_qparams_from_range_symmetric():
    xmin, xmax = torch.tensor([[-1.0], [-4.0]]), torch.tensor([[3.5], [2.0]])
    scale, zp = qparams_from_range(xmin, xmax, -8, 7, symmetric=True)
    torch.testing.assert_close(scale, torch.tensor([[3.5 / 7], [4.0 / 7]]))  # absmax / qmax
    assert torch.equal(zp, torch.zeros(2, 1))


def test_qparams_of_an_all_zero_range_use_the_scale_floor():
    scale, zp = qparams_from_range(torch.zeros(1, 1), torch.zeros(1, 1), 0, 15, symmetric=False)
    assert scale.item() == pytest.approx(SCALE_EPS) and zp.item() == 0
    assert torch.equal(fake_quant(torch.zeros(1, 4), scale, zp, 0, 15), torch.zeros(1, 4))


def test_minmax_qparams_and_clip_factors_with_gradient():
    rows = torch.tensor([[-2.0, 0.0, 6.0], [-1.0, 1.0, 3.0]])
    scale, zp = minmax_qparams(rows, 0, 15, False)
    torch.testing.assert_close(scale, torch.tensor([[8 / 15], [4 / 15]]))
    factors = torch.tensor([[0.5], [1.0]], requires_grad=True)
    clipped, _ = minmax_qparams(rows, 0, 15, False, factors, factors)
    torch.testing.assert_close(clipped, torch.tensor([[4 / 15], [4 / 15]]))  # row 0 clipped to [-1, 3]
    clipped.sum().backward()
    assert factors.grad[0].item() > 0


# ---- fake quantization and integer codes -------------------------------------------------------------
@pytest.mark.parametrize("symmetric", [False, True])
def test_fake_quant_lies_on_grid_within_half_a_step(symmetric):
    gen = torch.Generator().manual_seed(0)
    rows = torch.randn(8, 32, generator=gen)
    qmin, qmax = qrange(4, symmetric)
    scale, zp = minmax_qparams(rows, qmin, qmax, symmetric)
    y = fake_quant(rows, scale, zp, qmin, qmax)
    codes = y / scale + zp
    torch.testing.assert_close(codes, codes.round(), atol=1e-4, rtol=0)
    assert codes.min() >= qmin - 1e-4 and codes.max() <= qmax + 1e-4
    assert ((rows - y).abs() <= scale / 2 + 1e-6).all()  # the min-max range is inside the grid


def test_fake_quant_clamps_outside_the_grid():
    scale, zp = torch.tensor([[0.5]]), torch.tensor([[2.0]])  # representable: [-1, 6.5]
    y = fake_quant(torch.tensor([[-5.0, 100.0]]), scale, zp, 0, 15)
    assert torch.equal(y, torch.tensor([[-1.0, 6.5]]))


def test_fake_quant_offset_flips_rounding_and_gets_gradient():
    x = torch.tensor([[0.3, 0.7, 1.2]])
    scale, zp = torch.tensor([[1.0]]), torch.tensor([[0.0]])
    assert torch.equal(fake_quant(x, scale, zp, 0, 15), torch.tensor([[0.0, 1.0, 1.0]]))
    offset = torch.tensor([[0.3, -0.3, 0.0]], requires_grad=True)
    y = fake_quant(x, scale, zp, 0, 15, offset)
    assert torch.equal(y.detach(), torch.tensor([[1.0, 0.0, 1.0]]))  # 0.3 rounds up, 0.7 down
    y.sum().backward()
    assert torch.equal(offset.grad, torch.ones(1, 3))  # through the STE, times scale
    assert torch.equal(fake_quant(x, scale, zp, 0, 15, torch.zeros_like(x)), fake_quant(x, scale, zp, 0, 15))


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bits", BITS)
def test_quantize_dequantize_equals_fake_quant(bits, symmetric):
    gen = torch.Generator().manual_seed(bits)
    rows = torch.randn(16, 64, generator=gen) * 3
    qmin, qmax = qrange(bits, symmetric)
    scale, zp = minmax_qparams(rows, qmin, qmax, symmetric)
    q = quantize(rows, scale, zp, qmin, qmax)
    assert q.dtype == torch.int32 and q.min() >= qmin and q.max() <= qmax
    assert torch.equal(dequantize(q, scale, zp), fake_quant(rows, scale, zp, qmin, qmax))
    assert torch.equal(quantize(dequantize(q, scale, zp), scale, zp, qmin, qmax), q)  # codes are a fixed point


@pytest.mark.parametrize("strategy,group", [("tensor", None), ("channel", None), ("group", 16), ("token", None)])
def test_fake_quant_rows_is_minmax_fake_quant_per_row(strategy, group):
    x = torch.randn(2, 6, 32, generator=torch.Generator().manual_seed(1))
    rows = as_rows(x, strategy, group)
    scale, zp = minmax_qparams(rows, 0, 7, False)
    expected = fake_quant(rows, scale, zp, 0, 7).reshape(x.shape)
    assert torch.equal(fake_quant_rows(x, 3, False, strategy, group), expected)


# ---- packing -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", BITS)
def test_pack_unpack_bit_exact(bits):
    """``pack_int32`` / ``unpack_int32`` give back every code, both ends of the grid included, for row
    lengths that fill whole words or not (the compressed-tensors layout check is in test_export)."""
    g = torch.Generator().manual_seed(bits)
    for cols in (64, 100, 7):
        q = torch.randint(0, 2**bits, (13, cols), generator=g, dtype=torch.int32)
        q[0, 0], q[-1, -1] = 0, 2**bits - 1  # both ends of the grid
        words = pack_int32(q, bits)
        assert words.dtype == torch.int32 and words.shape[-1] == -(-cols // (32 // bits))
        assert torch.equal(unpack_int32(words, bits, cols), q)
