"""Test-time adaptation study: calibrate once on WikiText-2, then PPL on other corpora without TTA and with
several TTA settings (last K blocks, S steps, learning rate), restoring the calibrated blocks in between.
Adaptation uses the tail of each stream, scoring its first windows: never the same tokens.

    python bench/bench_tta.py --data-dir ../shared/data                 # LRQuant W4A4, PTB and C4

Prints one JSON line per setting (PPL, seconds, adapted-block losses before/after) and writes them to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import time

from lrquant.api import quantize
from lrquant.config import CalibArgs, Recipe, Scheme, TrainArgs, TTAStep
from lrquant.eval.perplexity import evaluate_ppl, load_eval_sets
from lrquant.models import load_model
from lrquant.runs import run_tta

SETTINGS = [dict(blocks=1, steps=2), dict(blocks=4, steps=5, lr=5e-3)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", default="lrquant")
    ap.add_argument("--wbits", type=int, default=4)
    ap.add_argument("--abits", type=int, default=4)
    ap.add_argument("--nsamples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--eval", default="ptb,c4")
    ap.add_argument("--eval-windows", type=int, default=4)
    ap.add_argument("--settings", default=json.dumps(SETTINGS), help="JSON list of TTAStep keyword dicts")
    ap.add_argument("--option", action="append", default=[], help="recipe override KEY=VALUE (YAML value), "
                    "e.g. loss.mask=massive")
    ap.add_argument("--data-dir", default=os.environ.get("LRQUANT_DATA_DIR"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default="runs/bench-tta.json")
    args = ap.parse_args()

    settings = json.loads(args.settings)
    model, tok, display = load_model("default")
    import yaml

    recipe = Recipe(method=args.method, scheme=Scheme.from_bits(args.wbits, args.abits, None),
                    calib=CalibArgs(dataset="wikitext2", nsamples=args.nsamples, seqlen=args.seqlen, seed=0),
                    train=TrainArgs(epochs=args.epochs, batch_size=1))
    recipe = recipe.with_options({k: yaml.safe_load(v) for k, v in (o.split("=", 1) for o in args.option)})
    recipe = recipe.with_tta(TTAStep(blocks=max(s.get("blocks", 1) for s in settings)))
    t0 = time.time()
    qr = quantize(model, recipe, tokenizer=tok, device=args.device, progress=False, data_dir=args.data_dir,
                  model_name=display)
    print(f"calibrated {args.method} {recipe.scheme.name()} in {time.time() - t0:.0f}s", flush=True)
    sets = load_eval_sets(tok, args.eval.split(","), args.data_dir)
    base = evaluate_ppl(model, sets, 2048, args.eval_windows, args.device, False)
    rows = [{"config": None, "ppl": {k: v["ppl"] for k, v in base.items()}}]
    print(json.dumps(rows[0]), flush=True)
    for s in settings:
        ppl, info = run_tta(model, "default", qr.method, sets, TTAStep(**s), 2048, args.eval_windows, args.device,
                            False)
        rows.append({"config": s, "ppl": ppl, "seconds": {k: v["seconds"] for k, v in info.items()},
                     "loss": {k: (v["init_loss"], v["final_loss"]) for k, v in info.items()}})
        print(json.dumps(rows[-1]), flush=True)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"method": args.method, "scheme": recipe.scheme.name(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
