"""The vision job end to end through the CLI: image-folder calibration, retrieval and top-1 before and
after quantization, feature cosine, a complete run folder."""

from __future__ import annotations

import json

import pytest
import torch

from lrquant.cli import main


@pytest.mark.parametrize("head", [False, True], ids=["backbone", "classifier"])
def test_vision_quantize_cli(tmp_path, shared_data, head):
    from transformers import ViTConfig, ViTForImageClassification, ViTModel

    torch.manual_seed(0)
    cfg = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                    image_size=32, patch_size=8, num_labels=1000)
    (ViTForImageClassification if head else ViTModel)(cfg).save_pretrained(tmp_path / "vit")
    images = shared_data / "imagenet-sample-images" / "images"
    evals = "top1" if head else "retrieval"
    out = tmp_path / "run"
    code = main(["quantize", "--model", str(tmp_path / "vit"), "--method", "omniquant", "--wbits", "8",
                 "--abits", "8", "--group-size", "0", "--calib", str(images), "--nsamples", "2", "--epochs", "1",
                 "--eval", evals, "--eval-limit", "8", "--output", str(out), "--quiet"])
    assert code == 0
    r = json.loads((out / "results.json").read_text())
    key = "top1" if head else "retrieval_top1"
    assert r["eval"]["images"] == 8 and 0 <= r[key] <= 1 and 0 <= r["fp_" + key] <= 1
    assert 0.5 < r["feature_cosine"] <= 1.0 + 1e-6
    assert (out / "model" / "config.json").is_file() and len(r["blocks"]) == 2


def test_fp_vision_outputs_are_cached_per_model_and_pixels(tmp_path, monkeypatch):
    """The FP pass of a vision run is computed once per (model content, weights, pixels) and reused."""
    from lrquant.eval.vision import fp_outputs_cached

    monkeypatch.setenv("LRQUANT_CACHE", str(tmp_path))
    model = torch.nn.Linear(4, 3)
    pixels = torch.randn(5, 4)
    calls = []

    def outputs(m):
        calls.append(1)
        with torch.no_grad():
            return {"logits": m(pixels)}

    a = fp_outputs_cached("m", model, [pixels], outputs)
    b = fp_outputs_cached("m", model, [pixels], outputs)
    assert len(calls) == 1 and torch.equal(a["logits"], b["logits"])
    with torch.no_grad():
        model.weight[0, 0] += 1  # other weights under the same identity: recomputed
    fp_outputs_cached("m", model, [pixels], outputs)
    fp_outputs_cached("m", model, [pixels + 1], outputs)  # other pixels: recomputed
    fp_outputs_cached("other", model, [pixels + 1], outputs)  # another model identity: recomputed
    assert len(calls) == 4
