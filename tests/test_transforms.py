"""Transforms: exact folds on every supported architecture (float64), temporary path == folded path,
and the learned methods' guarantees (never worse than init, one epoch works, NaN rollback)."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import CASES, attach_random, randomize, tiny_llama

from lrquant import api
from lrquant.arch import get_mapping
from lrquant.config import CalibArgs, Recipe, Scheme, TrainArgs
from lrquant.methods.rtn import RTN
from lrquant.transforms import copy_block, fold_block

IDS = torch.randint(1, 128, (2, 12), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("affine", [False, True], ids=["scale_shift", "affine"])
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_fold_is_exact_in_float64(case, affine):
    torch.manual_seed(0)
    model = randomize(case.build(), seed=1).double()
    with torch.no_grad():
        ref = model(IDS, use_cache=False).logits
        gen = torch.Generator().manual_seed(5)
        for block in model.get_submodule(get_mapping(model).blocks):
            attach_random(model, block, gen, affine)
        temporary = model(IDS, use_cache=False).logits
        for block in model.get_submodule(get_mapping(model).blocks):
            fold_block(block)
        folded = model(IDS, use_cache=False).logits
    assert (ref - ref.mean()).abs().max() > 1e-3  # the check can fail: outputs are not constant
    torch.testing.assert_close(temporary, ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(folded, ref, atol=1e-6, rtol=1e-6)
    assert not any("parametrizations" in n for n, _ in model.named_parameters())


@pytest.mark.parametrize("affine", [False, True], ids=["scale_shift", "affine"])
def test_a_copied_parametrized_block_folds_independently(affine):
    """``copy_block``: the copy and the original fold one after the other (``copy.deepcopy`` shares torch's
    ``Parametrized*`` class, so the second fold used to fail) and both compute the original block."""
    model = randomize(CASES[0].build(), seed=1).double()
    block = model.get_submodule(get_mapping(model).blocks)[0]
    with torch.no_grad():
        ref = model(IDS, use_cache=False).logits
        attach_random(model, block, torch.Generator().manual_seed(5), affine)
        clone = copy_block(block)
        fold_block(clone)
        fold_block(block)
        folded = model(IDS, use_cache=False).logits
        block_list = model.get_submodule(get_mapping(model).blocks)
        block_list[0] = clone
        from_clone = model(IDS, use_cache=False).logits
    torch.testing.assert_close(folded, ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(from_clone, ref, atol=1e-6, rtol=1e-6)


def test_wrong_fold_is_detected():
    """Negative control: a transform attached on one side only changes the output."""
    model = randomize(CASES[0].build(), seed=1).double()
    mapping = get_mapping(model)
    block = model.get_submodule(mapping.blocks)[0]
    with torch.no_grad():
        ref = model(IDS, use_cache=False).logits
        pair = mapping.smooth_pairs()[0]
        block.get_submodule(pair.prev).weight.mul_(2.0)  # scale the norm without compensating the linears
        assert (model(IDS, use_cache=False).logits - ref).abs().max() > 1e-3


def _recipe(method: str, wbits=4, abits=4, group=None, epochs=1, **options) -> Recipe:
    return Recipe(method=method, scheme=Scheme.from_bits(wbits, abits, group),
                  calib=CalibArgs(nsamples=4, seqlen=16), train=TrainArgs(epochs=epochs, batch_size=2),
                  options=options)


def test_training_path_equals_folded_path():
    """The quantized block with transforms attached (training) equals the folded + frozen block."""
    from lrquant.engine import BlockContext, BlockReport
    from lrquant.methods.transformed import OmniQuant

    model = tiny_llama().double()
    mapping = get_mapping(model)
    block = model.model.layers[0]
    x = torch.randn(2, 12, 64, dtype=torch.float64)
    pos = torch.arange(12)[None]
    kwargs = {"position_embeddings": model.model.rotary_emb(x, pos), "attention_mask": None}
    recipe = _recipe("omniquant", 4, 8)
    method = OmniQuant(recipe)
    method.prepare_model(model, mapping, None)
    ctx = BlockContext(0, "model.layers.0", block, mapping, model.config, recipe, x, x, x, kwargs,
                       torch.device("cpu"), torch.Generator().manual_seed(0), BlockReport(0))
    method.prepare_block(ctx)
    for q in block.modules():
        if hasattr(q, "upbound_factor") and q.upbound_factor is not None:
            q.double()
    attach_random(model, block, torch.Generator().manual_seed(9), affine=False)
    with torch.no_grad():
        temporary = block(x, **kwargs)
        fold_block(block)
        method.freeze_weights(block)
        folded = block(x, **kwargs)
    torch.testing.assert_close(folded, temporary, atol=1e-8, rtol=1e-8)


@pytest.mark.parametrize("method", ["smoothquant", "omniquant", "affinequant"])
def test_methods_run_one_epoch_and_never_end_worse(method):
    model = tiny_llama(layers=2)
    calib = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(1))
    res = api.quantize(model, _recipe(method, 4, 4, epochs=1), calib, progress=False)
    assert len(res.reports) == 2
    for r in res.reports:
        if method != "smoothquant":
            assert r.init_loss is not None and r.final_loss <= r.init_loss
            assert len(r.losses) == 1
    assert not any("parametrizations" in n for n, _ in model.named_parameters())
    assert torch.isfinite(model(calib).logits).all()


def test_non_finite_loss_rolls_back_and_continues(monkeypatch):
    from lrquant.methods import learned

    calls = {"n": 0}
    real = learned.LearnedMethod.block_loss

    def flaky(self, ctx, targets, idx):
        loss = real(self, ctx, targets, idx)
        calls["n"] += 1
        return loss * float("nan") if ctx.index == 0 and torch.is_grad_enabled() else loss

    monkeypatch.setattr(learned.LearnedMethod, "block_loss", flaky)
    model = tiny_llama(layers=2)
    fp = copy.deepcopy(model)
    calib = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(1))
    res = api.quantize(model, _recipe("omniquant", 4, 4, epochs=1), calib, progress=False)
    notes = res.reports[0].notes
    assert any("rolled back" in n for n in notes) and any("initialisation" in n for n in notes)
    assert not any("rolled back" in n for n in res.reports[1].notes)  # the rollback stays local to block 0
    assert torch.isfinite(model(calib).logits).all()
    assert not torch.equal(model(calib).logits, fp(calib).logits)


def test_rtn_is_registered_with_transforms_methods():
    from lrquant.methods import METHODS, get_method

    get_method("rtn")
    assert {"rtn", "smoothquant", "omniquant", "affinequant"} <= set(METHODS)
    assert get_method("RTN") is RTN
