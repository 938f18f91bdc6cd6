"""The fake-quantizer modules of :mod:`lrquant.quant.quantizers`: ``UniformQuantizer`` modes and its learnable
pieces (LWC, learned rounding, channel factors), ``QuantLinear`` freezing and ``quantization_disabled``."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lrquant.config import QuantArgs
from lrquant.errors import ConfigError
from lrquant.quant.primitives import fake_quant, fake_quant_rows, minmax_qparams, qparams_from_range
from lrquant.quant.quantizers import QuantLinear, UniformQuantizer, quant_linears, quantization_disabled

W4_GROUP = QuantArgs(4, False, "group", 16)
A8_STATIC = QuantArgs(8, False, "tensor", None, False)


def _weight(out: int = 8, cols: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(out, cols, generator=torch.Generator().manual_seed(seed))


# ---- modes ---------------------------------------------------------------------------------------------
def test_dynamic_mode_quantizes_each_input_by_its_own_range():
    q = UniformQuantizer(QuantArgs(4, False, "token", None, True))
    assert q.mode == "dynamic"
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(1))
    assert torch.equal(q(x), fake_quant_rows(x, 4, False, "token"))
    assert torch.equal(q(2 * x), fake_quant_rows(2 * x, 4, False, "token"))  # no state kept


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_observe_mode_passes_through_then_freezes_on_the_observed_range(dtype):
    q = UniformQuantizer(A8_STATIC)
    assert q.mode == "observe"
    gen = torch.Generator().manual_seed(2)
    xs = [(torch.randn(2, 4, 16, generator=gen) * (i + 1)).to(dtype) for i in range(3)]
    for x in xs:
        assert torch.equal(q(x), x)
    q.freeze()
    lo = torch.stack([x.min() for x in xs]).min().reshape(1, 1)
    hi = torch.stack([x.max() for x in xs]).max().reshape(1, 1)
    scale, zp = qparams_from_range(lo, hi, 0, 255, symmetric=False)
    assert q.mode == "static" and q.scale.dtype == dtype
    assert torch.equal(q.scale, scale) and torch.equal(q.zero_point, zp.round())


def test_static_mode_uses_the_frozen_parameters():
    q = UniformQuantizer(A8_STATIC)
    q(torch.tensor([[-1.0, 3.0]]))
    q.freeze()
    scale, zp = q.scale.clone(), q.zero_point.clone()
    x = torch.tensor([[-4.0, 0.1, 2.0, 10.0]])  # out of the observed range: clamped, not re-ranged
    assert torch.equal(q(x), fake_quant(x, scale, zp, 0, 255))
    assert q(x).max().item() == pytest.approx(3.0, abs=scale.item())


def test_freeze_without_calibration_data_is_refused():
    with pytest.raises(ConfigError, match="no calibration data"):
        UniformQuantizer(A8_STATIC).freeze()


def test_weight_quantizer_freezes_from_the_weight():
    w = _weight()
    q = UniformQuantizer(W4_GROUP, per_input=True)
    before = q(w)
    q.freeze(w)
    assert q.mode == "static" and q.scale.shape == (16, 1)
    assert torch.equal(q(w), before)


# ---- learnable pieces ----------------------------------------------------------------------------------
def test_lwc_factors_clip_each_row_and_get_gradients():
    w = _weight()
    q = UniformQuantizer(W4_GROUP, lwc_rows=16, lwc_init=4.0, per_input=True)
    lo, hi = q.clip_factors()
    assert lo.shape == hi.shape == (16, 1)
    torch.testing.assert_close(hi, torch.full((16, 1), 0.98201376))  # sigmoid(4), OmniQuant's init
    rows = q.rows(w)
    scale, zp = minmax_qparams(rows, 0, 15, False, lo, hi)
    torch.testing.assert_close(q(w), fake_quant(rows, scale, zp, 0, 15).reshape(w.shape))
    ((q(w) - w) ** 2).sum().backward()
    assert q.upbound_factor.grad.abs().sum() > 0 and q.lowbound_factor.grad.abs().sum() > 0
    assert UniformQuantizer(W4_GROUP, per_input=True).clip_factors() is None


def test_learnable_groups_name_every_trainable_tensor():
    w = _weight()
    q = UniformQuantizer(W4_GROUP, per_input=True)
    assert q.learnable() == {}
    q = UniformQuantizer(W4_GROUP, lwc_rows=16, per_input=True)
    offsets = q.enable_learned_rounding(q.rows(w))
    vector = q.enable_channel_scale(8, "cpu")
    groups = q.learnable()
    assert set(groups) == {"lwc", "round", "rot"}
    assert groups["lwc"] == [q.upbound_factor, q.lowbound_factor]
    assert groups["round"] == [offsets] and groups["rot"] == [vector]
    assert {id(p) for g in groups.values() for p in g} == {id(p) for p in q.parameters()}


def test_learned_rounding_starts_neutral_is_clamped_and_trains():
    w = _weight()
    q = UniformQuantizer(W4_GROUP, per_input=True)
    ref = q(w)
    offsets = q.enable_learned_rounding(q.rows(w))
    assert offsets.shape == (16, 16) and offsets.dtype == torch.float32
    assert torch.equal(q(w), ref)  # zero offsets: round to nearest
    ((q(w) - w) ** 2).sum().backward()
    assert offsets.grad.abs().sum() > 0
    with torch.no_grad():
        offsets.fill_(3.0)  # clamped to 0.5: at most one grid step up
    rows = q.rows(w)
    scale, zp = minmax_qparams(rows, 0, 15, False)
    expected = fake_quant(rows, scale, zp, 0, 15, torch.full_like(rows, 0.5)).reshape(w.shape)
    assert torch.equal(q(w), expected)


@pytest.mark.parametrize("strategy,group", [("channel", None), ("group", 32)])
def test_rotation_vector_folds_exactly_into_scales(strategy, group):
    """``enable_channel_scale`` factors multiply the dequantized weight; freezing folds them into ``scale``
    with the same outputs and a weight still on integer codes."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48)
    ql = QuantLinear(lin, QuantArgs(4, False, strategy, group), None, lwc=True)
    with torch.no_grad():
        ql.weight_quantizer.enable_channel_scale(48, "cpu").copy_(torch.rand(48) + 0.5)
    x = torch.randn(3, 64)
    with torch.no_grad():
        ref = ql(x)
        ql.freeze()
        out = ql(x)
    assert ql.weight_quantizer.channel_scale is None
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
    # the frozen weight is exactly representable on the new scales: integer codes
    q = ql.weight_quantizer
    rows = q.rows(ql.weight.detach())
    codes = rows / q.scale + q.zero_point
    torch.testing.assert_close(codes, codes.round(), atol=1e-3, rtol=0)


# ---- QuantLinear ---------------------------------------------------------------------------------------
def test_quant_linear_shares_parameters_and_freezes_its_weight():
    lin = nn.Linear(32, 8)
    ql = QuantLinear(lin, W4_GROUP, A8_STATIC, lwc=True)
    assert ql.weight is lin.weight and ql.bias is lin.bias
    assert set(ql.state_dict()) == {"weight", "bias", "weight_quantizer.upbound_factor",
                                    "weight_quantizer.lowbound_factor"}
    x = torch.randn(4, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ql(x)  # observe the input
        ql.input_quantizer.freeze()
        ref, wq = ql(x), ql.effective_weight().clone()
        w = ql.weight.detach().clone()
        ql.freeze()
        assert ql.weight_frozen and torch.equal(ql.weight, wq) and torch.equal(ql(x), ref)
    assert ql.quant_error == pytest.approx(float((wq - w).norm() / w.norm()))
    assert ql.weight_quantizer.upbound_factor is None and not ql.weight_quantizer.learnable()
    assert torch.equal(ql.effective_weight(), ql.weight)  # no second quantization once frozen
    ql.freeze()  # a second freeze changes nothing
    assert torch.equal(ql.weight, wq)


def test_quantization_disabled_restores_every_quantizer():
    model = nn.Sequential(QuantLinear(nn.Linear(32, 16), W4_GROUP, QuantArgs(4, False, "token", None, True)),
                          QuantLinear(nn.Linear(16, 8), W4_GROUP, None))
    model[1].weight_quantizer.enabled = False  # already off: stays off afterwards
    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(4))
    quantized = model(x)
    with torch.no_grad():
        full = nn.functional.linear(nn.functional.linear(x, model[0].weight, model[0].bias), model[1].weight,
                                    model[1].bias)
    with quantization_disabled(model):
        torch.testing.assert_close(model(x), full)
    with quantization_disabled(model, weights_only=True):
        assert model[0].input_quantizer.enabled and not model[0].weight_quantizer.enabled
    assert torch.equal(model(x), quantized)
    assert model[0].weight_quantizer.enabled and model[0].input_quantizer.enabled
    assert not model[1].weight_quantizer.enabled
    assert set(quant_linears(model)) == {"0", "1"}
