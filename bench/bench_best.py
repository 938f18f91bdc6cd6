"""lrquant's recipes on the peers' protocol, one run at a time, as a Markdown table beside the peers.

The protocol of issue 12 (and of ``bench/peers``): SmolLM2-135M, calibration 32 x 512 tokens of WikiText-2
(``--calib wikitext2 --nsamples 32 --seqlen 512 --seed 0``; the shared data has no train split, so
wiki.valid), WikiText-2 test PPL on the first 40 windows of 2048, KV cache in 16 bits. Each row is
``LABEL=RECIPE[+KEY=VALUE...]`` (a built-in recipe name or a file, with ``--option`` overrides), e.g.

    python bench/bench_best.py --data-dir ../shared/data --peers bench/peers/results/peers-smollm2.jsonl \\
        --rows "fast W3=fast-w3a16g64" "best W3=best-w3a16g64" "best W3 - gptq=best-w3a16g64+rounding.kind=rtn"

Runs land in ``--out/<label>``; a finished run is reused unless ``--rerun``. Columns: PPL, calibration wall
seconds, calibration CPU seconds (all threads; less sensitive to a loaded machine), peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path


def run_row(args: argparse.Namespace, label: str, spec: str) -> dict | None:
    recipe, *overrides = spec.split("+")
    out = Path(args.out) / re.sub(r"[^A-Za-z0-9_.-]+", "_", label)
    if (out / "results.json").is_file() and not args.rerun:
        return json.loads((out / "results.json").read_text())
    cmd = [sys.executable, "-m", "lrquant", "quantize", "--model", args.model, "--recipe", recipe,
           "--calib", "wikitext2", "--nsamples", "32", "--seqlen", "512", "--seed", "0", "--kv-bits", "16",
           "--eval", "wikitext2", "--eval-windows", str(args.eval_windows), "--output", str(out), "--overwrite",
           "--no-save", "--quiet"]
    for item in overrides:
        cmd += ["--option", item]
    if args.data_dir:
        cmd += ["--data-dir", args.data_dir]
    print("$", " ".join(cmd), flush=True)
    if subprocess.run(cmd, env=os.environ.copy()).returncode != 0:
        print(f"run failed: {label}", flush=True)
        return None
    return json.loads((out / "results.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", nargs="+", required=True, help="LABEL=RECIPE[+KEY=VALUE...]")
    ap.add_argument("--model", default="default")
    ap.add_argument("--eval-windows", type=int, default=40)
    ap.add_argument("--data-dir", default=os.environ.get("LRQUANT_DATA_DIR"))
    ap.add_argument("--peers", help="run_peers.py JSONL to print beside")
    ap.add_argument("--out", default="runs/bench-best")
    ap.add_argument("--rerun", action="store_true")
    args = ap.parse_args()
    rows = []
    for item in args.rows:
        label, _, spec = item.partition("=")
        res = run_row(args, label, spec)
        if res is not None:
            rows.append((label, spec, res))
    print("\n| row | setting | PPL | calib s | calib CPU s | peak RSS GB |\n|---|---|---:|---:|---:|---:|")
    if args.peers and Path(args.peers).is_file():
        for line in Path(args.peers).read_text().splitlines():
            p = json.loads(line)
            print(f"| {p['peer']} | {p['setting']} | {p['ppl']:.2f} | {p.get('calib_time_s', 0):.0f} | "
                  f"{p.get('calib_cpu_s', 0):.0f} | {p.get('peak_rss_gb', 0):.2f} |")
    for label, spec, res in rows:
        ppl = next(iter(res.get("ppl", {}).values()), float("nan"))
        print(f"| {label} (`{spec}`) | {res['scheme_name']} | {ppl:.2f} | {res['calib_time_s']:.0f} | "
              f"{res.get('calib_cpu_s', 0):.0f} | {res['peak_rss_gb']:.2f} |")


if __name__ == "__main__":
    main()
