"""Vision transformers: architecture mappings on tiny random models (paths, shapes, hooks, exact folds,
RTN through the engine), ImageNet-layout image folders and preprocessing, and the vision metrics.
The slow test reproduces DINOv2-small two-crop retrieval on the first 100 shared images."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from torch import nn

from lrquant import api
from lrquant.arch import SmoothPair, get_mapping
from lrquant.arch.base import ArchMapping, check_config
from lrquant.arch.vision import DINOV2
from lrquant.config import Recipe, Scheme
from lrquant.data.images import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    calibration_images,
    load_image_folder,
    preprocess,
    resize_center_crop,
    two_crop_pairs,
)
from lrquant.engine import capture_block_inputs
from lrquant.errors import DataError, LrquantError, UnsupportedArchitectureError
from lrquant.eval.vision import feature_cosine, retrieval_top1, retrieval_top1_from_embeddings, top1
from lrquant.quant.quantizers import QuantLinear

HIDDEN, LAYERS, HEADS, IMG, PATCH, INTER, LABELS = 32, 2, 2, 32, 8, 64, 10
VIT = dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=INTER,
           image_size=IMG, patch_size=PATCH, num_labels=LABELS)
DINO = dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
            mlp_ratio=INTER // HIDDEN, image_size=IMG, patch_size=PATCH, num_labels=LABELS)


@dataclass(frozen=True)
class Case:
    name: str
    family: str
    build: Callable[[], nn.Module]
    base_attr: str | None = None  # attribute holding the bare base model (None: the model is one)
    head_in: int | None = HIDDEN  # classifier input width (None: no single mapped head)


CASES = [
    Case("vit", "vit", lambda: transformers.ViTModel(transformers.ViTConfig(**VIT)), head_in=None),
    Case("vit_cls", "vit", lambda: transformers.ViTForImageClassification(transformers.ViTConfig(**VIT)),
         "vit"),
    Case("deit_cls", "deit", lambda: transformers.DeiTForImageClassification(transformers.DeiTConfig(**VIT)),
         "deit"),
    Case("deit_teacher", "deit", lambda: transformers.DeiTForImageClassificationWithTeacher(
        transformers.DeiTConfig(**VIT)), "deit", head_in=None),
    Case("dinov2", "dinov2", lambda: transformers.Dinov2Model(transformers.Dinov2Config(**DINO)),
         head_in=None),
    Case("dinov2_cls", "dinov2", lambda: transformers.Dinov2ForImageClassification(
        transformers.Dinov2Config(**DINO)), "dinov2", head_in=2 * HIDDEN),
]


@pytest.fixture(scope="module", params=CASES, ids=[c.name for c in CASES])
def case_model(request) -> tuple[Case, nn.Module]:
    """A tiny random model with every parameter perturbed (norm gains and layer scales off 1)."""
    torch.manual_seed(0)
    case: Case = request.param
    model = case.build()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    return case, model.eval()


@pytest.fixture(scope="module")
def pixels() -> torch.Tensor:
    return torch.randn(3, 3, IMG, IMG, generator=torch.Generator().manual_seed(2))


def _out(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(pixel_values=x)
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def _block(model: nn.Module, mapping: ArchMapping, i: int = 0) -> nn.Module:
    return model.get_submodule(mapping.blocks)[i]


# ---- mappings: structure ---------------------------------------------------------------------------


def test_family_and_base_model(case_model):
    case, model = case_model
    mapping = get_mapping(model)
    assert mapping.family == case.family and mapping.encoder and not mapping.rope
    assert mapping.norm_kind == "layer" and not mapping.gated_mlp and mapping.embed_tokens is None
    check_config(mapping, model.config)
    if case.base_attr is None:
        return
    base = getattr(model, case.base_attr)
    base_mapping = get_mapping(base)
    assert base_mapping == mapping.for_base_model(case.base_attr + ".")
    assert base_mapping.head is None
    assert base.get_submodule(base_mapping.blocks) is model.get_submodule(mapping.blocks)
    assert base.get_submodule(base_mapping.final_norm) is model.get_submodule(mapping.final_norm)
    for p_base, p in zip(base_mapping.pre_blocks, mapping.pre_blocks, strict=True):
        assert base.get_submodule(p_base) is model.get_submodule(p)


def test_model_level_paths(case_model):
    case, model = case_model
    mapping = get_mapping(model)
    blocks = model.get_submodule(mapping.blocks)
    assert isinstance(blocks, nn.ModuleList) and len(blocks) == LAYERS
    (embeddings,) = mapping.pre_blocks
    assert type(model.get_submodule(embeddings)).__name__.endswith("Embeddings")
    final = model.get_submodule(mapping.final_norm)
    assert isinstance(final, nn.LayerNorm) and final.weight.shape == (HIDDEN,)
    if case.head_in is None:
        assert mapping.head is None
    else:
        head = model.get_submodule(mapping.head)
        assert isinstance(head, nn.Linear) and (head.in_features, head.out_features) == (case.head_in, LABELS)


def test_block_linears_shapes_and_coverage(case_model):
    _, model = case_model
    mapping = get_mapping(model)
    assert mapping.heads(model.config) == (HEADS, HEADS, HIDDEN // HEADS)
    expected = {mapping.q: (HIDDEN, HIDDEN), mapping.k: (HIDDEN, HIDDEN), mapping.v: (HIDDEN, HIDDEN),
                mapping.o: (HIDDEN, HIDDEN), mapping.mlp_in[0]: (HIDDEN, INTER),
                mapping.mlp_out: (INTER, HIDDEN)}
    assert len(mapping.linears()) == len(set(mapping.linears())) == len(expected) == 6
    for block in model.get_submodule(mapping.blocks):
        for path in mapping.linears():
            lin = block.get_submodule(path)
            assert isinstance(lin, nn.Linear), path
            assert (lin.in_features, lin.out_features) == expected[path], path
            assert lin.bias is not None
        assert {n for n, m in block.named_modules() if isinstance(m, nn.Linear)} == set(mapping.linears())


def test_block_norms_and_layer_scale(case_model):
    case, model = case_model
    mapping = get_mapping(model)
    block = _block(model, mapping)
    for path in (mapping.attn_norm, mapping.mlp_norm):
        norm = block.get_submodule(path)
        assert isinstance(norm, nn.LayerNorm) and norm.weight.shape == norm.bias.shape == (HIDDEN,), path
    owners = {n for n, m in block.named_modules()
              if not isinstance(m, nn.Linear) and any(True for _ in m.parameters(recurse=False))}
    layer_scales = {"layer_scale1", "layer_scale2"} if case.family == "dinov2" else set()
    assert owners == {mapping.attn_norm, mapping.mlp_norm} | layer_scales
    for path in layer_scales:  # per-channel gains after o / fc2, perturbed away from 1 by the fixture
        assert block.get_submodule(path).lambda1.shape == (HIDDEN,)


def test_capture_block_inputs_from_pixels(case_model, pixels):
    case, model = case_model
    mapping = get_mapping(model)
    calib = [{"pixel_values": pixels[:2]}, {"pixel_values": pixels[2:]}]
    hidden, kwargs = capture_block_inputs(model, mapping, calib, torch.device("cpu"))
    with torch.no_grad():
        ref = model.get_submodule(mapping.pre_blocks[0])(pixels)
    extra_tokens = 2 if case.family == "deit" else 1  # CLS (+ DeiT's distillation token)
    assert hidden.shape == (3, (IMG // PATCH) ** 2 + extra_tokens, HIDDEN)
    torch.testing.assert_close(hidden, ref)


# ---- mappings: numerics ----------------------------------------------------------------------------


def test_norms_feed_mapped_linears(case_model, pixels):
    _, model = case_model
    mapping = get_mapping(model)
    block = _block(model, mapping)
    inputs: dict[str, torch.Tensor] = {}
    outputs: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def fn(_m, args, out):
            inputs[name], outputs[name] = args[0].detach(), out.detach()
        return fn

    paths = {*mapping.linears(), mapping.attn_norm, mapping.mlp_norm}
    handles = [block.get_submodule(p).register_forward_hook(hook(p)) for p in paths]
    try:
        _out(model, pixels)
    finally:
        for h in handles:
            h.remove()
    for lin in (mapping.q, mapping.k, mapping.v):
        assert torch.equal(outputs[mapping.attn_norm], inputs[lin]), lin
    assert torch.equal(outputs[mapping.mlp_norm], inputs[mapping.mlp_in[0]])
    assert not torch.equal(outputs[mapping.attn_norm], inputs[mapping.mlp_in[0]])
    assert not torch.equal(outputs[mapping.mlp_norm], inputs[mapping.q])


def _fold(block: nn.Module, pair: SmoothPair, s: torch.Tensor) -> None:
    """Scale ``pair``'s channels by ``s`` on ``prev`` and ``1/s`` on ``nexts`` (MHA: no GQA expansion)."""
    prev = block.get_submodule(pair.prev)
    nexts = [block.get_submodule(p) for p in pair.nexts]
    with torch.no_grad():
        if pair.kind == "norm":
            prev.weight.mul_(s)
            prev.bias.mul_(s)
            for nx in nexts:
                nx.weight.div_(s[None, :])
        elif pair.kind == "heads":
            prev.weight.mul_(s[:, None])
            prev.bias.mul_(s)
            nexts[0].weight.div_(s[None, :])
        else:
            assert pair.kind == "qk"
            prev.weight.mul_(s[:, None])
            prev.bias.mul_(s)
            nexts[0].weight.div_(s[:, None])
            nexts[0].bias.div_(s)


def test_smooth_pairs_fold_exactly_and_layer_scale_is_outside_them(case_model, pixels):
    """Every smoothing pair folds exactly, DINOv2's layer scale (off 1 here) included; folding into the
    wrong norm is caught (negative control)."""
    _, model = case_model
    mapping = get_mapping(model)
    assert sorted(p.kind for p in mapping.smooth_pairs()) == ["heads", "norm", "norm", "qk"]
    ref = _out(model, pixels)
    gen = torch.Generator().manual_seed(3)
    block = _block(model, mapping)
    saved = {k: v.clone() for k, v in block.state_dict().items()}
    pairs = [*mapping.smooth_pairs(), SmoothPair(mapping.attn_norm, mapping.mlp_in, "norm")]  # last: wrong
    try:
        for i, pair in enumerate(pairs):
            _fold(block, pair, 2 ** (torch.rand(HIDDEN, generator=gen) * 2 - 1))
            out = _out(model, pixels)
            if i < len(pairs) - 1:
                torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item(),
                                           msg=str(pair))
            else:
                assert (out - ref).abs().max() > 1e-2 * ref.abs().max()
            block.load_state_dict(saved)
    finally:
        block.load_state_dict(saved)


def test_rtn_w8a8_through_the_engine(case_model, pixels):
    _, fp = case_model
    model = copy.deepcopy(fp)
    recipe = Recipe(method="rtn", scheme=Scheme.from_bits(8, 8, None))
    result = api.quantize(model, recipe, [{"pixel_values": pixels}], progress=False)
    mapping = get_mapping(model)
    assert len(result.reports) == LAYERS
    for block in model.get_submodule(mapping.blocks):
        for path in mapping.linears():
            lin = block.get_submodule(path)
            assert isinstance(lin, QuantLinear) and lin.weight_frozen, path
    ref, out = _out(fp, pixels), _out(model, pixels)
    cos = nn.functional.cosine_similarity(out.flatten(1), ref.flatten(1), dim=-1)
    assert cos.min() > 0.9
    assert (out - ref).abs().max() > 0  # it did quantize
    # patch embedding, final norm and head stay full precision
    for name, p in fp.named_parameters():
        if not name.startswith(mapping.blocks + "."):
            assert torch.equal(p, model.get_parameter(name)), name


def test_dinov2_swiglu_is_refused():
    check_config(DINOV2, transformers.Dinov2Config(**DINO))
    with pytest.raises(UnsupportedArchitectureError, match="SwiGLU"):
        check_config(DINOV2, transformers.Dinov2Config(**DINO, use_swiglu_ffn=True))
    with pytest.raises(UnsupportedArchitectureError, match="SwiGLU"):
        get_mapping(transformers.Dinov2Model(transformers.Dinov2Config(**DINO, use_swiglu_ffn=True)))


# ---- image folders ---------------------------------------------------------------------------------


def _save(path: Path, color=(200, 30, 60), size=(40, 30), mode: str = "RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).convert(mode).save(path)
    return path


SYNSETS = ["n01443537", "n01440764", "n01484850"]


def test_synset_named_files_sorted_synset_order(tmp_path):
    for s in SYNSETS:
        _save(tmp_path / f"{s}_x.JPEG")
    _save(tmp_path / "notes.txt.png")  # not a synset name: unlabelled
    (tmp_path / "readme.txt").write_text("not an image")
    items = load_image_folder(tmp_path)
    assert [(p.name, y) for p, y in items] == [
        ("n01440764_x.JPEG", 0), ("n01443537_x.JPEG", 1), ("n01484850_x.JPEG", 2), ("notes.txt.png", None)]
    # limit keeps the first images; indices are computed over the whole folder
    assert [y for _, y in load_image_folder(tmp_path, limit=2)] == [0, 1]


def test_synset_files_use_class_index_json_beside_or_above(tmp_path):
    table = {"0": ["n01484850", "shark"], "7": ["n01440764", "tench"], "9": ["n01443537", "goldfish"]}
    images = tmp_path / "images"
    for s in SYNSETS:
        _save(images / f"{s}_{s[-3:]}.JPEG")
    (tmp_path / "imagenet_class_index.json").write_text(json.dumps(table))
    assert [y for _, y in load_image_folder(images)] == [7, 9, 0]
    assert [y for _, y in load_image_folder(tmp_path)] == [7, 9, 0]  # the dataset root works too
    (tmp_path / "imagenet_class_index.json").write_text(json.dumps({"0": ["n09999999", "x"]}))
    with pytest.raises(DataError, match="n01440764"):
        load_image_folder(images)


def test_class_subfolders(tmp_path):
    _save(tmp_path / "dog" / "a.png")
    _save(tmp_path / "cat" / "b.jpg")
    _save(tmp_path / "cat" / "c.JPEG")
    _save(tmp_path / ".hidden" / "d.png")
    items = load_image_folder(tmp_path)
    assert [(p.parent.name, p.name, y) for p, y in items] == [("cat", "b.jpg", 0), ("cat", "c.JPEG", 0),
                                                             ("dog", "a.png", 1)]


def test_folder_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_image_folder(tmp_path / "missing")
    with pytest.raises(DataError, match="no images"):
        load_image_folder(tmp_path)
    _save(tmp_path / "n01440764_a.JPEG")
    with pytest.raises(DataError, match="limit"):
        load_image_folder(tmp_path, limit=0)
    (tmp_path / "n01443537_broken.JPEG").write_bytes(b"not a jpeg")
    items = load_image_folder(tmp_path)
    with pytest.raises(DataError, match="cannot read image .*broken"):
        preprocess([p for p, _ in items])
    with pytest.raises(DataError, match="not found"):
        preprocess([tmp_path / "gone.png"])


def test_preprocess_values_grayscale_and_shape(tmp_path):
    rgb = _save(tmp_path / "a.png", color=(255, 0, 128), size=(300, 200))
    gray = _save(tmp_path / "g.png", color=(90, 90, 90), size=(120, 260), mode="L")
    assert Image.open(gray).mode == "L"
    x = preprocess([rgb, gray], size=56)
    assert x.shape == (2, 3, 56, 56) and x.dtype == torch.float32
    mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    expected = (torch.tensor([255, 0, 128]) / 255 - mean) / std
    torch.testing.assert_close(x[0, :, 28, 28], expected, atol=1e-5, rtol=0)
    g = Image.open(gray).getpixel((0, 0)) / 255
    torch.testing.assert_close(x[1, :, 28, 28], (g - mean) / std, atol=1e-5, rtol=0)


def test_resize_center_crop_geometry():
    # a 400 x 200 image whose left half is black and right half white
    arr = np.zeros((200, 400, 3), dtype=np.uint8)
    arr[:, 200:] = 255
    out = resize_center_crop(Image.fromarray(arr), size=100, crop_pct=0.5)  # short side -> 200, crop center
    assert out.size == (100, 100)
    a = np.asarray(out)
    assert a[:, :45].max() == 0 and a[:, 55:].min() == 255  # the center of the image, edge to edge


def test_two_crop_pairs_geometry(tmp_path):
    """Horizontal ramp image: the first crop covers x in [0, 0.75W), the second [0.25W, W)."""
    w, h = 400, 300
    ramp = np.tile(np.linspace(0, 255, w, dtype=np.float32), (h, 1)).round().astype(np.uint8)
    path = tmp_path / "ramp.png"
    Image.fromarray(np.stack([ramp, ramp, ramp], -1)).save(path)
    first, second = two_crop_pairs([path], size=64)
    assert first.shape == second.shape == (1, 3, 64, 64)
    std, mean = IMAGENET_STD[0], IMAGENET_MEAN[0]
    red = lambda t: t[0, 0] * std + mean  # noqa: E731  back to [0, 1]
    assert red(first)[:, 0].mean() == pytest.approx(0.0, abs=0.01)
    assert red(first)[:, -1].mean() == pytest.approx(0.75, abs=0.02)
    assert red(second)[:, 0].mean() == pytest.approx(0.25, abs=0.02)
    assert red(second)[:, -1].mean() == pytest.approx(1.0, abs=0.01)
    assert red(first).mean() == pytest.approx(0.375, abs=0.01)
    assert red(second).mean() == pytest.approx(0.625, abs=0.01)


def test_calibration_images(tmp_path):
    gen = np.random.default_rng(0)
    for i in range(6):
        _save(tmp_path / f"n0144{i:04d}_x.JPEG", color=tuple(int(c) for c in gen.integers(0, 255, 3)))
    a = calibration_images(tmp_path, 3, seed=0, size=16)
    assert len(a) == 3
    assert all(set(d) == {"pixel_values"} and d["pixel_values"].shape == (1, 3, 16, 16) for d in a)
    b = calibration_images(tmp_path, 3, seed=0, size=16)
    c = calibration_images(tmp_path, 3, seed=5, size=16)
    assert all(torch.equal(x["pixel_values"], y["pixel_values"]) for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(x["pixel_values"], y["pixel_values"]) for x, y in zip(a, c, strict=True))
    with pytest.raises(DataError, match="holds 6"):
        calibration_images(tmp_path, 7, seed=0)


# ---- metrics ---------------------------------------------------------------------------------------


def test_retrieval_from_embeddings():
    a = torch.randn(5, 8, generator=torch.Generator().manual_seed(0))
    assert retrieval_top1_from_embeddings(a, a * 3) == 1.0
    assert retrieval_top1_from_embeddings(a, a[[1, 0, 2, 3, 4]]) == pytest.approx(0.6)
    with pytest.raises(DataError):
        retrieval_top1_from_embeddings(a, a[:4])


def test_top1_retrieval_and_feature_cosine_on_tiny_models(pixels):
    torch.manual_seed(0)
    clf = transformers.ViTForImageClassification(transformers.ViTConfig(**VIT)).eval()
    labels = _out(clf, pixels).argmax(-1)
    assert top1(clf, pixels, labels.tolist(), batch_size=2, progress=False) == 1.0
    assert top1(clf, pixels, (labels + 1) % LABELS, batch_size=2, progress=False) == 0.0
    with pytest.raises(DataError, match="label"):
        top1(clf, pixels, [0, None, 1], progress=False)

    backbone = transformers.Dinov2Model(transformers.Dinov2Config(**DINO)).eval()
    assert retrieval_top1(backbone, (pixels, pixels.clone()), batch_size=2, progress=False) == 1.0
    swapped = retrieval_top1(backbone, (pixels, pixels[[1, 0, 2]]), batch_size=2, progress=False)
    assert swapped == pytest.approx(1 / 3)
    assert feature_cosine(backbone, backbone, pixels, progress=False) == pytest.approx(1.0, abs=1e-6)
    q = copy.deepcopy(backbone)
    api.quantize(q, Recipe(method="rtn", scheme=Scheme.from_bits(4, 4, None)), [{"pixel_values": pixels}],
                 progress=False)
    cos = feature_cosine(backbone, q, pixels, progress=False)
    assert 0.0 < cos < 0.9999
    with pytest.raises(LrquantError, match="pooler_output"):
        retrieval_top1(clf, (pixels, pixels), progress=False)


# ---- real model ------------------------------------------------------------------------------------

FP_RETRIEVAL_TOP1_100 = 0.69  # measured: DINOv2-small, first 100 shared images, bicubic two-crop


@pytest.mark.slow
def test_dinov2_small_fp_retrieval_first_100(shared_data):
    folder, weights = shared_data / "imagenet-sample-images" / "images", shared_data / "dinov2-small-imgfocus"
    if not (folder.is_dir() and weights.is_dir()):
        pytest.skip("shared ImageNet sample images or DINOv2-small weights missing")
    model = transformers.Dinov2Model.from_pretrained(weights).eval()
    items = load_image_folder(folder, limit=100)
    assert items[0][0].name == "n01440764_tench.JPEG" and items[0][1] == 0 and items[-1][1] == 99
    pairs = two_crop_pairs([p for p, _ in items])
    assert retrieval_top1(model, pairs, batch_size=50, progress=False) == pytest.approx(FP_RETRIEVAL_TOP1_100,
                                                                                        abs=0.015)
