"""Rounding stages (GPTQ, learned) and the objective fixes, end to end on tiny models: they compose
with every method and the rotation, leave every weight on its exported grid, and train what they say."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from helpers import tiny_llama

from lrquant import api
from lrquant.config import CalibArgs, Recipe, RotationStep, Scheme, TrainArgs
from lrquant.losses import massive_token_mask, mse, nlc
from lrquant.methods import learned
from lrquant.quant.primitives import as_rows
from lrquant.quant.quantizers import quant_linears
from lrquant.transforms.scale_shift import ScaleShift

CALIB = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(3))


def _recipe(method: str, wbits=3, abits=16, group=32, **sections) -> Recipe:
    return Recipe(method=method, scheme=Scheme.from_bits(wbits, abits, group, kv_bits=16),
                  calib=CalibArgs(nsamples=4, seqlen=16), train=sections.pop("train", TrainArgs(epochs=1)),
                  **sections)


def _assert_on_grid(model) -> None:
    """Every frozen weight is (code - zero) * scale with integer codes in range: export is exact."""
    for block in model.model.layers:
        for name, lin in quant_linears(block).items():
            q = lin.weight_quantizer
            assert lin.weight_frozen, name
            rows = as_rows(lin.weight.detach(), q.args.strategy, q.args.group_size)
            codes = rows / q.scale + q.zero_point
            assert (codes - codes.round()).abs().max() < 1e-3, name
            assert codes.round().min() >= q.qmin and codes.round().max() <= q.qmax, name


def _block_error(model, ref) -> float:
    with torch.no_grad():
        return float((model(CALIB).logits - ref(CALIB).logits).pow(2).mean())


@pytest.mark.parametrize("method", ["rtn", "smoothquant", "omniquant", "affinequant", "lrquant", "lrquant_plus"])
def test_gptq_composes_with_every_method_and_beats_its_rtn(method):
    fp = tiny_llama()
    base = api.quantize(copy.deepcopy(fp), _recipe(method), CALIB, progress=False).model
    gptq = api.quantize(copy.deepcopy(fp), _recipe(method, rounding={"kind": "gptq"}), CALIB, progress=False).model
    _assert_on_grid(gptq)
    assert _block_error(gptq, fp) < _block_error(base, fp)


def test_gptq_with_rotation_and_activations():
    fp = tiny_llama()
    r = _recipe("lrquant_plus", wbits=4, abits=4, group=None, rounding={"kind": "gptq", "act_order": True},
                pre=[RotationStep()])
    res = api.quantize(copy.deepcopy(fp), r, CALIB, progress=False)
    _assert_on_grid(res.model)
    assert torch.isfinite(res.model(CALIB).logits).all()


def test_learned_rounding_trains_offsets_and_folds_them():
    fp = tiny_llama()
    seen = {}
    real = learned.LearnedMethod.trainable

    def spy(self, ctx, transforms):
        groups = real(self, ctx, transforms)
        seen[ctx.index] = {g["name"]: g["params"] for g in groups}
        return groups

    mp = pytest.MonkeyPatch()
    mp.setattr(learned.LearnedMethod, "trainable", spy)
    try:
        r = _recipe("omniquant", rounding={"kind": "learned"}, train=TrainArgs(iters=6, lr_schedule="linear"))
        res = api.quantize(copy.deepcopy(fp), r, CALIB, progress=False)
    finally:
        mp.undo()
    offsets = seen[0]["round"]
    assert len(offsets) == 7 and any(float(o.abs().max()) > 0 for o in offsets)   # one per linear; they moved
    _assert_on_grid(res.model)
    assert all(lin.weight_quantizer.rounding_offset is None for lin in quant_linears(res.model).values())


def test_export_of_gptq_run_is_exact(tmp_path):
    from lrquant.export.compressed import export_compressed, load_compressed

    model = api.quantize(tiny_llama(), _recipe("omniquant", wbits=4, rounding={"kind": "gptq"}), CALIB,
                         progress=False).model
    path = export_compressed(model, Scheme.from_bits(4, 16, 32), tmp_path / "ct")
    loaded = load_compressed(path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(CALIB).logits, model(CALIB).logits, atol=1e-5, rtol=1e-5)


def test_clip_mse_init_helps_rtn_at_two_bits():
    fp = tiny_llama()
    plain = api.quantize(copy.deepcopy(fp), _recipe("rtn", wbits=2), CALIB, progress=False).model
    searched = api.quantize(copy.deepcopy(fp), _recipe("rtn", wbits=2, clip={"init": "mse"}), CALIB,
                            progress=False).model
    _assert_on_grid(searched)
    err = lambda m: sum(float(lin.quant_error) for lin in quant_linears(m).values())  # noqa: E731
    assert err(searched) < err(plain)


def test_iters_schedule_and_keep_best():
    fp = tiny_llama(layers=1)
    r = _recipe("lrquant", abits=4, group=None,
                train=TrainArgs(iters=5, batch_size=2, lr_schedule="cosine", keep_best=True))
    res = api.quantize(copy.deepcopy(fp), r, CALIB, progress=False)
    rep = res.reports[0]
    assert rep.final_loss <= rep.init_loss
    assert len(rep.losses) == 5          # checks every max(1, 5 // 8) = 1 step


def test_sign_optimizer_moves_each_parameter_by_its_lr():
    from lrquant.methods.learned import SignSGD

    p = torch.nn.Parameter(torch.tensor([0.0, 1.0, -2.0]))
    q = torch.nn.Parameter(torch.tensor([0.5]))
    opt = SignSGD([{"params": [p], "lr": 0.1}, {"params": [q], "lr": 0.01}])
    (p * torch.tensor([3.0, -1e-6, 0.0])).sum().backward()       # no gradient at all on q
    opt.step()
    assert p.tolist() == pytest.approx([-0.1, 1.1, -2.0]) and q.item() == 0.5
    r = _recipe("omniquant", wbits=2, rounding={"kind": "learned"},
                train=TrainArgs(iters=4, batch_size=2, optimizer="sign", lr_schedule="linear",
                                lr={"round": 0.25, "lwc": 0.05}))
    res = api.quantize(tiny_llama(layers=1), r, CALIB, progress=False)
    _assert_on_grid(res.model)
    assert res.reports[0].final_loss <= res.reports[0].init_loss


def test_massive_token_mask_and_masked_losses():
    t = torch.ones(2, 6, 4)
    t[:, 0] *= 100.0                     # a sink token per sample
    mask = massive_token_mask(t, 20.0)
    assert mask.tolist() == [[False] + [True] * 5] * 2
    pred = t.clone()
    pred[:, 0] += 50.0                   # error only on the sink
    assert float(mse(pred, t, mask)) == 0.0 and float(mse(pred, t)) > 0
    assert float(nlc(pred, t, mask)) == pytest.approx(0.0, abs=1e-6)
    r = _recipe("lrquant", abits=4, group=None, loss={"mask": "massive", "mask_ratio": 1.0})
    res = api.quantize(tiny_llama(layers=1), r, CALIB, progress=False)
    assert any("loss mask" in n for n in res.reports[0].notes)


def test_log_scale_parameter_folds_exactly():
    from lrquant.arch.base import get_mapping
    from lrquant.transforms import fold_block

    model = tiny_llama(layers=1).double()
    block = model.model.layers[0]
    mapping = get_mapping(model)
    pair = next(p for p in mapping.smooth_pairs() if p.kind == "norm")
    x = torch.randn(2, 16, 64, dtype=torch.float64)
    pos = torch.arange(16)[None]
    emb = model.model.rotary_emb(x, pos)
    before = block(x, position_embeddings=emb)[0] if isinstance(block(x, position_embeddings=emb), tuple) else \
        block(x, position_embeddings=emb)
    t = ScaleShift(pair, mapping, model.config, torch.rand(64) * 3 + 0.1, param="log", block=block).double()
    with torch.no_grad():
        t.scale.add_(0.3)                # a trained, non-trivial log-scale
    t.attach(block)
    fold_block(block)
    after = block(x, position_embeddings=emb)
    after = after[0] if isinstance(after, tuple) else after
    torch.testing.assert_close(after, before, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("method", ["omniquant", "affinequant", "lrquant_plus"])
def test_rounded_guard_keeps_the_better_of_trained_and_init_after_gptq(method):
    """``train.guard: rounded`` folds and GPTQ-rounds both the trained and the initial parameters and keeps
    the lower calibration loss: block 0's weights equal those of the run that trained (guard ``loss``) or of
    the run that did not (no steps), whichever its note says won, and that note's losses are compared."""
    fp = tiny_llama(layers=1)

    def run(**train):
        r = _recipe(method, rounding={"kind": "gptq"}, train=TrainArgs(batch_size=2, **train))
        return api.quantize(copy.deepcopy(fp), r, CALIB, progress=False)

    judged = run(iters=6, guard="rounded")
    trained = run(iters=6)
    untrained = run(epochs=0)
    _assert_on_grid(judged.model)
    note = next(n for n in judged.reports[0].notes if n.startswith("guard after rounding"))
    loss_init, loss_trained = map(float, re.match(r"guard after rounding: init (\S+), trained (\S+);", note).groups())
    winner = trained if loss_trained < loss_init else untrained
    assert note.endswith("trained" if winner is trained else "init")
    for (name, a), (_, b) in zip(judged.model.state_dict().items(), winner.model.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=name)
