"""Online Kronecker transforms: invertible by construction, folded == original (float64) on every tiny
family, with and without the rotation pre-step, training path == folded path, and the kronquant method
end to end (never worse than its init, a reload gives the in-memory logits)."""

from __future__ import annotations

import pytest
import torch
from helpers import CASES, attach_random, randomize, tiny_llama

from lrquant.arch import get_mapping
from lrquant.arch.base import set_submodule
from lrquant.quant.quantizers import QuantLinear
from lrquant.transforms import KronAffine, OnlineKron, fold_block
from lrquant.transforms.kron import KRON_KINDS, SVDFactor, kron_sizes

pytestmark = pytest.mark.usefixtures("one_thread")

IDS = torch.randint(1, 128, (2, 12), generator=torch.Generator().manual_seed(3))


def test_kron_sizes_are_near_square_divisors():
    assert kron_sizes(576) == (24, 24)
    assert kron_sizes(1536) == (32, 48)
    assert kron_sizes(64) == (8, 8)
    assert kron_sizes(7) == (1, 7)


def test_svd_factor_is_invertible_by_construction():
    f = SVDFactor(12).double()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in f.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 2.0)
    m, inv = f.matrix(torch.float64), f.inverse(torch.float64)
    torch.testing.assert_close(m @ inv, torch.eye(12, dtype=torch.float64), atol=1e-10, rtol=0)
    assert not torch.allclose(m, torch.eye(12, dtype=torch.float64))  # the check can fail
    s = torch.linalg.svdvals(m)
    torch.testing.assert_close(s.max() / s.min(), (f.s.max() - f.s.min()).exp(), atol=1e-8, rtol=1e-8)
    torch.testing.assert_close(SVDFactor(5).matrix(torch.float64), torch.eye(5, dtype=torch.float64))


def wrap_linears(model) -> None:
    """Every mapped linear becomes a QuantLinear without quantizers (so online input ops run)."""
    mapping = get_mapping(model)
    for _, block in mapping.block_list(model):
        for path in mapping.linears():
            set_submodule(block, path, QuantLinear(block.get_submodule(path), None, None))


def attach_kron(model, block, gen: torch.Generator) -> list[KronAffine]:
    """Random (far from identity) Kronecker transforms at every pair kind that takes one."""
    mapping = get_mapping(model)
    out = []
    for pair in mapping.smooth_pairs():
        if pair.kind not in KRON_KINDS:
            continue
        t = KronAffine(pair, mapping, model.config, block).double()
        with torch.no_grad():
            for p in t.parameters():
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.3)
        t.attach(block)
        out.append(t)
    return out


@pytest.mark.parametrize("with_scales", [False, True], ids=["kron", "scales+kron"])
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_fold_is_exact_in_float64(case, with_scales):
    torch.manual_seed(0)
    model = randomize(case.build(), seed=1).double()
    wrap_linears(model)
    blocks = [b for _, b in get_mapping(model).block_list(model)]
    with torch.no_grad():
        ref = model(IDS, use_cache=False).logits
        gen = torch.Generator().manual_seed(5)
        for block in blocks:
            if with_scales:
                attach_random(model, block, gen, affine=False)
            attach_kron(model, block, gen)
        temporary = model(IDS, use_cache=False).logits
        for block in blocks:
            fold_block(block)
        folded = model(IDS, use_cache=False).logits
    assert (ref - ref.mean()).abs().max() > 1e-3
    torch.testing.assert_close(temporary, ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(folded, ref, atol=1e-6, rtol=1e-6)
    assert not any("parametrizations" in n for n, _ in model.named_parameters())
    ops = [m for m in model.modules() if isinstance(m, OnlineKron)]
    assert ops and all(op.live is None for op in ops)
    assert any(not torch.equal(op.factor0, torch.eye(op.sizes[0], dtype=op.factor0.dtype)) for op in ops)


def test_one_sided_kron_is_detected():
    """Negative control: the online op without its weight fold changes the output."""
    model = randomize(tiny_llama(), seed=1).double()
    wrap_linears(model)
    block = model.model.layers[0]
    with torch.no_grad():
        ref = model(IDS, use_cache=False).logits
        (t,) = [t for t in attach_kron(model, block, torch.Generator().manual_seed(2)) if t.pair.kind == "linear"]
        fold_block(block)
        down = block.get_submodule(t.pair.nexts[0])
        down.input_transform.factor0.mul_(1.01)
        assert (model(IDS, use_cache=False).logits - ref).abs().max() > 1e-4


def test_fold_is_exact_after_the_rotation_prestep():
    """The Hadamard of --rotate (with the value path) becomes the Kronecker op's inner op; still exact."""
    from lrquant.transforms.rotation import rotate_model

    model = randomize(tiny_llama(), seed=1).double()
    mapping = get_mapping(model)
    with torch.no_grad():
        ref = model(IDS, use_cache=False).logits
        rotate_model(model, mapping, seed=0, online_value=True)
        wrap_linears(model)
        gen = torch.Generator().manual_seed(4)
        for _, block in mapping.block_list(model):
            attach_kron(model, block, gen)
            fold_block(block)
        out = model(IDS, use_cache=False).logits
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
    inner = [m for m in model.modules() if isinstance(m, OnlineKron) and m.inner is not None]
    assert len(inner) == 2 * len(mapping.block_list(model))  # down and o of every block
    assert all(not m.commutes_with_scales for m in inner)
