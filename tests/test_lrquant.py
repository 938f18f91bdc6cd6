"""LRQuant / LRQuant+: log init, NLC loss, rotation vectors folded exactly into the scales, two-branch
targets, test-time adaptation."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import tiny_llama

from lrquant import api
from lrquant.config import CalibArgs, Recipe, Scheme, TrainArgs, TTAStep
from lrquant.errors import ConfigError
from lrquant.losses import mse, nlc
from lrquant.methods.lrquant import log_equivalent_scales
from lrquant.quant.quantizers import QuantLinear
from lrquant.tta import adapt

CALIB = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(1))


def _recipe(method: str, wbits=4, abits=4, group=None, epochs=1, tta_blocks=0, **options) -> Recipe:
    return Recipe(method=method, scheme=Scheme.from_bits(wbits, abits, group),
                  calib=CalibArgs(nsamples=4, seqlen=16), train=TrainArgs(epochs=epochs, batch_size=2),
                  options=options, post=[TTAStep(blocks=tta_blocks)] if tta_blocks else [])


def test_log_equivalent_init_formula():
    a = torch.tensor([0.0, 1e-6, 1.0, 2.0, 100.0])
    s = log_equivalent_scales(a)
    ac = a.clamp_min(1e-5)
    torch.testing.assert_close(s, ac / torch.log2(2 + ac))
    assert s[2].item() == pytest.approx(1 / torch.log2(torch.tensor(3.0)).item())


def test_nlc_loss():
    x = torch.randn(2, 5, 8)
    assert nlc(x, x).item() == pytest.approx(0.0, abs=1e-6)
    assert nlc(x, 3 * x).item() == pytest.approx(0.0, abs=1e-6)  # scale-invariant, unlike MSE
    assert mse(x, 3 * x).item() > 0
    assert torch.isfinite(nlc(x, -x)) and nlc(x, -x).item() > 10  # cosine -1 is guarded, not NaN
    y = x.clone().requires_grad_(True)
    nlc(y, x + 0.1 * torch.randn_like(x)).backward()
    assert torch.isfinite(y.grad).all()


@pytest.mark.parametrize("method", ["lrquant", "lrquant_plus"])
def test_lrquant_methods_run_and_never_end_worse(method):
    model = tiny_llama()
    res = api.quantize(model, _recipe(method, epochs=2), CALIB, progress=False)
    for r in res.reports:
        assert r.final_loss <= r.init_loss and len(r.losses) == 2
    assert not any(isinstance(m, QuantLinear) and m.weight_quantizer.channel_scale is not None
                   for m in model.modules())
    assert torch.isfinite(model(CALIB).logits).all()


def test_lrquant_plus_uses_two_branches_and_vectors(monkeypatch):
    from lrquant.methods import learned

    seen = {}
    real = learned.LearnedMethod.trainable

    def spy(self, ctx, transforms):
        groups = real(self, ctx, transforms)
        seen[ctx.index] = ({g["name"]: len(g["params"]) for g in groups}, len(self.targets(ctx)))
        return groups

    monkeypatch.setattr(learned.LearnedMethod, "trainable", spy)
    api.quantize(tiny_llama(), _recipe("lrquant_plus"), CALIB, progress=False)
    names, branches = seen[0]
    assert names["rot"] == 3 and branches == 2   # q, o, up vectors; FP-input and quantized-input targets


def test_lrquant_plus_rejects_unknown_roles():
    with pytest.raises(ConfigError, match="options.vectors entry must be one of"):
        _recipe("lrquant_plus", vectors=["nope"])


def test_tta_adapts_last_block_on_eval_stream():
    fp = tiny_llama(layers=3)
    q = copy.deepcopy(fp)
    res = api.quantize(q, _recipe("lrquant", 4, 4, tta_blocks=1), CALIB, progress=False)
    before = copy.deepcopy(q.model.layers[2].state_dict())
    first = copy.deepcopy(q.model.layers[0].state_dict())
    tokens = torch.randint(0, 128, (1, 64), generator=torch.Generator().manual_seed(7))
    report = adapt(q, fp, res.method, tokens, TTAStep(steps=2, blocks=1, windows=2, seqlen=32, lr=1e-2))
    assert report.blocks == [2] and report.final_loss[0] <= report.init_loss[0]
    after = q.model.layers[2].state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)   # the last block changed
    assert all(torch.equal(first[k], v) for k, v in q.model.layers[0].state_dict().items())  # others did not
    assert torch.isfinite(q(tokens).logits).all()


def test_tta_without_state_is_a_clear_error():
    fp = tiny_llama()
    q = copy.deepcopy(fp)
    res = api.quantize(q, _recipe("lrquant"), CALIB, progress=False)
    with pytest.raises(ConfigError, match="no TTA state"):
        adapt(q, fp, res.method, torch.randint(0, 128, (1, 64)), TTAStep(windows=2, seqlen=32))


def test_tta_adapts_on_the_tail_and_never_on_scored_tokens():
    from lrquant.errors import DataError

    fp = tiny_llama(layers=2)
    q = copy.deepcopy(fp)
    res = api.quantize(q, _recipe("lrquant", 4, 4, tta_blocks=1), CALIB, progress=False)
    tokens = torch.randint(0, 128, (1, 96), generator=torch.Generator().manual_seed(7))
    adapt(q, fp, res.method, tokens, TTAStep(steps=1, blocks=1, windows=1, seqlen=32), held_out=64)
    with pytest.raises(DataError, match="after the 80 scored"):
        adapt(q, fp, res.method, tokens, TTAStep(steps=1, blocks=1, windows=1, seqlen=32), held_out=80)
