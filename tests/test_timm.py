"""timm ``VisionTransformer``: the reversible q/k/v split (exact forward in float64, exact re-fuse to
timm's layout), the preparation (run once at load; the mapping lookup never changes the model), the
mapping, timm's checkpoint layout, exact folds, every method through the engine at W4A4 with Q/K/V
quantized, and a CLI run on a tiny timm model and a tiny image folder.

timm is imported with :mod:`timm_support` (a torchvision stand-in when the real one cannot be
imported beside our torch); the module is skipped when timm is not installed.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from helpers import attach_random
from PIL import Image
from timm_support import import_timm
from torch import nn

from lrquant import api
from lrquant.arch import get_mapping, prepare_model, supported
from lrquant.arch.timm_attention import SplitQKVAttention
from lrquant.arch.timm_checkpoint import TIMM_CHECKPOINT, fuse_tensor_names, fused_state_dict, save_timm
from lrquant.arch.timm_vit import TIMM_QKV_SPLIT, TIMM_VIT, TimmViTConfig, fuse_qkv, split_qkv
from lrquant.config import CalibArgs, Recipe, Scheme, TrainArgs
from lrquant.errors import LrquantError, UnsupportedArchitectureError
from lrquant.export import quant_state
from lrquant.quant.attention import AttentionQuantizer
from lrquant.quant.quantizers import QuantLinear
from lrquant.transforms import fold_block

timm = import_timm()
from timm.models.vision_transformer import VisionTransformer  # noqa: E402

IMG, PATCH, DIM, DEPTH, HEADS, CLASSES = 32, 8, 64, 2, 4, 10
TINY = dict(img_size=IMG, patch_size=PATCH, embed_dim=DIM, depth=DEPTH, num_heads=HEADS, num_classes=CLASSES)
VARIANTS = {
    "plain": {},
    "layerscale_nobias": {"init_values": 0.1, "qkv_bias": False},
    "layerscale_bias": {"init_values": 0.1, "qkv_bias": True},
    "qk_norm": {"qk_norm": True},
}


def tiny_vit(variant: str = "plain", seed: int = 0, fused_attn: bool = True, prepared: bool = True, **extra
             ) -> VisionTransformer:
    """A tiny random timm ViT, every parameter perturbed (norm gains, layer scales, biases off their init);
    ``prepared``: with its preparation run (q/k/v split), as :func:`lrquant.models.load_model` gives it."""
    torch.manual_seed(seed)
    model = VisionTransformer(**TINY, **VARIANTS[variant], **extra)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    for block in model.blocks:
        block.attn.fused_attn = fused_attn
    return prepare_model(model.eval()) if prepared else model.eval()


def pixels(n: int = 3, seed: int = 2, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(n, 3, IMG, IMG, generator=torch.Generator().manual_seed(seed)).to(dtype)


# ---- the split ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("fused_attn", [True, False], ids=["sdpa", "explicit"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_split_forward_equals_timm_in_float64(variant, fused_attn):
    model = tiny_vit(variant, fused_attn=fused_attn, prepared=False).double()
    x = pixels(dtype=torch.float64)
    with torch.no_grad():
        ref = model(x)
        assert prepare_model(model) is model  # split in place
        mapping = get_mapping(model)
        out = model(x)
    assert mapping.family == "timm_vit"
    assert all(isinstance(b.attn, SplitQKVAttention) and b.attn.fused_attn == fused_attn for b in model.blocks)
    assert (ref - ref.mean()).abs().max() > 1e-3
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("fused_attn", [True, False], ids=["sdpa", "explicit"])
def test_split_attention_masks_equal_timm(fused_attn):
    """Boolean and additive masks and is_causal go through exactly as in timm's Attention."""
    model = tiny_vit("qk_norm", fused_attn=fused_attn, prepared=False).double()
    attn = model.blocks[0].attn
    ref_attn = copy.deepcopy(attn)
    split = SplitQKVAttention(attn)
    x = torch.randn(2, 5, DIM, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    boolean = torch.rand(2, 1, 5, 5, generator=torch.Generator().manual_seed(4)) > 0.3
    boolean[..., 0] = True  # every query sees at least one key
    additive = torch.randn(1, HEADS, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        for kwargs in ({}, {"attn_mask": boolean}, {"attn_mask": additive}, {"is_causal": True}):
            torch.testing.assert_close(split(x, **kwargs), ref_attn(x, **kwargs), atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_refuse_round_trip_is_exact(variant):
    model = tiny_vit(variant, prepared=False)
    ref_state = {k: v.clone() for k, v in model.state_dict().items()}
    x = pixels()
    with torch.no_grad():
        ref = model(x)
    split_qkv(model)
    split_qkv(model)  # idempotent
    assert isinstance(model.config, TimmViTConfig)
    fused = fused_state_dict(model)
    assert fused.keys() == ref_state.keys()
    assert all(torch.equal(fused[k], ref_state[k]) for k in fused)
    fuse_qkv(model)
    assert not hasattr(model, "config")
    assert all(type(b.attn).__name__ == "Attention" for b in model.blocks)
    assert model.state_dict().keys() == ref_state.keys()
    assert all(torch.equal(v, ref_state[k]) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(model(x), ref)


def test_mapping_config_and_registry():
    model = tiny_vit("layerscale_bias")
    mapping = get_mapping(model)
    cfg = model.config
    assert (cfg.num_attention_heads, cfg.head_dim, cfg.hidden_size, cfg.num_hidden_layers, cfg.image_size) == (
        HEADS, DIM // HEADS, DIM, DEPTH, IMG)
    assert mapping.heads(cfg) == (HEADS, HEADS, DIM // HEADS)
    assert mapping.norm_kind == "layer" and mapping.encoder and not mapping.rope and not mapping.gated_mlp
    block = model.blocks[0]
    shapes = {p: tuple(block.get_submodule(p).weight.shape) for p in mapping.linears()}
    assert shapes == {"attn.q_proj": (DIM, DIM), "attn.k_proj": (DIM, DIM), "attn.v_proj": (DIM, DIM),
                      "attn.o_proj": (DIM, DIM), "mlp.fc1": (4 * DIM, DIM), "mlp.fc2": (DIM, 4 * DIM)}
    assert {p.kind for p in mapping.smooth_pairs()} == {"norm", "heads", "qk"}
    assert model.get_submodule(mapping.head) is model.head and model.get_submodule(mapping.final_norm) is model.norm
    assert TIMM_VIT in supported() and "VisionTransformer" not in supported()
    qk = get_mapping(tiny_vit("qk_norm"))
    assert qk.q_norm == "attn.q_norm" and "qk" not in {p.kind for p in qk.smooth_pairs()}
    assert mapping.preparation is TIMM_QKV_SPLIT and mapping.checkpoint_layout is TIMM_CHECKPOINT
    assert mapping.eval_image_size is None  # the config's image_size is the evaluation size


def _structure(model: nn.Module) -> tuple:
    """Everything get_mapping could change: module names and types, parameter objects and values, the
    root's attributes (``config``)."""
    return ([(n, type(m)) for n, m in model.named_modules()],
            [(n, p, p.detach().clone()) for n, p in model.named_parameters()], sorted(vars(model)))


def _assert_same_structure(model: nn.Module, before: tuple) -> None:
    after = _structure(model)
    assert after[0] == before[0] and after[2] == before[2]
    assert [(n, p) for n, p, _ in after[1]] == [(n, p) for n, p, _ in before[1]]
    assert all(torch.equal(a, b) for (_, _, a), (_, _, b) in zip(after[1], before[1], strict=True))


def test_get_mapping_needs_the_preparation_and_leaves_the_model_untouched():
    raw = tiny_vit("qk_norm", prepared=False)
    before = _structure(raw)
    with pytest.raises(UnsupportedArchitectureError, match=r"not split yet: call lrquant.arch.prepare_model"):
        get_mapping(raw)
    _assert_same_structure(raw, before)
    assert not hasattr(raw, "config")
    prepared = prepare_model(raw)
    before = _structure(prepared)
    first, second = get_mapping(prepared), get_mapping(prepared)
    assert first == second and first.q_norm == "attn.q_norm"
    _assert_same_structure(prepared, before)
    prepare_model(prepared)  # idempotent
    _assert_same_structure(prepared, before)


def test_bare_class_name_lookup_still_works_and_torchvision_name_is_not_taken():
    from transformers import LlamaForCausalLM

    assert any(name == "LlamaForCausalLM" for name in supported())
    other = type("VisionTransformer", (nn.Module,), {"__module__": "torchvision.models.vision_transformer"})()
    with pytest.raises(UnsupportedArchitectureError):
        get_mapping(other)
    # a qualified registration is found for subclasses through the MRO, before bare names
    sub = prepare_model(type("MyViT", (VisionTransformer,), {})(**TINY))
    assert get_mapping(sub).family == "timm_vit"
    assert LlamaForCausalLM.__name__ in supported()


@pytest.mark.parametrize("kwargs, message", [
    ({"block_fn": "ResPostBlock"}, "pre-norm Block"),
    ({"scale_attn_norm": True}, "scale_attn_norm"),
    ({"mlp_layer": "GluMlp", "mlp_ratio": 2.0}, "Mlp"),
    ({"norm_layer": "RmsNorm"}, "LayerNorm"),
])
def test_unsupported_layouts_are_refused_untouched(kwargs, message):
    import timm.layers
    import timm.models.vision_transformer as tvit

    resolved = dict(kwargs)
    if "block_fn" in resolved:
        resolved["block_fn"] = getattr(tvit, resolved["block_fn"])
    if "mlp_layer" in resolved:
        resolved["mlp_layer"] = getattr(timm.layers, resolved["mlp_layer"])
    if "norm_layer" in resolved:
        resolved["norm_layer"] = getattr(timm.layers, resolved["norm_layer"])
    model = VisionTransformer(**TINY, **resolved)
    with pytest.raises(UnsupportedArchitectureError, match=message):
        prepare_model(model)
    with pytest.raises(UnsupportedArchitectureError, match=message):
        get_mapping(model)
    assert not any(isinstance(m, SplitQKVAttention) for m in model.modules()) and not hasattr(model, "config")


def test_fuse_tensor_names():
    t = {f"blocks.0.attn.{r}_proj.weight_scale": torch.full((4, 1), float(i)) for i, r in enumerate("qkv")}
    t |= {f"blocks.0.attn.{r}_proj.input_scale": torch.ones(1, 1) for r in "qkv"}
    t |= {"blocks.0.attn.o_proj.weight_scale": torch.ones(4, 1), "head.weight": torch.zeros(2)}
    out = fuse_tensor_names(t)
    assert set(out) == {"blocks.0.attn.qkv.weight_scale", "blocks.0.attn.qkv.input_scale",
                        "blocks.0.attn.proj.weight_scale", "head.weight"}
    assert out["blocks.0.attn.qkv.weight_scale"].flatten().tolist() == [0.0] * 4 + [1.0] * 4 + [2.0] * 4
    t["blocks.0.attn.k_proj.input_scale"] = torch.full((1, 1), 2.0)
    with pytest.raises(LrquantError, match="differ"):
        fuse_tensor_names(t)


def test_checkpoint_layout_writes_timm_weights(tmp_path):
    """The mapping's checkpoint layout: ``model.safetensors`` loads strictly into the unsplit timm ViT and
    computes the same; qparams renamed to timm's names."""
    from safetensors.torch import load_file

    model = tiny_vit("layerscale_bias")
    assert TIMM_CHECKPOINT.save_model(model, tmp_path / "model") == tmp_path / "model"
    assert {p.name for p in (tmp_path / "model").iterdir()} == {"config.json", "model.safetensors"}
    assert json.loads((tmp_path / "model" / "config.json").read_text())["num_classes"] == CLASSES
    fresh = VisionTransformer(**TINY, **VARIANTS["layerscale_bias"]).eval()
    fresh.load_state_dict(load_file(str(tmp_path / "model" / "model.safetensors")), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(fresh(pixels()), model(pixels()), atol=1e-6, rtol=1e-6)
    scales = {f"blocks.0.attn.{r}_proj.weight_scale": torch.full((DIM, 1), float(i)) for i, r in enumerate("qkv")}
    fused_names = {"blocks.0.attn.qkv.weight_scale"}
    assert TIMM_CHECKPOINT.rename_qparams(scales).keys() == fused_names
    save_timm(model, tmp_path / "with_qparams", qparams=scales)
    assert load_file(str(tmp_path / "with_qparams" / "qparams.safetensors")).keys() == fused_names


# ---- exact folds -------------------------------------------------------------------------------------


@pytest.mark.parametrize("affine", [False, True], ids=["scale_shift", "affine"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_fold_is_exact_in_float64(variant, affine):
    model = tiny_vit(variant).double()
    x = pixels(dtype=torch.float64)
    with torch.no_grad():
        ref = model(x)
        gen = torch.Generator().manual_seed(5)
        for block in model.get_submodule(get_mapping(model).blocks):
            attach_random(model, block, gen, affine)
        temporary = model(x)
        for block in model.blocks:
            fold_block(block)
        folded = model(x)
    torch.testing.assert_close(temporary, ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(folded, ref, atol=1e-6, rtol=1e-6)
    assert not any("parametrizations" in n for n, _ in model.named_parameters())
    fused = fused_state_dict(model)  # the folded model still saves in timm's layout and loads strictly
    fresh = VisionTransformer(**TINY, **VARIANTS[variant]).double().eval()
    fresh.load_state_dict(fused, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), ref, atol=1e-6, rtol=1e-6)


# ---- the engine --------------------------------------------------------------------------------------


def _recipe(method: str, kv_bits: int | None = None, epochs: int = 1, **options) -> Recipe:
    return Recipe(method=method, scheme=Scheme.from_bits(4, 4, None, kv_bits=kv_bits),
                  calib=CalibArgs(nsamples=4), train=TrainArgs(epochs=epochs, batch_size=2), options=options)


def _calib(n: int = 4) -> list[dict[str, torch.Tensor]]:
    x = pixels(n, seed=7)
    return [{"x": x[i : i + 1]} for i in range(n)]


METHODS = ["rtn", "smoothquant", "omniquant", "affinequant", "lrquant", "lrquant_plus", "repquant"]


@pytest.mark.parametrize("method", METHODS)
def test_methods_w4a4_end_to_end(method):
    model = tiny_vit("layerscale_bias")
    fp = copy.deepcopy(model)
    x = pixels()
    res = api.quantize(model, _recipe(method), _calib(), progress=False)
    assert len(res.reports) == DEPTH
    for r in res.reports:
        if method not in ("rtn", "smoothquant"):
            assert r.init_loss is not None and r.final_loss <= r.init_loss
    mapping = get_mapping(model)
    for block in model.blocks:
        assert isinstance(block.attn.attn_quantizer, AttentionQuantizer)
        for path in mapping.linears():
            lin = block.get_submodule(path)
            assert isinstance(lin, QuantLinear) and lin.weight_frozen, path
    with torch.no_grad():
        out, ref = model(x), fp(x)
    assert torch.isfinite(out).all() and not torch.equal(out, ref)
    assert not any("parametrizations" in n for n, _ in model.named_parameters())
    # timm's layout: the fake-quant weights load strictly into a plain timm ViT, which then computes what
    # the quantized model computes with its activation / Q/K/V quantizers off (RepQuant's softmax too)
    fresh = VisionTransformer(**TINY, **VARIANTS["layerscale_bias"]).eval()
    fresh.load_state_dict(fused_state_dict(model), strict=True)
    from lrquant.methods.repquant import full_precision

    with torch.no_grad(), full_precision(model):
        torch.testing.assert_close(fresh(x), model(x), atol=1e-5, rtol=1e-5)
    qparams = fuse_tensor_names(quant_state(model))
    assert qparams["blocks.0.attn.qkv.weight_scale"].shape == (3 * DIM, 1)
    assert not any("q_proj" in k or "o_proj" in k for k in qparams)


def test_qkv_quantizers_are_active_at_w4a4():
    """The attention operands are quantized: kv 4 vs 16 bits changes the output, and the quantizers see
    Q, K, V as [B, H, N, head_dim]."""
    outs = {}
    seen: list[tuple[int, ...]] = []
    for kv in (4, 16):
        model = tiny_vit()
        api.quantize(model, _recipe("rtn", kv_bits=kv), _calib(), progress=False)
        if kv == 4:
            quantizer = model.blocks[0].attn.attn_quantizer
            for role in (quantizer.q, quantizer.k, quantizer.v):
                role.register_forward_pre_hook(lambda _m, args: seen.append(tuple(args[0].shape)))
        else:
            assert all(b.attn.attn_quantizer is None for b in model.blocks)
        with torch.no_grad():
            outs[kv] = model(pixels())
    tokens = (IMG // PATCH) ** 2 + 1
    assert seen == [(3, HEADS, tokens, DIM // HEADS)] * 3
    assert (outs[4] - outs[16]).abs().max() > 1e-4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_engine_on_cuda_moves_root_level_tokens():
    """pre_blocks is the model root (cls token / pos_embed are root parameters): capture works on CUDA."""
    model = tiny_vit("layerscale_bias")
    res = api.quantize(model, _recipe("omniquant"), _calib(), device="cuda", progress=False)
    assert all(r.final_loss <= r.init_loss for r in res.reports)
    with torch.no_grad():
        assert torch.isfinite(model.cpu()(pixels())).all()


def test_repquant_quantizes_the_softmax():
    from lrquant.methods.repquant import Log2ShiftQuantizer

    model = tiny_vit()
    res = api.quantize(model, _recipe("repquant"), _calib(), progress=False)
    assert all(isinstance(b.attn.attn_quantizer.probs, Log2ShiftQuantizer) for b in model.blocks)
    assert any("softmax" in op for op in res.online_ops)
    with torch.no_grad():
        with_probs = model(pixels())
        for b in model.blocks:
            b.attn.attn_quantizer.probs = None
        without = model(pixels())
    assert torch.isfinite(with_probs).all() and (with_probs - without).abs().max() > 0


# ---- loading, preprocessing, CLI ---------------------------------------------------------------------


def _tiny_image_folder(root: Path, classes: int = 2, per_class: int = 3) -> Path:
    gen = torch.Generator().manual_seed(0)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            arr = (torch.rand(40, 48, 3, generator=gen) * 255).to(torch.uint8).numpy()
            Image.fromarray(arr).save(root / f"class{c}" / f"{i}.png")
    return root


def _timm_folder(path: Path) -> Path:
    """A tiny ViT made by timm's factory (so it has a pretrained_cfg) saved in timm's local-dir layout."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **TINY, init_values=0.1)
    timm.models.save_for_hf(model, path, safe_serialization=True)
    return path


def test_load_timm_specs_and_preprocessing(tmp_path):
    from lrquant.data.images import IMAGENET_MEAN, model_preprocessing
    from lrquant.models import load_model

    folder = _timm_folder(tmp_path / "tiny")
    model, processor, name = load_model(f"timm:{folder}", kind="vision")
    assert processor is None and name == "tiny" and not model.training
    assert model.patch_embed.img_size == (IMG, IMG) and model.num_classes == CLASSES
    prep = model_preprocessing(model)
    assert prep == {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "crop_pct": 0.9}  # vit_tiny's cfg
    assert model_preprocessing(nn.Linear(1, 1))["mean"] == IMAGENET_MEAN
    # prepared at load: q/k/v split, config attached; the mapping lookup has nothing left to do
    assert all(isinstance(b.attn, SplitQKVAttention) for b in model.blocks)
    assert model.config.image_size == IMG and get_mapping(model).family == "timm_vit"
    # <architecture>@<local weights file>: timm's pretrained path with a local file
    big = timm.create_model("vit_tiny_patch16_224", pretrained=False)
    from safetensors.torch import save_file

    save_file(big.state_dict(), str(tmp_path / "w.safetensors"))
    loaded, _, name = load_model(f"timm:vit_tiny_patch16_224@{tmp_path / 'w.safetensors'}", kind="vision")
    assert name == "vit_tiny_patch16_224@w"
    fused = fused_state_dict(loaded)  # the split model's weights in timm's layout: the file's weights
    assert fused.keys() == big.state_dict().keys()
    assert all(torch.equal(fused[k], v) for k, v in big.state_dict().items())
    with pytest.raises(LrquantError, match="size mismatch"):  # weights of another architecture
        load_model(f"timm:vit_small_patch16_224@{tmp_path / 'w.safetensors'}", kind="vision")
    with pytest.raises(LrquantError, match="not found"):
        load_model(f"timm:vit_tiny_patch16_224@{tmp_path / 'missing.pth'}", kind="vision")
    with pytest.raises(LrquantError, match="image models"):
        load_model(f"timm:{folder}")


def test_timm_quantize_cli_and_reload(tmp_path):
    from lrquant.cli import main
    from lrquant.models import load_model

    folder = _timm_folder(tmp_path / "tiny")
    images = _tiny_image_folder(tmp_path / "images")
    out = tmp_path / "run"
    code = main(["quantize", "--model", f"timm:{folder}", "--method", "rtn", "--wbits", "4", "--abits", "4",
                 "--group-size", "0", "--calib", str(images), "--nsamples", "4", "--epochs", "1",
                 "--eval", "top1,retrieval", "--output", str(out), "--quiet"])
    assert code == 0
    r = json.loads((out / "results.json").read_text())
    assert r["model"] == "tiny" and r["eval"] == {"images": 6, "size": IMG} and len(r["blocks"]) == DEPTH
    for key in ("top1", "retrieval_top1", "fp_top1", "fp_retrieval_top1"):
        assert 0 <= r[key] <= 1
    assert -1 <= r["feature_cosine"] <= 1 + 1e-6
    assert {p.name for p in (out / "model").iterdir()} == {"config.json", "model.safetensors"}
    from safetensors.torch import load_file

    qparams = load_file(str(out / "qparams.safetensors"))
    assert qparams["blocks.1.attn.qkv.weight_scale"].shape == (3 * DIM, 1)
    # the saved model is a plain timm checkpoint of the fake-quant weights
    plain = timm.create_model(f"local-dir:{out / 'model'}", pretrained=True).eval()
    assert type(plain.blocks[0].attn).__name__ == "Attention"
    reloaded, _, _ = load_model(f"timm:{out / 'model'}", kind="vision")
    fp, _, _ = load_model(f"timm:{folder}", kind="vision")
    x = pixels()
    with torch.no_grad():
        assert not torch.equal(reloaded(x), fp(x))
        assert torch.isfinite(reloaded(x)).all()
        torch.testing.assert_close(plain(x), reloaded(x), atol=1e-5, rtol=1e-5)
