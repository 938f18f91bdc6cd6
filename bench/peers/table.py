"""Markdown table of peer rows (run_peers.py JSONL) beside lrquant run folders. Plain Python, no torch.

    python3 bench/peers/table.py --peers bench/peers/results/peers-smollm2.jsonl runs/omni-w4 runs/lrq-w3 \
        [runs/x=LABEL ...] [--dataset wikitext2]

Rows are tools/recipes, columns are settings (``W4A16g64``, ``W8A8``, ...), cells ``PPL (calibration
seconds)``. An lrquant run folder's row is ``lrquant <method>`` plus the recipe's distinguishing options
(``+hadamard``, ``e<epochs>``) unless a label is given as ``FOLDER=LABEL``. The FP row comes from the peers'
``fp`` line and from lrquant's ``fp_ppl``. When a tool/setting appears twice, the last one read wins.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

PEER_LABELS = {
    "fp": "FP",
    "rtn": "RTN (llm-compressor)",
    "gptq": "GPTQ (llm-compressor)",
    "awq": "AWQ (llm-compressor)",
    "sq-gptq": "SmoothQuant+GPTQ (llm-compressor)",
    "spinquant-gptq": "SpinQuant-had+GPTQ (llm-compressor)",
    "autoround": "auto-round",
}


def setting_key(name: str) -> tuple:
    """Sort settings: weight-only first, then by weight bits descending, activation bits descending."""
    m = re.match(r"W(\d+)A(\d+)", name or "")
    if not m:
        return (2, 0, 0, name)
    w, a = int(m.group(1)), int(m.group(2))
    return (0 if a >= 16 else 1, -w, -a, name)


def fmt(ppl: float | None, seconds: float | None) -> str:
    if ppl is None:
        return "–"
    p = "inf" if ppl == float("inf") else (f"{ppl:.2f}" if ppl < 1000 else f"{ppl:.1f}")
    return p if not seconds else f"{p} ({seconds:.0f} s)"


def lrquant_label(res: dict) -> str:
    recipe = res.get("recipe") or {}
    method = res.get("method") or recipe.get("method") or "?"
    parts = [f"lrquant/{method}"]
    options = recipe.get("options") or {}
    rotate = options.get("rotate")
    if rotate and rotate != "none":
        parts.append(f"+{rotate}")
    train = recipe.get("train") or {}
    if method not in ("rtn", "smoothquant") and train.get("epochs") is not None:
        parts.append(f"e{train['epochs']}")
    return " ".join(parts)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="*", help="lrquant run folders (results.json), optionally FOLDER=LABEL")
    p.add_argument("--peers", action="append", default=[], help="run_peers.py JSONL file (repeatable)")
    p.add_argument("--dataset", default="wikitext2", help="lrquant ppl key")
    a = p.parse_args(argv)

    cells: dict[str, dict[str, str]] = {}
    order: list[str] = []
    notes: list[str] = []

    def put(row: str, col: str, text: str) -> None:
        if row not in cells:
            cells[row] = {}
            order.append(row)
        cells[row][col] = text

    for path in a.peers:
        for line in Path(path).read_text().splitlines():
            if not line.strip():
                continue
            r = json.loads(line)
            peer = r["peer"]
            label = PEER_LABELS.get(peer, peer)
            if peer == "autoround" and r.get("iters"):
                label += f" iters={r['iters']}"
            if peer == "fp":
                put("FP", "FP", fmt(r["ppl"], None))
            else:
                put(label, r["setting"], fmt(r["ppl"], r.get("calib_time_s")))
            v = r.get("versions") or {}
            note = ", ".join(f"{k} {v[k]}" for k in ("llmcompressor", "compressed-tensors", "auto-round", "torch")
                             if k in v)
            if note and f"peers: {note}" not in notes:
                notes.append(f"peers: {note}")
            if r.get("windows"):
                w = f"peers evaluated on {r['windows']} windows"
                if w not in notes:
                    notes.append(w)

    for spec in a.runs:
        folder, _, label = spec.partition("=")
        res = json.loads((Path(folder) / "results.json").read_text())
        ppl = (res.get("ppl") or {}).get(a.dataset)
        fp = (res.get("fp_ppl") or {}).get(a.dataset)
        if fp is not None and "FP" not in cells.get("FP", {}):
            put("FP", "FP", fmt(fp, None))
        put(label or lrquant_label(res), res.get("scheme_name", "?"), fmt(ppl, res.get("calib_time_s")))
        windows = (res.get("eval") or {}).get("windows")
        if windows:
            w = f"{folder}: {windows} windows"
            notes.append(w)

    cols = sorted({c for row in cells.values() for c in row if c != "FP"}, key=setting_key)
    if "FP" in cells:
        cols = ["FP", *cols]
    print("| tool / recipe | " + " | ".join(cols) + " |")
    print("|---|" + "---|" * len(cols))
    for row in order:
        print(f"| {row} | " + " | ".join(cells[row].get(c, "") for c in cols) + " |")
    if notes:
        print()
        print(f"WikiText-2 PPL ({a.dataset}), cells `PPL (calibration seconds)`; " + "; ".join(notes) + ".")
    return 0


if __name__ == "__main__":
    sys.exit(main())
