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


# ---- the kronquant method ----------------------------------------------------------------------------------
def _recipe(abits: int = 4, epochs: int = 2, rotate: bool = False, rotation: dict | None = None, **options):
    from lrquant.config import CalibArgs, Recipe, Scheme, TrainArgs

    pre = [{"rotation": rotation or {"kind": "hadamard", "seed": 0}}] if rotate or rotation else []
    return Recipe(method="kronquant", scheme=Scheme.from_bits(4, abits, None), pre=pre,
                  calib=CalibArgs(nsamples=4, seqlen=16), train=TrainArgs(epochs=epochs, batch_size=2),
                  options=options)


def test_training_path_equals_folded_path_with_quantizers():
    """W4A4 block with the Kronecker transforms live (training) == the folded, frozen block."""
    from lrquant.engine import BlockContext, BlockReport
    from lrquant.methods.kronquant import KronQuant

    model = tiny_llama().double()
    mapping = get_mapping(model)
    block = model.model.layers[0]
    x = torch.randn(2, 12, 64, dtype=torch.float64)
    kwargs = {"position_embeddings": model.model.rotary_emb(x, torch.arange(12)[None]), "attention_mask": None}
    recipe = _recipe()
    method = KronQuant(recipe)
    method.prepare_model(model, mapping, None)
    ctx = BlockContext(0, "model.layers.0", block, mapping, model.config, recipe, x, x, x, kwargs,
                       torch.device("cpu"), torch.Generator().manual_seed(0), BlockReport(0))
    method.prepare_block(ctx)
    block.double()
    gen = torch.Generator().manual_seed(9)
    attach_random(model, block, gen, affine=False)
    attach_kron(model, block, gen)
    with torch.no_grad():
        for q in block.modules():
            if getattr(q, "act_clip", None) is not None:
                q.act_clip.fill_(1.5)
        temporary = block(x, **kwargs)
        fold_block(block)
        method.freeze_weights(block)
        folded = block(x, **kwargs)
    torch.testing.assert_close(folded, temporary, atol=1e-8, rtol=1e-8)


@pytest.mark.parametrize("rotate", [False, True], ids=["plain", "rotated"])
def test_kronquant_runs_and_never_ends_worse(rotate):
    from lrquant import api

    model = tiny_llama(layers=2)
    calib = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(1))
    res = api.quantize(model, _recipe(epochs=8, rotate=rotate), calib, progress=False)
    for r in res.reports:
        assert r.init_loss is not None and r.final_loss <= r.init_loss
    ops = [m for m in model.modules() if isinstance(m, OnlineKron)]
    assert len(ops) == 2 * 7  # q, k, v, o, gate, up, down of both blocks
    assert all(op.live is None for op in ops)
    assert any(not torch.equal(op.factor0, torch.eye(op.sizes[0])) for op in ops)  # learned, not identity
    assert all((op.inner is not None) == (rotate and op.block == 1 and op.factor0.shape[0] * op.factor1.shape[0]
                                          == model.config.intermediate_size) for op in ops)
    assert len([o for o in res.online_ops if "input_transform" in o]) >= 14
    assert torch.isfinite(model(calib).logits).all()


@pytest.mark.parametrize("rotate", [False, True], ids=["plain", "rotated"])
def test_run_folder_reload_gives_the_in_memory_logits(tiny_model_dir, tmp_path, rotate):
    """No silent drop of an online op: model/ + qparams.safetensors reload with every Kronecker op, the
    rotation's Hadamards and the activation clip logits, and give the in-memory logits."""
    from lrquant import api
    from lrquant.config import CalibArgs
    from lrquant.export import load_run_model

    recipe = _recipe(epochs=1, rotate=rotate)
    recipe.calib = CalibArgs("default", 2, 32)
    res = api.run(str(tiny_model_dir), recipe, tmp_path / "run", progress=False)
    model, _, results = load_run_model(tmp_path / "run")
    assert results["online_ops"] and not any(isinstance(m, OnlineKron) and m.live for m in res.model.modules())
    ops = [m for m in model.modules() if isinstance(m, OnlineKron)]
    assert len(ops) == 14 and sum(m.inner is not None for m in ops) == (2 if rotate else 0)
    ids = torch.randint(0, 1000, (1, 24), generator=torch.Generator().manual_seed(0))
    # the KV4 fake quantizers come back too (dynamic: nothing stored), on the same attention kernel
    assert model.config._attn_implementation == res.model.config._attn_implementation == "lrquant"
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, res.model(ids).logits, atol=1e-5, rtol=1e-5)
        # negative control: the logits see the online op (its factors doubled)
        ops[0].live = lambda dtype: [2 * getattr(ops[0], f"factor{j}").to(dtype) for j in range(2)]
        assert (model(ids).logits - res.model(ids).logits).abs().max() > 1e-4


def test_kronquant_options_and_export_are_checked():
    from lrquant.errors import ConfigError
    from lrquant.runs import check_format

    with pytest.raises(ConfigError, match="options.online entry"):
        _recipe(online=["attn", "scores"])
    with pytest.raises(ConfigError, match="no type in compressed-tensors"):
        check_format(_recipe(), "compressed-tensors")


# ---- learned rotations ----------------------------------------------------------------------------------
def test_cayley_step_stays_orthogonal_and_descends():
    from lrquant.quant.stiefel import cayley_step

    gen = torch.Generator().manual_seed(0)
    target = torch.linalg.qr(torch.randn(16, 16, generator=gen, dtype=torch.float64))[0]
    r = torch.eye(16, dtype=torch.float64)
    losses = []
    for _ in range(50):
        rr = r.clone().requires_grad_(True)
        loss = (rr - target).pow(2).sum()
        (g,) = torch.autograd.grad(loss, rr)
        losses.append(float(loss.detach()))
        r = cayley_step(r, g, 0.2)
    torch.testing.assert_close(r.T @ r, torch.eye(16, dtype=torch.float64), atol=1e-10, rtol=0)
    assert losses[-1] < 0.5 * losses[0]


def test_learned_rotation_is_exact_orthogonal_and_lowers_its_objective():
    from lrquant.config import Scheme
    from lrquant.quant.hadamard import hadamard_matrix
    from lrquant.transforms.learned_rotation import RotationObjective, capture_norm_outputs, learn_rotation
    from lrquant.transforms.rotation import rotate_model

    model = randomize(tiny_llama(), seed=1).double()
    mapping = get_mapping(model)
    calib = torch.randint(1, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    scheme = Scheme.from_bits(4, 4, None)
    learned = {}

    def residual(m):
        learned["r"] = learn_rotation(m, mapping, calib, scheme, seed=0, steps=40, lr=0.1, tokens=32)
        acts = capture_norm_outputs(m, mapping, calib, 32, 0)
        obj = RotationObjective(m, mapping, acts, scheme)
        learned["losses"] = (obj.total(hadamard_matrix(64, 0).float()), obj.total(learned["r"].float()))
        return learned["r"]

    with torch.no_grad():
        ref = model(IDS, use_cache=False).logits
        rotate_model(model, mapping, seed=0, residual=residual)
        out = model(IDS, use_cache=False).logits
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
    r = learned["r"]
    torch.testing.assert_close(r.T @ r, torch.eye(64, dtype=torch.float64), atol=1e-8, rtol=0)
    assert not torch.allclose(r, hadamard_matrix(64, 0))  # trained, not the init
    assert learned["losses"][1] < learned["losses"][0]


def test_learned_rotation_composes_with_kronquant():
    from lrquant import api

    model = tiny_llama(layers=2)
    calib = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(1))
    recipe = _recipe(epochs=2, rotation={"kind": "learned", "seed": 0, "steps": 5})
    assert recipe.rotation.kind == "learned"
    res = api.quantize(model, recipe, calib, progress=False)
    assert any(o.endswith("down_proj.input_transform") for o in res.online_ops)
    assert torch.isfinite(model(calib).logits).all()


def test_activation_clip_shrinks_the_dynamic_range_and_is_refused_elsewhere():
    from lrquant.config import QuantArgs
    from lrquant.errors import ConfigError
    from lrquant.quant.quantizers import UniformQuantizer

    q = UniformQuantizer(QuantArgs(num_bits=4, symmetric=False, strategy="token", dynamic=True))
    x = torch.randn(3, 5, 16)
    full, _ = q.qparams(q.rows(x))
    q.enable_act_clip(0.0, "cpu")  # sigmoid(0) = 0.5
    half, _ = q.qparams(q.rows(x))
    torch.testing.assert_close(half, full * 0.5)
    assert q.learnable() == {"aclip": [q.act_clip]}
    out = q(x)
    out.sum().backward()
    assert q.act_clip.grad is not None and q.act_clip.grad.abs() > 0
    static = UniformQuantizer(QuantArgs(num_bits=8, symmetric=False, strategy="tensor", dynamic=False))
    with pytest.raises(ConfigError, match="dynamic quantizer"):
        static.enable_act_clip(4.0, "cpu")
