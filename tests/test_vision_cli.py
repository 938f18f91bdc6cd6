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
    assert (out / "run.log").stat().st_size > 0 and (out / "recipe.yaml").is_file() and r["job"] == "vision"


@pytest.mark.parametrize("flags", [["--tta"], ["--tasks", "piqa"], ["--format", "compressed-tensors"],
                                   ["--format", "gguf"]])
def test_vision_jobs_refuse_text_only_flags(tmp_path, capsys, flags):
    """Flags a vision job cannot honour are refused with one line before anything is loaded."""
    from PIL import Image

    (tmp_path / "images").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "images" / "a.png")
    out = tmp_path / "run"
    code = main(["quantize", "--model", str(tmp_path / "no-model"), "--calib", str(tmp_path / "images"),
                 "--output", str(out), *flags])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "not available for vision jobs" in err and flags[0] in err and "\n" not in err
    assert not out.exists()


def test_vision_run_resumes(tmp_path, shared_data, monkeypatch):
    """An interrupted vision run continues with --resume from its checkpoint (restored blocks are not
    recomputed) and ends with the same quantized model as an uninterrupted run."""
    from transformers import ViTConfig, ViTModel

    import lrquant.runs

    torch.manual_seed(0)
    ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       image_size=32, patch_size=8)).save_pretrained(tmp_path / "vit")
    images = shared_data / "imagenet-sample-images" / "images"
    monkeypatch.setenv("LRQUANT_CACHE", str(tmp_path / "cache"))

    def argv(out):
        return ["quantize", "--model", str(tmp_path / "vit"), "--method", "omniquant", "--wbits", "4",
                "--group-size", "0", "--calib", str(images), "--nsamples", "2", "--epochs", "1",
                "--eval", "retrieval", "--eval-limit", "4", "--output", str(out), "--quiet"]

    assert main(argv(tmp_path / "full")) == 0
    with monkeypatch.context() as m:
        def killed(*_args, **_kwargs):
            raise KeyboardInterrupt

        m.setattr(lrquant.runs, "finish_job", killed)
        assert main(argv(tmp_path / "part")) == 130
    assert (tmp_path / "part" / "checkpoint").is_dir() and not (tmp_path / "part" / "results.json").exists()
    assert main([*argv(tmp_path / "part"), "--resume"]) == 0
    r = json.loads((tmp_path / "part" / "results.json").read_text())
    assert r["resumed_blocks"] == 2
    from safetensors.torch import load_file

    full = load_file(str(tmp_path / "full" / "model" / "model.safetensors"))
    part = load_file(str(tmp_path / "part" / "model" / "model.safetensors"))
    assert full.keys() == part.keys() and all(torch.equal(full[k], part[k]) for k in full)


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
