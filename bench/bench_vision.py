"""Vision-transformer table: retrieval top-1 (or top-1 for classifiers) and mean FP-vs-quantized feature
cosine of every method x scheme, one subprocess per run, printed as a Markdown table.

CPU-sized defaults (state them when you report)::

    python bench/bench_vision.py --model ../shared/data/dinov2-small-imgfocus \\
        --images ../shared/data/imagenet-sample-images/images

Each run lands in <out>/<method>-<scheme>/ (a finished run is reused unless --rerun). Calibration images are
drawn at random from the same folder the evaluation reads (unlabelled; say so when you report).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

SCHEMES = {  # name -> CLI flags (per-channel weights, per-token activations)
    "W8A8": ["--wbits", "8", "--abits", "8", "--group-size", "0"],
    "W6A6": ["--wbits", "6", "--abits", "6", "--group-size", "0"],
    "W4A4": ["--wbits", "4", "--abits", "4", "--group-size", "0"],
}
METHODS = ["rtn", "repquant", "omniquant", "lrquant", "lrquant_plus"]


def run_one(args: argparse.Namespace, method: str, scheme: str) -> dict | None:
    out = Path(args.out) / f"{method}{args.tag}-{scheme}"
    if (out / "results.json").is_file() and not args.rerun:
        return json.loads((out / "results.json").read_text())
    cmd = [sys.executable, "-m", "lrquant.cli", "quantize", "--model", args.model, "--method", method,
           *SCHEMES[scheme], "--calib", args.images, "--eval", args.eval, "--eval-limit", str(args.eval_limit),
           "--nsamples", str(args.nsamples), "--epochs", str(args.epochs), "--device", args.device,
           "--output", str(out), "--overwrite", "--no-save", "--quiet", *args.extra.split()]
    print("$", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, env=os.environ.copy())
    if proc.returncode != 0:
        print(f"run failed: {method} {scheme} (exit {proc.returncode})", flush=True)
        return None
    return json.loads((out / "results.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="vision model folder or hub id")
    ap.add_argument("--images", required=True, help="ImageNet-layout image folder (calibration + evaluation)")
    ap.add_argument("--eval", default="retrieval", choices=("retrieval", "top1"))
    ap.add_argument("--eval-limit", type=int, default=500)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--schemes", default=",".join(SCHEMES))
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--extra", default="", help="extra CLI flags for every run")
    ap.add_argument("--tag", default="", help="suffix for the run folders and the table's method column")
    ap.add_argument("--out", default="runs/bench-vision")
    ap.add_argument("--rerun", action="store_true")
    args = ap.parse_args()

    key = "retrieval_top1" if args.eval == "retrieval" else "top1"
    rows = []
    for scheme in args.schemes.split(","):
        for method in args.methods.split(","):
            r = run_one(args, method, scheme)
            if r is not None:
                rows.append((scheme, method + args.tag, r))
    print(f"\nModel {rows[0][2]['model'] if rows else '?'}; calibration {args.nsamples} images, {args.epochs} "
          f"epochs; {args.eval} on the first {args.eval_limit} images; "
          f"{platform.processor() or platform.machine()}, device {args.device}\n")
    print(f"| scheme | method | FP {key} % | {key} % | feature cosine | calib s | peak RSS GB |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for scheme, method, r in rows:
        print(f"| {scheme} | {method} | {100 * r['fp_' + key]:.1f} | {100 * r[key]:.1f} | "
              f"{r['feature_cosine']:.4f} | {r['calib_time_s']:.0f} | {r['peak_rss_gb']:.2f} |")


if __name__ == "__main__":
    main()
