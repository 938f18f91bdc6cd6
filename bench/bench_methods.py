"""WikiText-2 perplexity of every method x scheme on a model, one subprocess per run (so peak memory is
per run), printed as a Markdown table from each run's results.json.

CPU-sized defaults (state them when you report):
    python bench/bench_methods.py --data-dir ../shared/data
Paper settings on a GPU:
    python bench/bench_methods.py --paper --device cuda --eval-windows 0

Each run lands in <out>/<method>-<scheme>/ (a finished run is reused unless --rerun).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

SCHEMES = {  # name -> CLI flags
    "W4A16g64": ["--wbits", "4", "--abits", "16", "--group-size", "64"],
    "W3A16g64": ["--wbits", "3", "--abits", "16", "--group-size", "64"],
    "W2A16g64": ["--wbits", "2", "--abits", "16", "--group-size", "64"],
    "W6A6": ["--wbits", "6", "--abits", "6", "--group-size", "0"],
    "W4A4": ["--wbits", "4", "--abits", "4", "--group-size", "0"],
}
METHODS = ["rtn", "smoothquant", "omniquant", "affinequant"]


def run_one(args: argparse.Namespace, method: str, scheme: str, extra: list[str], tag: str) -> dict | None:
    out = Path(args.out) / f"{method}{tag}-{scheme}"
    if (out / "results.json").is_file() and not args.rerun:
        return json.loads((out / "results.json").read_text())
    cmd = [sys.executable, "-m", "lrquant.cli", "quantize", "--method", method, *SCHEMES[scheme],
           "--calib", args.calib, "--eval", "wikitext2", "--eval-windows", str(args.eval_windows),
           "--device", args.device, "--output", str(out), "--overwrite", "--no-save", "--quiet", *extra]
    if args.paper:
        cmd += ["--nsamples", "128", "--seqlen", "2048", "--epochs", "20" if scheme != "W2A16g64" else "40"]
    else:
        cmd += ["--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--epochs", str(args.epochs)]
    if args.data_dir:
        cmd += ["--data-dir", args.data_dir]
    print("$", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, env=os.environ.copy())
    if proc.returncode != 0:
        print(f"run failed: {method} {scheme} (exit {proc.returncode})", flush=True)
        return None
    return json.loads((out / "results.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--schemes", default=",".join(SCHEMES))
    ap.add_argument("--calib", default="wikitext2")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--data-dir", default=os.environ.get("LRQUANT_DATA_DIR"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--paper", action="store_true", help="128 x 2048 samples, 20 epochs (40 at W2)")
    ap.add_argument("--extra", default="", help="extra CLI flags for every run, e.g. '--rotate hadamard'")
    ap.add_argument("--tag", default="", help="suffix for the run folders and the table's method column")
    ap.add_argument("--out", default="runs/bench")
    ap.add_argument("--rerun", action="store_true")
    args = ap.parse_args()

    rows = []
    for scheme in args.schemes.split(","):
        for method in args.methods.split(","):
            r = run_one(args, method, scheme, args.extra.split(), args.tag)
            if r is not None:
                rows.append((scheme, method + args.tag, r))
    settings = ("paper (128 x 2048, 20 epochs)" if args.paper else
                f"{args.nsamples} x {args.seqlen}-token {args.calib} samples, {args.epochs} epochs")
    print(f"\nModel {rows[0][2]['model'] if rows else '?'}; calibration {settings}; WikiText-2 test PPL on the "
          f"first {args.eval_windows or 'all'} windows of 2048 tokens; {platform.processor() or platform.machine()}, "
          f"device {args.device}\n")
    print("| scheme | method | FP PPL | PPL | training: block loss change | calib s | peak RSS GB |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for scheme, method, r in rows:
        print(f"| {scheme} | {method} | {r['fp_ppl']['wikitext2']:.2f} | {r['ppl']['wikitext2']:.2f} | "
              f"{loss_change(r)} | {r['calib_time_s']:.0f} | {r['peak_rss_gb']:.2f} |")


def loss_change(results: dict) -> str:
    """Mean over blocks of final / initial training loss - 1 (``-`` for methods that do not train)."""
    pairs = [(b["init_loss"], b["final_loss"]) for b in results.get("blocks", [])
             if b.get("init_loss") and b.get("final_loss") is not None]
    if not pairs:
        return "-"
    return f"{100 * sum(f / i - 1 for i, f in pairs) / len(pairs):+.1f}%"


if __name__ == "__main__":
    main()
