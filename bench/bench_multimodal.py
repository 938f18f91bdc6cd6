"""Multimodal table on the assembled LLaVA-style test bed (``bench/mm_testbed.py``: DINOv2-small tower,
SmolLM2-135M language model, a projector fitted on ImageNet sample images; a test bed, not a useful VLM).

Each row is one :func:`lrquant.multimodal.run_multimodal` job: a recipe, which parts are quantized (language
model only, or with the vision tower), and the calibration (text: WikiText-2 windows of ``--seqlen`` tokens;
image-text: pairs from the test bed's calibration pool, about as many tokens per sample). Columns: caption
perplexity given the image on the held-out pairs, WikiText-2 perplexity (first ``--eval-windows`` windows of
``--eval-seqlen``), the cosine of the image features the language model receives (FP vs quantized), and
the calibration's wall and CPU seconds.

    python bench/bench_multimodal.py --data-dir ../shared/data --output runs/mm-bench \\
        --rows "RTN W4 lang=rtn:W4A16g64::text" "fast W3 lang, text=fast-w3a16g64::text" ...

A row is ``LABEL=RECIPE:VISION:PROJECTOR:CALIB`` (``VISION``: a scheme label or empty; ``PROJECTOR``:
``p`` or empty; ``CALIB``: ``text`` or ``pairs``; ``RECIPE``: a built-in recipe or ``METHOD:SCHEME`` written
``rtn-W4A16g64``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

DEFAULT_ROWS = [
    "RTN W4A16g64, language only=rtn-W4A16g64:::text",
    "fast-w3a16g64, language only, text calib=fast-w3a16g64:::text",
    "fast-w3a16g64, language only, image-text calib=fast-w3a16g64:::pairs",
    "fast-w3a16g64 + tower W8A8, image-text calib=fast-w3a16g64:W8A8::pairs",
    "fast-w3a16g64 + tower W4A16g64 + projector, image-text calib=fast-w3a16g64:W4A16g64:p:pairs",
]


def recipe_for(spec: str, vision: str, projector: bool, calib: str, nsamples: int, seqlen: int):
    from lrquant.config import Recipe, parse_scheme

    if "-W" in spec and not spec.startswith(("fast", "best", "omniquant-", "affinequant-")):
        method, _, label = spec.partition("-")
        recipe = Recipe(method=method, scheme=parse_scheme(label))
    else:
        recipe = Recipe.load(spec)
    parts = {"vision": vision or None, "projector": projector}
    return recipe.replace(parts=parts).with_options({"calib.dataset": calib, "calib.nsamples": nsamples,
                                                     "calib.seqlen": seqlen})


def main() -> None:
    from mm_testbed import build

    from lrquant.models import cache_dir
    from lrquant.multimodal import run_multimodal

    ap = argparse.ArgumentParser(description="multimodal table on the assembled LLaVA-style test bed")
    ap.add_argument("--data-dir", required=True, type=Path)
    ap.add_argument("--output", required=True, type=Path)
    ap.add_argument("--rows", nargs="*", default=DEFAULT_ROWS)
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=64, help="text calibration window (tokens)")
    ap.add_argument("--eval-seqlen", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: on a shared CPU, 2 threads ran 10x "
                                                              "slower per op than 1 here)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    folder = build(args.data_dir, cache_dir())
    info = json.loads((folder / "testbed.json").read_text())
    rows = []
    fp = None
    for row in args.rows:
        label, _, spec = row.partition("=")
        recipe_spec, vision, projector, calib = spec.split(":")
        source = str(folder / "calib.jsonl") if calib == "pairs" else "wikitext2"
        recipe = recipe_for(recipe_spec, vision, projector == "p", source, args.nsamples, args.seqlen)
        out = args.output / label.replace(" ", "_").replace(",", "").replace("+", "and")
        res = run_multimodal(str(folder), recipe, out, eval_datasets=["wikitext2"],
                             eval_pairs=str(folder / "eval.jsonl"), eval_limit=info["split"]["eval"],
                             eval_seqlen=args.eval_seqlen,
                             eval_windows=args.eval_windows, image_size=info["image_size"],
                             data_dir=str(args.data_dir), overwrite=True, progress=False).results
        fp = fp or (res["fp_caption_ppl"], res["fp_ppl"]["wikitext2"])
        rows.append((label, res["caption_ppl"], res["ppl"]["wikitext2"], res["image_feature_cosine"],
                     res["calib_time_s"], res["calib_cpu_s"]))
        print(f"done: {label}: caption {res['caption_ppl']:.3f}", flush=True)
    print(f"\ntest bed {folder.name}: {info['split']['eval']} held-out pairs, {args.nsamples} calibration samples, "
          f"WikiText-2 first {args.eval_windows} x {args.eval_seqlen}\n")
    print("| row | caption PPL | WikiText-2 PPL | image-feature cosine | calib s (wall / CPU) |")
    print("|---|---:|---:|---:|---:|")
    print(f"| FP | {fp[0]:.3f} | {fp[1]:.3f} | 1 | |")
    for label, cap, ppl, cos, wall, cpu in rows:
        print(f"| {label} | {cap:.3f} | {ppl:.3f} | {cos:.5f} | {wall:.0f} / {cpu:.0f} |")


if __name__ == "__main__":
    main()
