"""kronquant's per-head online transform on queries and keys after RoPE (option ``online: [..., qk]``):
``q k^T`` preserved (GQA, RoPE, every tiny family), the op sits before the Q/K fake quantizers, the
SmoothQuant-style init balances the keys, a W4A4KV4 run trains it, checkpoints resume it, the run folder
reloads it, and it is refused without a quantized KV cache and by every export format."""

from __future__ import annotations

import pytest
import torch
from helpers import CASES, randomize, tiny_llama

from lrquant.arch import get_mapping
from lrquant.config import CalibArgs, Recipe, Scheme, TrainArgs
from lrquant.errors import ConfigError
from lrquant.quant.attention import AttentionQuantizer, enable_attention_quantization
from lrquant.quant.quantizers import quantization_disabled
from lrquant.transforms import OnlineQK, QKKron, fold_block

pytestmark = pytest.mark.usefixtures("one_thread")

IDS = torch.randint(1, 128, (2, 12), generator=torch.Generator().manual_seed(3))
KV4 = Scheme.from_bits(4, 4, None, kv_bits=4)
LINEAR_AND_QK = ["attn", "o", "mlp", "down", "qk"]


def attach_qk(model, kv_args, gen: torch.Generator | None) -> list[QKKron]:
    """An attention quantizer (``kv_args``) and a q/k transform on every block: random (far from the
    identity) parameters from ``gen``, or the identity when ``gen`` is None."""
    mapping = get_mapping(model)
    enable_attention_quantization(model)
    out = []
    for _, block in mapping.block_list(model):
        block.get_submodule(mapping.attention).attn_quantizer = AttentionQuantizer(kv_args)
        t = QKKron(mapping, model.config, block).double()
        if gen is not None:
            with torch.no_grad():
                for p in t.parameters():
                    p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.5)
        t.attach(block)
        out.append(t)
    return out


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_qk_transform_keeps_the_scores_in_float64(case):
    """Quantization off, random per-kv-head P: the logits are the plain model's, with the live factors and
    after the fold (the frozen buffers), so ``(q P^-T)(k P)^T = q k^T`` holds with GQA, RoPE, QK-norm,
    sliding windows and head_dim != hidden / heads."""
    torch.manual_seed(0)
    model = randomize(case.build(), seed=1).double()
    with torch.no_grad():
        ref = model(IDS, use_cache=False).logits
    attach_qk(model, KV4.kv_cache, torch.Generator().manual_seed(5))
    ops = [m for m in model.modules() if isinstance(m, OnlineQK)]
    calls = []
    for op in ops:
        op.register_forward_hook(lambda *_: calls.append(1))
    blocks = get_mapping(model).block_list(model)
    with torch.no_grad(), quantization_disabled(model):
        live = model(IDS, use_cache=False).logits
        for _, block in blocks:
            fold_block(block)
        folded = model(IDS, use_cache=False).logits
    assert len(calls) == 2 * len(blocks) and all(op.live is None for op in ops)
    assert not torch.allclose(ops[0].kfactor0[0], torch.eye(ops[0].kfactor0.shape[-1], dtype=torch.float64))
    torch.testing.assert_close(live, ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(folded, ref, atol=1e-6, rtol=1e-6)


def test_qk_transform_sits_before_the_kv_quantizers():
    """KV4 on: the K quantizer sees ``key (P1_g (x) P2_g)`` and the Q quantizer ``query P_g^-T`` (dense
    ``torch.kron`` per kv head, each query head with its GQA group), the identity op changes nothing, and a
    random P changes the fake-quant logits."""
    model = randomize(tiny_llama(layers=1), seed=1).double()
    attach_qk(model, KV4.kv_cache, None)
    with torch.no_grad():
        identity = model(IDS).logits
        quantizer = model.model.layers[0].self_attn.attn_quantizer
        op = quantizer.input_transform
        quantizer.input_transform = None
        assert torch.equal(model(IDS).logits, identity)
        quantizer.input_transform = op
    t = attach_qk(model, KV4.kv_cache, torch.Generator().manual_seed(7))[0]
    seen = {}
    quantizer = model.model.layers[0].self_attn.attn_quantizer
    quantizer.register_forward_pre_hook(lambda _m, args: seen.update(query=args[0], key=args[1]))
    quantizer.k.register_forward_pre_hook(lambda _m, args: seen.update(k_in=args[0]))
    quantizer.q.register_forward_pre_hook(lambda _m, args: seen.update(q_in=args[0]))
    with torch.no_grad():
        out = model(IDS).logits
        (p1, p2), _ = t.factors(torch.float64)
        dense = torch.stack([torch.kron(a, b) for a, b in zip(p1, p2, strict=True)])  # [KV, D, D]
        group = seen["query"].shape[1] // seen["key"].shape[1]
        torch.testing.assert_close(seen["k_in"], seen["key"] @ dense[None], atol=1e-12, rtol=1e-12)
        q_dense = torch.linalg.inv(dense).mT.repeat_interleave(group, 0)  # [H, D, D]
        torch.testing.assert_close(seen["q_in"], seen["query"] @ q_dense[None], atol=1e-10, rtol=1e-10)
    assert (out - identity).abs().max() > 1e-3 * identity.abs().max()


def test_balance_init_evens_out_an_outlier_key_channel():
    """``qk_init: balance``: with one key channel 30x too large (both RoPE partners), the init P (diagonal,
    from the FP stream's max|q| / max|k|) lowers every kv head's peak-to-median key channel ratio."""
    from lrquant.engine import BlockContext, BlockReport
    from lrquant.methods.kronquant import KronQuant, qk_balance

    model = tiny_llama(layers=1)
    mapping = get_mapping(model)
    block = model.model.layers[0]
    _, kv, hd = mapping.heads(model.config, block)
    with torch.no_grad():
        for g in range(kv):
            for c in (1, 1 + hd // 2):
                block.self_attn.k_proj.weight[g * hd + c] *= 30
    x = torch.randn(4, 12, 64, generator=torch.Generator().manual_seed(0))
    kwargs = {"position_embeddings": model.model.rotary_emb(x, torch.arange(12)[None]), "attention_mask": None}
    recipe = Recipe(method="kronquant", scheme=KV4, calib=CalibArgs(nsamples=4, seqlen=12),
                    options={"online": ["qk"]})
    method = KronQuant(recipe)
    method.prepare_model(model, mapping, None)
    ctx = BlockContext(0, "model.layers.0", block, mapping, model.config, recipe, x, x, x, kwargs,
                       torch.device("cpu"), torch.Generator().manual_seed(0), BlockReport(0))
    method.prepare_block(ctx)

    def key_ratio() -> torch.Tensor:
        seen = {}
        hook = block.self_attn.attn_quantizer.k.register_forward_pre_hook(lambda _m, a: seen.update(k=a[0]))
        with torch.no_grad(), quantization_disabled(block):
            block(x, **kwargs)
        hook.remove()
        peak = seen["k"].abs().amax((0, 2))  # [KV, D]
        return peak.amax(1) / peak.median(1).values

    before = key_ratio()
    init = qk_balance(ctx)
    t = QKKron(mapping, model.config, block, init)
    t.attach(block)
    (p1, p2), _ = t.factors(torch.float32)
    assert torch.equal(p1, torch.diag_embed(init[0].exp())) and torch.equal(p2, torch.diag_embed(init[1].exp()))
    after = key_ratio()
    assert (after < 0.7 * before).all(), (before, after)


# ---- the kronquant method ----------------------------------------------------------------------------------
def _qk_recipe(epochs: int = 4, qk_init: str = "identity") -> Recipe:
    return Recipe(method="kronquant", scheme=KV4, calib=CalibArgs(nsamples=4, seqlen=16),
                  train=TrainArgs(epochs=epochs, batch_size=2), options={"online": LINEAR_AND_QK, "qk_init": qk_init})


CALIB = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def qk_run(tmp_path_factory):
    """An uninterrupted W4A4KV4 kronquant run with the q/k op (identity start), checkpointed."""
    from lrquant import api

    model = tiny_llama(layers=2)
    ckpt = tmp_path_factory.mktemp("qk") / "full"
    return model, api.quantize(model, _qk_recipe(), CALIB, progress=False, checkpoint_dir=ckpt)


def test_kronquant_trains_the_qk_transform(qk_run):
    """W4A4KV4: every block's q/k factors leave the identity, no block ends above its initial loss, and
    the op is declared online."""
    model, res = qk_run
    for r in res.reports:
        assert r.init_loss is not None and r.final_loss <= r.init_loss
    ops = [m for m in model.modules() if isinstance(m, OnlineQK)]
    assert len(ops) == 2 and all(op.live is None for op in ops)
    for op in ops:
        eye = torch.eye(op.kfactor0.shape[-1]).expand_as(op.kfactor0)
        assert not torch.allclose(op.kfactor0, eye, atol=1e-4)
        d = op.kfactor0.shape[-1]  # frozen inverse-transposes stay consistent with P
        torch.testing.assert_close(op.qfactor0.mT @ op.kfactor0, torch.eye(d).expand_as(op.kfactor0),
                                   atol=1e-5, rtol=0)
    assert [o for o in res.online_ops if "attn_quantizer" in o] == [
        f"model.layers.{i}.self_attn.attn_quantizer.input_transform" for i in range(2)]
    assert torch.isfinite(model(CALIB).logits).all()


def test_kronquant_with_qk_resumes_bit_identically(qk_run, tmp_path, monkeypatch):
    """Interrupted in block 1, resumed from block 0's checkpoint: the same state (q/k buffers included)
    and the same logits as the uninterrupted run."""
    from lrquant import api
    from lrquant.methods.kronquant import KronQuant

    full, _ = qk_run
    original = KronQuant.quantize_block

    def boom(self, ctx):
        if ctx.index == 1:
            raise KeyboardInterrupt
        return original(self, ctx)

    monkeypatch.setattr(KronQuant, "quantize_block", boom)
    with pytest.raises(KeyboardInterrupt):
        api.quantize(tiny_llama(layers=2), _qk_recipe(), CALIB, progress=False, checkpoint_dir=tmp_path)
    monkeypatch.setattr(KronQuant, "quantize_block", original)
    resumed = tiny_llama(layers=2)
    api.quantize(resumed, _qk_recipe(), CALIB, progress=False, checkpoint_dir=tmp_path, resume=True)
    state = resumed.state_dict()
    assert "model.layers.0.self_attn.attn_quantizer.input_transform.kfactor0" in state
    for name, value in full.state_dict().items():
        assert torch.equal(value, state[name]), name
    with torch.no_grad():
        assert torch.equal(full(CALIB).logits, resumed(CALIB).logits)


def test_run_folder_reload_carries_the_qk_transform(tiny_model_dir, tmp_path):
    """model/ + qparams.safetensors reload with the KV4 fake quantizers and the q/k op (balance init) and
    give the in-memory logits; negative control: the reloaded op reset to the identity changes them."""
    from safetensors.torch import load_file

    from lrquant import api
    from lrquant.export import load_run_model

    recipe = _qk_recipe(epochs=1, qk_init="balance")
    recipe.calib = CalibArgs("default", 2, 32)
    res = api.run(str(tiny_model_dir), recipe, tmp_path / "run", progress=False)
    qparams = load_file(str(tmp_path / "run" / "qparams.safetensors"))
    assert sum(k.endswith(".attn_quantizer.input_transform.qfactor1") for k in qparams) == 2
    model, _, results = load_run_model(tmp_path / "run")
    assert any(o.endswith("attn_quantizer.input_transform") for o in results["online_ops"])
    ops = [m for m in model.modules() if isinstance(m, OnlineQK)]
    assert len(ops) == 2
    assert model.config._attn_implementation == res.model.config._attn_implementation == "lrquant"
    ids = torch.randint(0, 1000, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = res.model(ids).logits
        torch.testing.assert_close(model(ids).logits, ref, atol=1e-5, rtol=1e-5)
        for name in OnlineQK.NAMES:
            buf = getattr(ops[0], name)
            buf.copy_(torch.eye(buf.shape[-1]).expand_as(buf))
        assert (model(ids).logits - ref).abs().max() > 1e-4


def test_qk_is_refused_without_a_quantized_kv_cache_and_by_every_export():
    from lrquant.export.compressed import ExportError, check_exportable
    from lrquant.runs import check_format

    no_kv = Scheme.from_bits(4, 4, None, kv_bits=16)
    with pytest.raises(ConfigError, match=r"options.online entry 'qk' .* needs scheme.kv_cache"):
        Recipe(method="kronquant", scheme=no_kv, options={"online": ["qk"]})
    with pytest.raises(ConfigError, match="needs scheme.kv_cache"):  # the CLI's --kv-bits 16 on a qk recipe
        _qk_recipe().replace(scheme=no_kv)
    with pytest.raises(ConfigError, match="options.qk_init"):
        Recipe(method="kronquant", scheme=KV4, options={"online": ["qk"], "qk_init": "smooth"})
    for fmt in ("compressed-tensors", "gguf"):
        with pytest.raises(ConfigError, match="no type in compressed-tensors or GGUF"):
            check_format(Recipe(method="kronquant", scheme=KV4, options={"online": ["qk"], "act_clip": False}), fmt)
    # a model holding the op is refused by the export check itself, declared or not
    model = tiny_llama(layers=1)
    attach_qk(model, KV4.kv_cache, None)
    with pytest.raises(ExportError, match="attn_quantizer .online input transform OnlineQK"):
        check_exportable(model, KV4)
    with pytest.raises(ExportError, match="declared online"):
        check_exportable(tiny_llama(layers=1), KV4,
                         online_ops=["model.layers.0.self_attn.attn_quantizer.input_transform"])
