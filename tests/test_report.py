"""lrquant.report: two fake runs -> report.md / report.html with tables and valid PNG plots."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("matplotlib")
from matplotlib.image import imread  # noqa: E402

from lrquant.errors import LrquantError  # noqa: E402
from lrquant.report import scheme_sort_key, split_layer_name, write_report  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
KINDS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
         "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def fake_results(method: str, scheme: str, ppl: float, acc_shift: float, n_blocks: int = 4) -> dict:
    rng = np.random.default_rng(len(method) + len(scheme))
    blocks = []
    for b in range(n_blocks):
        init = 0.01 * (b + 1) * (1 + rng.random())
        losses = list(init * np.exp(-np.linspace(0, 1.5, 5)))
        blocks.append({"block": b, "init_loss": init, "final_loss": losses[-1], "losses": losses,
                       "out_rel_err": 0.01 * (1 + b) * (1 + rng.random())})
    fp_zs = {"piqa": {"acc": 0.66, "acc_norm": 0.67}, "arc_easy": {"acc": 0.55, "acc_norm": 0.49},
             "winogrande": {"acc": 0.53}}
    return {
        "model": "SmolLM2-135M-Instruct",
        "method": method,
        "scheme": {"weights": {"num_bits": 4}},
        "scheme_name": scheme,
        "recipe": {"method": method},
        "fp_ppl": {"wikitext2": 18.0, "c4": 25.0},
        "ppl": {"wikitext2": ppl, "c4": ppl * 1.3},
        "eval": {"seqlen": 2048, "windows": 40},
        "calib_time_s": 123.4,
        "peak_rss_gb": 2.5,
        "blocks": blocks,
        "layer_errors": {f"model.layers.{b}.{k}": float(0.05 + 0.01 * b + 0.002 * i)
                         for b in range(n_blocks) for i, k in enumerate(KINDS)},
        "zeroshot": {t: {k: v - acc_shift for k, v in m.items()} for t, m in fp_zs.items()},
        "fp_zeroshot": fp_zs,
    }


def make_run(root: Path, name: str, results: dict) -> Path:
    d = root / name
    d.mkdir(parents=True)
    (d / "results.json").write_text(json.dumps(results))
    return d


def referenced_images(md: str, html: str) -> tuple[list[str], list[str]]:
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md), re.findall(r"<img src='([^']+)'", html)


def test_report_two_runs(tmp_path):
    a = make_run(tmp_path, "omni-w4", fake_results("omniquant", "W4A16g64", 21.5, 0.02))
    b = make_run(tmp_path, "lrq-w3", fake_results("lrquant", "W3A16g64", 30.25, 0.06))
    out = tmp_path / "report"
    md_path = write_report([a, b], out)
    assert md_path == out / "report.md"
    md, html = md_path.read_text(), (out / "report.html").read_text()
    for text in (md, html):
        assert "omniquant" in text and "lrquant" in text
        assert "W4A16g64" in text and "W3A16g64" in text
    # PPL with its change against FP; zero-shot acc / acc_norm in percent; cost columns.
    assert "21.50 (+3.50)" in md and "30.25 (+12.25)" in md
    assert "66.0 / 67.0" in md and "64.0 / 65.0" in md and "60.0 / 61.0" in md
    assert "123.4" in md and "2.50" in md

    imgs_md, imgs_html = referenced_images(md, html)
    assert sorted(imgs_md) == sorted(imgs_html)
    assert set(imgs_md) == {"ppl_by_bits.png", "block_losses.png", "loss_curves.png", "block_output_error.png",
                            "layer_errors.png"}
    for name in imgs_md:
        png = out / name
        assert png.read_bytes()[:8] == PNG_SIGNATURE, name
        pixels = imread(png)
        assert pixels.ndim == 3 and pixels.shape[0] > 200 and pixels.shape[1] > 300, (name, pixels.shape)
        assert pixels[..., :3].std() > 0.05, f"{name} looks blank"  # something was drawn


def test_report_missing_keys_and_single_run(tmp_path):
    """A run with only perplexity renders; sections without data say so and no image is referenced."""
    d = make_run(tmp_path, "rtn", {"method": "rtn", "scheme_name": "W4A16", "ppl": {"wikitext2": 19.1}})
    md = write_report([d], tmp_path / "out").read_text()
    assert "19.10" in md
    assert "No run has zero-shot results." in md
    assert "No run has per-block losses" in md and "No run has per-layer errors." in md
    imgs, _ = referenced_images(md, (tmp_path / "out" / "report.html").read_text())
    assert imgs == ["ppl_by_bits.png"]
    assert not (tmp_path / "out" / "layer_errors.png").exists()


def test_report_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(LrquantError, match="empty"):
        write_report([tmp_path / "empty"], tmp_path / "out")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "results.json").write_text("{not json")
    with pytest.raises(LrquantError, match="not valid JSON"):
        write_report([bad], tmp_path / "out")
    with pytest.raises(LrquantError):
        write_report([], tmp_path / "out")


def test_same_folder_names_get_unique_labels(tmp_path):
    a = make_run(tmp_path / "x", "run", fake_results("omniquant", "W4A16", 20.0, 0.0))
    b = make_run(tmp_path / "y", "run", fake_results("omniquant", "W3A16", 25.0, 0.0))
    md = write_report([a, b], tmp_path / "out").read_text()
    assert "| x/run |" in md and "| y/run |" in md


def test_helpers():
    names = ["W4A4", "W3A16g128", "W4A16", "W8A8", "W4A16g128", "W4A16g64", "custom"]
    assert sorted(names, key=scheme_sort_key) == [
        "W8A8", "W4A16", "W4A16g128", "W4A16g64", "W4A4", "W3A16g128", "custom"]
    assert split_layer_name("model.layers.12.self_attn.q_proj") == (12, "self_attn.q_proj")
    assert split_layer_name("lm_head") == (None, "lm_head")
