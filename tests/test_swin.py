"""Swin on tiny random models: the staged mapping (nested block lists, patch-merging transitions,
per-stage heads and call arguments), exact folds on every block in float64 (with and without window
padding), temporary path == folded path, the engine's streams against the real forward, the methods end
to end, resume across a stage transition, and the CLI on a saved tiny Swin plus a tiny image folder."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import transformers
from helpers import attach_random, randomize
from PIL import Image
from torch import nn

from lrquant import api
from lrquant.arch import get_mapping, supported
from lrquant.arch.base import ArchMapping, SmoothPair
from lrquant.arch.vision import SWIN
from lrquant.config import CalibArgs, Recipe, Scheme, TrainArgs
from lrquant.data.images import DEFAULT_CROP_PCT, IMAGENET_MEAN, IMAGENET_STD, model_preprocessing
from lrquant.engine import capture_calls, quantize_blocks
from lrquant.errors import ConfigError, UnsupportedArchitectureError
from lrquant.methods.base import Method
from lrquant.quant.attention import AttentionQuantizer
from lrquant.quant.quantizers import QuantLinear
from lrquant.transforms import ScaleShift, fold_block
from lrquant.transforms.rotation import rotation_problem
from lrquant.transforms.scale_shift import pair_channels, shift_possible

IMG, LABELS = 32, 10
# grid 8x8 -> 4x4, windows of 2: no padding; the second block of each stage uses shifted windows
SWIN_CFG = dict(image_size=IMG, patch_size=4, embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=2,
                num_labels=LABELS)
# grid 10x10 -> 5x5 with windows of 4 (then 4 clamps nothing: 5 > 4): every block zero-pads its windows
PADDED_CFG = dict(image_size=40, patch_size=4, embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=4,
                  num_labels=LABELS)


def _swin(cls=transformers.SwinForImageClassification, seed: int = 0, **overrides) -> nn.Module:
    torch.manual_seed(seed)
    return randomize(cls(transformers.SwinConfig(**{**SWIN_CFG, **overrides})), seed + 1)


def _pixels(n: int = 3, size: int = IMG, seed: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _calib(n: int = 4) -> list[dict[str, torch.Tensor]]:
    x = _pixels(n, seed=7)
    return [{"pixel_values": x[i : i + 1]} for i in range(n)]


def _out(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(pixel_values=x)
    return out.logits if getattr(out, "logits", None) is not None else out.pooler_output


# ---- mapping ---------------------------------------------------------------------------------------


def test_staged_mapping_layout_and_base_model():
    model = _swin()
    mapping = get_mapping(model)
    assert mapping is SWIN and mapping.family == "swin" and mapping.stages == "swin.encoder.layers"
    assert mapping.encoder and not mapping.rope and mapping.norm_kind == "layer" and not mapping.gated_mlp
    assert {"SwinModel", "SwinForImageClassification"} <= set(supported())
    slots = mapping.block_list(model)
    assert [n for n, _ in slots] == [f"swin.encoder.layers.{s}.blocks.{j}" for s in (0, 1) for j in (0, 1)]
    assert all(model.get_submodule(n) is b for n, b in slots)
    assert mapping.transitions(model) == {1: "swin.encoder.layers.0.downsample"}  # the last stage has none
    # heads per block, from the attention modules (the config's num_heads is a per-stage list)
    assert [mapping.heads(model.config, b) for _, b in slots] == [(2, 2, 8), (2, 2, 8), (4, 4, 8), (4, 4, 8)]
    with pytest.raises(ValueError, match="pass the block"):
        mapping.heads(model.config)
    assert sorted(p.kind for p in mapping.smooth_pairs()) == ["heads", "norm", "norm", "qk"]
    for _, block in slots:
        for path in (*mapping.linears(), mapping.attn_norm, mapping.mlp_norm):
            block.get_submodule(path)

    base_mapping = get_mapping(model.swin)
    assert base_mapping == mapping.for_base_model("swin.") and base_mapping.head is None
    assert [b for _, b in base_mapping.block_list(model.swin)] == [b for _, b in slots]
    assert base_mapping.transitions(model.swin) == {1: "encoder.layers.0.downsample"}


def test_mapping_needs_exactly_one_block_layout():
    with pytest.raises(ValueError, match="exactly one"):
        ArchMapping(family="x", blocks="a.layers", pre_blocks=(), stages="a.stages")
    with pytest.raises(ValueError, match="exactly one"):
        ArchMapping(family="x", blocks="", pre_blocks=())


def test_unsupported_models_get_a_clear_error():
    v2 = transformers.Swinv2Model(transformers.Swinv2Config(**{k: v for k, v in SWIN_CFG.items()
                                                               if k != "num_labels"}))
    with pytest.raises(UnsupportedArchitectureError, match=r"unsupported architecture Swinv2Model; supported: .*"
                                                           r"SwinForImageClassification"):
        get_mapping(v2)
    with pytest.raises(UnsupportedArchitectureError, match="SwinBackbone"):
        api.quantize(transformers.SwinBackbone(transformers.SwinConfig(**SWIN_CFG)),
                     Recipe(method="rtn", scheme=Scheme.from_bits(8, 8)), _calib(1), progress=False)


def test_rotation_and_tta_refuse_stages():
    model = _swin()
    assert "stage" in rotation_problem(model, get_mapping(model))
    from lrquant.config import TTAStep
    from lrquant.tta import adapt

    with pytest.raises(UnsupportedArchitectureError, match="staged"):
        adapt(model, model, None, torch.zeros(1, 8, dtype=torch.long), TTAStep())


def test_group_size_is_checked_on_every_stage():
    # 8 divides every input width (16, 64, 32, 128); 32 does not divide stage 0's 16
    api.validate_scheme(_swin(), Recipe(method="rtn", scheme=Scheme.from_bits(4, 16, 8)))
    with pytest.raises(ConfigError, match="input dimension 16"):
        api.validate_scheme(_swin(), Recipe(method="rtn", scheme=Scheme.from_bits(4, 16, 32)))


# ---- exact folds -----------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg", [SWIN_CFG, PADDED_CFG], ids=["windows", "padded_windows"])
@pytest.mark.parametrize("affine", [False, True], ids=["scale_shift", "affine"])
def test_fold_is_exact_in_float64_on_every_block(cfg, affine):
    model = _swin(**cfg).double()
    mapping = get_mapping(model)
    x = _pixels(size=cfg["image_size"]).double()
    ref = _out(model, x)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(5)
        for _, block in mapping.block_list(model):
            attach_random(model, block, gen, affine)
    temporary = _out(model, x)
    for _, block in mapping.block_list(model):
        fold_block(block)
    folded = _out(model, x)
    assert (ref - ref.mean()).abs().max() > 1e-3  # the check can fail: outputs are not constant
    torch.testing.assert_close(temporary, ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(folded, ref, atol=1e-6, rtol=1e-6)
    assert not any("parametrizations" in n for n, _ in model.named_parameters())


def test_attention_norm_shift_breaks_under_window_padding():
    """Why ``layernorm_before`` is in ``padded_norms``: with padded windows a shift there changes the
    output (padded tokens are 0 before and after the transform), while the MLP norm's shift stays exact."""
    model = _swin(**PADDED_CFG).double()
    mapping = get_mapping(model)
    assert not shift_possible(SmoothPair(mapping.attn_norm, (mapping.q, mapping.k, mapping.v), "norm"), mapping,
                              mapping.block_list(model)[0][1])
    x = _pixels(size=PADDED_CFG["image_size"]).double()
    ref = _out(model, x)
    gen = torch.Generator().manual_seed(3)
    for pair, breaks in ((mapping.smooth_pairs()[0], True), (mapping.smooth_pairs()[-1], False)):
        assert pair.kind == "norm"
        m = copy.deepcopy(model)
        block = mapping.block_list(m)[0][1]
        c = pair_channels(pair, mapping, block, m.config)
        t = ScaleShift(pair, mapping, m.config, torch.ones(c, dtype=torch.float64),
                       torch.randn(c, generator=gen, dtype=torch.float64), block=block).double()
        t.attach(block)
        diff = (_out(m, x) - ref).abs().max()
        assert (diff > 1e-3) if breaks else (diff < 1e-8), (pair, diff)


def test_training_path_equals_folded_path_on_every_block():
    """Quantized blocks with transforms attached (the training path) equal the folded + frozen blocks."""
    from lrquant.methods.transformed import OmniQuant

    model = _swin().double()
    mapping = get_mapping(model)
    recipe = Recipe(method="omniquant", scheme=Scheme.from_bits(4, 8))
    method = OmniQuant(recipe)
    method.prepare_model(model, mapping, None)
    for _, block in mapping.block_list(model):
        method.prepare_block(SimpleNamespace(block=block, mapping=mapping))  # structure only
        for q in block.modules():
            if getattr(q, "upbound_factor", None) is not None:
                q.double()
    gen = torch.Generator().manual_seed(9)
    for _, block in mapping.block_list(model):
        attach_random(model, block, gen, affine=False)
    x = _pixels().double()
    temporary = _out(model, x)
    for _, block in mapping.block_list(model):
        fold_block(block)
        method.freeze_weights(block)
    torch.testing.assert_close(_out(model, x), temporary, atol=1e-8, rtol=1e-8)


# ---- engine ----------------------------------------------------------------------------------------


def test_capture_calls_per_stage():
    model = _swin()
    calls = capture_calls(model, get_mapping(model), _calib(1)[0])
    dims = {name: args for name, (args, _) in calls.items()}
    assert dims == {"swin.encoder.layers.0.blocks.0": ((8, 8),), "swin.encoder.layers.0.blocks.1": ((8, 8),),
                    "swin.encoder.layers.1.blocks.0": ((4, 4),), "swin.encoder.layers.1.blocks.1": ((4, 4),),
                    "swin.encoder.layers.0.downsample": ((8, 8),)}
    assert all("hidden_states" not in kw for _, kw in calls.values())


class _Spy(Method):
    """Quantizes nothing; records what the engine hands each block."""

    seen: list[tuple[str, torch.Tensor, torch.Tensor, tuple]] = []

    def prepare_block(self, ctx) -> None:
        pass

    def quantize_block(self, ctx) -> None:
        type(self).seen.append((ctx.name, ctx.fp_in.clone(), ctx.fp_out.clone(), ctx.args))


def test_engine_streams_follow_the_real_forward():
    """The FP streams the engine builds (blocks + patch merging) are the model's own block inputs/outputs."""
    model = _swin(cls=transformers.SwinModel)
    mapping = get_mapping(model)
    calib = _calib(3)
    inputs: dict[str, list[torch.Tensor]] = {}
    handles = [b.register_forward_pre_hook(lambda _m, a, n=n: inputs.setdefault(n, []).append(a[0]))
               for n, b in mapping.block_list(model)]
    with torch.no_grad():
        last = torch.cat([model.encoder(model.embeddings(c["pixel_values"])[0], (8, 8)).last_hidden_state
                          for c in calib])
    for h in handles:
        h.remove()
    _Spy.seen = []
    recipe = Recipe(method="rtn", scheme=Scheme.from_bits(8, 16))
    quantize_blocks(model, _Spy(recipe), recipe, calib, progress=False)
    assert [s[0] for s in _Spy.seen] == [n for n, _ in mapping.block_list(model)]
    for name, fp_in, _, args in _Spy.seen:
        torch.testing.assert_close(fp_in, torch.cat(inputs[name]), atol=1e-5, rtol=1e-5)
        assert args == (((8, 8),) if ".layers.0." in name else ((4, 4),))
    assert _Spy.seen[2][1].shape == (3, 16, 32)  # after patch merging: L / 4 tokens, 2C channels
    torch.testing.assert_close(_Spy.seen[-1][2], last, atol=1e-5, rtol=1e-5)


def _recipe(method: str, wbits=4, abits=4, epochs=1, **options) -> Recipe:
    return Recipe(method=method, scheme=Scheme.from_bits(wbits, abits), calib=CalibArgs(nsamples=4),
                  train=TrainArgs(epochs=epochs, batch_size=2), options=options)


@pytest.mark.parametrize("method", ["rtn", "smoothquant", "omniquant", "affinequant", "lrquant", "lrquant_plus",
                                    "repquant"])
def test_methods_run_end_to_end(method):
    fp = _swin()
    model = copy.deepcopy(fp)
    mapping = get_mapping(model)
    res = api.quantize(model, _recipe(method), _calib(), progress=False)
    assert len(res.reports) == 4 and [r.block for r in res.reports] == [0, 1, 2, 3]
    for r in res.reports:
        assert r.out_rel_err is not None and r.out_rel_err < 0.5
        if method not in ("rtn", "smoothquant"):
            assert r.init_loss is not None and r.final_loss <= r.init_loss
            assert len(r.losses) == 1
    for _, block in mapping.block_list(model):
        for path in mapping.linears():
            lin = block.get_submodule(path)
            assert isinstance(lin, QuantLinear) and lin.weight_frozen, path
        assert isinstance(block.get_submodule(mapping.attention).attn_quantizer, AttentionQuantizer)
    assert not any("parametrizations" in n for n, _ in model.named_parameters())
    x = _pixels()
    ref, out = _out(fp, x), _out(model, x)
    assert torch.isfinite(out).all() and (out - ref).abs().max() > 0
    assert nn.functional.cosine_similarity(out, ref, dim=-1).min() > 0.9
    # FP outside the blocks: patch embedding, patch merging, final norm, classifier
    block_names = tuple(n + "." for n, _ in mapping.block_list(model))
    for name, p in fp.named_parameters():
        if not name.startswith(block_names):
            assert torch.equal(p, model.get_parameter(name)), name


def test_qkv_and_softmax_quantizers_run_inside_swin_attention():
    """Swin's attention goes through the attention interface: the Q/K/V (and softmax) quantizers are
    called once per block forward."""
    model = _swin()
    api.quantize(model, _recipe("repquant", epochs=0), _calib(2), progress=False)
    mapping = get_mapping(model)
    calls = {"qkv": 0, "probs": 0}
    handles = []
    for _, block in mapping.block_list(model):
        quantizer = block.get_submodule(mapping.attention).attn_quantizer
        assert quantizer.probs is not None
        handles.append(quantizer.q.register_forward_hook(lambda *_: calls.__setitem__("qkv", calls["qkv"] + 1)))
        handles.append(quantizer.probs.register_forward_hook(
            lambda *_: calls.__setitem__("probs", calls["probs"] + 1)))
    _out(model, _pixels(1))
    for h in handles:
        h.remove()
    assert calls == {"qkv": 4, "probs": 4}


def test_resume_across_a_stage_transition_is_bit_identical(tmp_path, monkeypatch):
    from lrquant.methods.transformed import OmniQuant

    recipe = _recipe("omniquant")
    full = _swin()
    api.quantize(full, recipe, _calib(), progress=False, checkpoint_dir=tmp_path / "a")
    original = OmniQuant.quantize_block

    def boom(self, ctx):
        if ctx.index == 3:  # blocks 0-2 (and the patch merging after block 1) done
            raise KeyboardInterrupt
        return original(self, ctx)

    monkeypatch.setattr(OmniQuant, "quantize_block", boom)
    with pytest.raises(KeyboardInterrupt):
        api.quantize(_swin(), recipe, _calib(), progress=False, checkpoint_dir=tmp_path / "b")
    monkeypatch.setattr(OmniQuant, "quantize_block", original)
    resumed = _swin()
    api.quantize(resumed, recipe, _calib(), progress=False, checkpoint_dir=tmp_path / "b", resume=True)
    for (n1, t1), (n2, t2) in zip(full.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert n1 == n2 and torch.equal(t1, t2), n1
    assert torch.equal(_out(full, _pixels()), _out(resumed, _pixels()))


# ---- data and CLI ----------------------------------------------------------------------------------


def test_preprocessing_from_the_image_processor():
    model = _swin()
    imagenet = {"mean": IMAGENET_MEAN, "std": IMAGENET_STD, "crop_pct": DEFAULT_CROP_PCT}
    assert model_preprocessing(model) == imagenet
    proc = transformers.ViTImageProcessor(image_mean=[0.5, 0.5, 0.5], image_std=[0.25, 0.5, 1.0])
    assert model_preprocessing(model, proc) == {**imagenet, "mean": (0.5,) * 3, "std": (0.25, 0.5, 1.0)}
    proc.image_mean, proc.image_std = 0.5, 0.5  # scalars broadcast over RGB
    assert model_preprocessing(model, proc)["std"] == (0.5,) * 3
    proc.do_normalize = False
    assert model_preprocessing(model, proc) == imagenet


def _image_folder(root: Path, n: int = 8) -> Path:
    """``n`` random-noise images named by 4 synsets (labels 0-3, two images each)."""
    root.mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    for i in range(n):
        arr = (torch.rand(48, 40, 3, generator=gen) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr).save(root / f"n0144{i % 4:04d}_{i}.png")
    return root


@pytest.mark.slow
@pytest.mark.parametrize("head", [False, True], ids=["backbone", "classifier"])
def test_swin_quantize_cli(tmp_path, head):
    from lrquant.cli import main

    cls = transformers.SwinForImageClassification if head else transformers.SwinModel
    _swin(cls=cls).save_pretrained(tmp_path / "swin")
    transformers.ViTImageProcessor(size={"height": IMG, "width": IMG}, image_mean=[0.5] * 3,
                                   image_std=[0.5] * 3).save_pretrained(tmp_path / "swin")
    images = _image_folder(tmp_path / "images")
    evals = "top1" if head else "retrieval"
    out = tmp_path / "run"
    code = main(["quantize", "--model", str(tmp_path / "swin"), "--method", "lrquant_plus", "--wbits", "4",
                 "--abits", "8", "--group-size", "0", "--calib", str(images), "--nsamples", "4", "--epochs", "1",
                 "--eval", evals, "--output", str(out), "--quiet"])
    assert code == 0
    r = json.loads((out / "results.json").read_text())
    key = "top1" if head else "retrieval_top1"
    assert r["eval"]["images"] == 8 and r["eval"]["size"] == IMG
    assert 0 <= r[key] <= 1 and 0 <= r["fp_" + key] <= 1
    assert 0.5 < r["feature_cosine"] <= 1.0 + 1e-6
    assert len(r["blocks"]) == 4 and all(b["final_loss"] <= b["init_loss"] for b in r["blocks"])
    assert any(".layers.1.blocks.1." in name for name in r["layer_errors"])
    reloaded = cls.from_pretrained(out / "model").eval()
    assert torch.isfinite(_out(reloaded, _pixels(1))).all()
