"""GPTQ numerics (lrquant.quant.gptq) and the clip search (lrquant.quant.clipping)."""

from __future__ import annotations

import pytest
import torch

from lrquant.config import ClipArgs, QuantArgs
from lrquant.quant.clipping import init_clip_mse, search_clip
from lrquant.quant.gptq import HessianAccumulator, gptq_quantize
from lrquant.quant.primitives import as_rows, fake_quant_rows, minmax_qparams
from lrquant.quant.quantizers import UniformQuantizer

QMIN, QMAX = 0, 7  # 3-bit asymmetric


def _grid(group: int | None):
    def fn(cols: torch.Tensor, start: int):
        return minmax_qparams(cols, QMIN, QMAX, False)
    return fn


def _correlated_inputs(n: int = 512, cols: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, 8, generator=g)
    return base @ torch.randn(8, cols, generator=g) + 0.1 * torch.randn(n, cols, generator=g)


def test_hessian_accumulator_matches_batch_formula():
    x = torch.randn(3, 10, 6, dtype=torch.float64)
    acc = HessianAccumulator(6)
    for i in range(3):
        acc.add(x[i])
    flat = x.reshape(-1, 6)
    torch.testing.assert_close(acc.h, 2 * flat.T @ flat / flat.shape[0])


@pytest.mark.parametrize("group", [None, 16])
def test_identity_hessian_is_round_to_nearest(group):
    w = torch.randn(8, 64)
    wq, scale, zp = gptq_quantize(w, torch.eye(64), _grid(group), QMIN, QMAX, group, damp=0.0)
    ref = fake_quant_rows(w, 3, False, "group" if group else "channel", group)
    torch.testing.assert_close(wq, ref, atol=1e-6, rtol=0)
    assert scale.shape == (8, 64 // (group or 64)) and zp.shape == scale.shape


@pytest.mark.parametrize("group, act_order", [(None, False), (16, False), (16, True), (None, True)])
def test_gptq_lowers_output_error_and_stays_on_its_grid(group, act_order):
    torch.manual_seed(0)
    w = torch.randn(16, 64)
    x = _correlated_inputs()
    acc = HessianAccumulator(64)
    acc.add(x)
    wq, scale, zp = gptq_quantize(w, acc.h, _grid(group), QMIN, QMAX, group, act_order=act_order, block_size=24)
    rtn = fake_quant_rows(w, 3, False, "group" if group else "channel", group)
    err_gptq = (x @ (wq - w).T).pow(2).mean()
    err_rtn = (x @ (rtn - w).T).pow(2).mean()
    assert err_gptq < 0.7 * err_rtn
    # every weight is a grid point of its row/group: codes are integers in range
    rows = as_rows(wq, "group" if group else "channel", group)
    s, z = scale.reshape(-1, 1), zp.reshape(-1, 1)
    codes = rows / s + z
    assert (codes - codes.round()).abs().max() < 1e-3
    assert codes.round().min() >= QMIN and codes.round().max() <= QMAX


def test_clip_search_prefers_clipping_heavy_tailed_rows():
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(32, 64, generator=g)
    rows[:, 0] = 12.0                       # one outlier per row: clipping it pays at 2 bits
    f = search_clip(rows, 0, 3, False, 0.3, 40)
    assert f.shape == (32, 1) and f.median() < 0.9 and (f >= 0.3).all()
    flat = torch.randn(32, 64, generator=g).clamp(-1, 1)
    assert search_clip(flat, 0, 255, False, 0.5, 20).min() > 0.9   # 8 bits on a bounded row: ~no clip


def test_init_clip_mse_lowers_weight_error():
    w = torch.randn(16, 64) * torch.rand(16, 64).pow(4) * 5
    args = QuantArgs(3, False, "group", 32)
    q = UniformQuantizer(args, lwc_rows=32, per_input=True)
    with torch.no_grad():
        q.upbound_factor.fill_(20.0)
        q.lowbound_factor.fill_(20.0)
    before = (q(w) - w).pow(2).sum()
    init_clip_mse(q, w, ClipArgs(init="mse"))
    assert (q(w) - w).pow(2).sum() < before
