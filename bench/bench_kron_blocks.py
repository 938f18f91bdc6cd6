"""Recipes compared on the first blocks of a model: per-block output error and calibration seconds.

A cheap stand-in for a perplexity run when the CPU is shared: the model is cut to its first ``--blocks``
decoder layers, every recipe quantizes that stack on the same calibration windows (WikiText-2, seed 0,
``--nsamples`` x ``--seqlen``; each recipe's own calibration size is replaced by these), and the table gives
each block's relative output error ``|q_out - fp_out|^2 / |fp_out|^2`` (the quantized stream, so errors
accumulate as in a full run) and the block's calibration seconds. Example:

    python bench/bench_kron_blocks.py --data-dir ../shared/data --blocks 4 --nsamples 4 --seqlen 128 \\
        --iters 8 --recipes best-w4a4 kron-w4a4
"""

from __future__ import annotations

import argparse
import os

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--recipes", nargs="+", default=["best-w4a4", "kron-w4a4"])
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--nsamples", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--iters", type=int, default=None, help="override every recipe's train.iters")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--data-dir", default=os.environ.get("LRQUANT_DATA_DIR"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from lrquant import api
    from lrquant.config import CalibArgs, Recipe
    from lrquant.data.text import calibration_batches
    from lrquant.models import resolve_model_path

    path, _ = resolve_model_path(args.model)
    cfg = AutoConfig.from_pretrained(path)
    cfg.num_hidden_layers = args.blocks
    calib = calibration_batches(AutoTokenizer.from_pretrained(path), "wikitext2", args.nsamples, args.seqlen,
                                seed=0, data_dir=args.data_dir)
    rows = {}
    for name in args.recipes:
        recipe = Recipe.load(name)
        recipe.calib = CalibArgs("wikitext2", args.nsamples, args.seqlen, 0)
        if args.iters is not None:
            recipe.train.iters = args.iters
        recipe = Recipe.from_dict(recipe.to_dict())
        model = AutoModelForCausalLM.from_pretrained(path, config=cfg, dtype=torch.float32).eval()
        res = api.quantize(model, recipe, calib, progress=False)
        rows[name] = res.reports
        print(f"{name}: " + ", ".join(f"block {r.block} err {r.out_rel_err:.4g} ({r.seconds:.0f} s)"
                                      for r in res.reports), flush=True)
    iters = "each recipe's iters" if args.iters is None else f"{args.iters} iters"
    print(f"\n{args.model}, first {args.blocks} blocks, calibration {args.nsamples} x {args.seqlen} (wikitext2, "
          f"seed 0), {iters}, {args.threads} threads\n")
    print("| recipe | " + " | ".join(f"block {i} err" for i in range(args.blocks)) + " | calib s |")
    print("|---|" + "---:|" * (args.blocks + 1))
    for name, reports in rows.items():
        errs = " | ".join(f"{r.out_rel_err:.4g}" for r in reports)
        print(f"| {name} | {errs} | {sum(r.seconds for r in reports):.0f} |")


if __name__ == "__main__":
    main()
