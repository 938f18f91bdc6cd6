"""lrquant's recipes and the peer tools in ONE bench run, on the same calibration tokens and windows.

The protocol of issue 12 (and of ``bench/peers``): calibration 32 x 512 tokens of WikiText-2 (the shared data
has no train split, so wiki.valid; ``--calib wikitext2 --nsamples 32 --seqlen 512 --seed 0``), WikiText-2
test PPL on the first 40 windows of 2048, asymmetric weights, KV cache in 16 bits, 2 CPU threads per row.
Rows run one after another in the order given, so the peers and lrquant share the machine's state; mix them
(e.g. a peer's W3 row next to ours) so that a change of load during the run does not favour one side.

    python bench/bench_vs_peers.py --data-dir ../shared/data --out runs/vs-peers-smollm2 --rows \\
        gptq:W3A16g64 "fast W3=fast-w3a16g64" autoround:W3A16g64 "best W3=best-w3a16g64+train.iters=8"

A row is ``PEER:SETTING`` (run by ``bench/peers/run_peers.py`` in the peers' venv, see bench/peers/README.md)
or ``LABEL=RECIPE[+KEY=VALUE...]`` (``lrquant quantize --recipe RECIPE --option KEY=VALUE ...``; a key that
starts with ``--`` is passed as that flag instead, e.g. ``best KV4=best-w4a4+--kv-bits=4`` or
``W6A6=best-w4a4+--wbits=6+--abits=6``, after the protocol's ``--kv-bits 16``, so it wins). Before any
row, the calibration and evaluation tokens lrquant's data code draws for ``--model`` are checked against the
protocol file the peers read (``--protocol``, written by ``bench/peers/dump_protocol.py`` when missing): same
sha256 or no run. Every finished row is appended to ``<out>/rows.jsonl`` (a rerun of the command skips rows
already there unless ``--rerun``), and the table is printed from that file: PPL, calibration wall and CPU
seconds, the wall time as a multiple of the same setting's GPTQ row, peak RSS, and the 1-minute load
average at the row's start and end (other work on the machine inflates the seconds, never the PPL).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH / "peers"))
from table import PEER_LABELS  # noqa: E402  (bench/peers/table.py: plain Python, the peers' display names)

PEERS_PYTHON = BENCH / "peers" / ".venv" / "bin" / "python"
PEER_RE = re.compile(r"^([a-z-]+):(W\d+A\d+(?:g\d+)?)$")


def slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label)


def check_protocol(args: argparse.Namespace) -> None:
    """Dump the protocol when missing; require lrquant's own draw to hash to the file's sha256s."""
    import torch
    from safetensors import safe_open
    from transformers import AutoTokenizer

    from lrquant.data.text import calibration_batches, eval_tokens
    from lrquant.models import resolve_model_path

    proto = Path(args.protocol)
    if not proto.is_file():
        cmd = [sys.executable, str(BENCH / "peers" / "dump_protocol.py"), "--model", args.model,
               "--output", str(proto), "--windows", str(args.eval_windows)]
        if args.data_dir:
            cmd += ["--data-dir", args.data_dir]
        subprocess.run(cmd, check=True)
    with safe_open(str(proto), "pt") as f:
        theirs = {"calib": f.get_tensor("calib"), "eval": f.get_tensor("eval")[: args.eval_windows]}
    if theirs["eval"].shape[0] < args.eval_windows:
        raise SystemExit(f"{proto} holds {theirs['eval'].shape[0]} windows, fewer than --eval-windows")
    model_path, _ = resolve_model_path(args.model)
    tok = AutoTokenizer.from_pretrained(model_path)
    calib = calibration_batches(tok, "wikitext2", 32, 512, seed=0, data_dir=args.data_dir)  # [32, 512]
    windows = eval_tokens(tok, "wikitext2", data_dir=args.data_dir)[0, : args.eval_windows * 2048]
    ours = {"calib": calib, "eval": windows.reshape(args.eval_windows, 2048)}
    for key, t in ours.items():
        got, want = (hashlib.sha256(x.contiguous().to(torch.int64).numpy().tobytes()).hexdigest()
                     for x in (t, theirs[key]))
        if got != want:
            raise SystemExit(f"{key} tokens differ from {proto} ({got[:12]} != {want[:12]}): re-dump it")
        print(f"{key}: sha256 {got[:16]} in lrquant's draw for {args.model} and in {proto}", flush=True)


def run_peer(args: argparse.Namespace, row: str, tmp: Path) -> dict | None:
    cmd = [str(PEERS_PYTHON), str(BENCH / "peers" / "run_peers.py"), "--protocol", args.protocol, "--rows", row,
           "--output", str(tmp), "--windows", str(args.eval_windows), "--threads", str(args.threads)]
    print("$", " ".join(cmd), flush=True)
    tmp.unlink(missing_ok=True)
    if subprocess.run(cmd).returncode != 0 or not tmp.is_file():
        return None
    line = json.loads(tmp.read_text().splitlines()[-1])
    tmp.unlink()
    peer, setting = PEER_RE.match(row).groups()
    return {"row": row, "kind": "peer", "tool": peer, "setting": setting, "ppl": line["ppl"],
            "calib_time_s": line.get("calib_time_s"), "calib_cpu_s": line.get("calib_cpu_s"),
            "peak_rss_gb": line.get("peak_rss_gb"), "detail": line}


def run_ours(args: argparse.Namespace, label: str, spec: str) -> dict | None:
    recipe, *overrides = spec.split("+")
    out = Path(args.out) / slug(label)
    cmd = [sys.executable, "-m", "lrquant", "quantize", "--model", args.model, "--recipe", recipe,
           "--calib", "wikitext2", "--nsamples", "32", "--seqlen", "512", "--seed", "0", "--kv-bits", "16",
           "--eval", "wikitext2", "--eval-windows", str(args.eval_windows), "--output", str(out), "--overwrite",
           "--no-save", "--quiet"]
    for item in overrides:
        flag, _, value = item.partition("=")
        cmd += [flag, value] if flag.startswith("--") else ["--option", item]
    if args.data_dir:
        cmd += ["--data-dir", args.data_dir]
    print("$", " ".join(cmd), flush=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    if subprocess.run(cmd, env=env).returncode != 0:
        return None
    res = json.loads((out / "results.json").read_text())
    return {"row": f"{label}={spec}", "kind": "lrquant", "tool": label, "spec": spec,
            "setting": res["scheme_name"], "ppl": next(iter(res.get("ppl", {}).values()), float("nan")),
            "calib_time_s": res["calib_time_s"], "calib_cpu_s": res.get("calib_cpu_s"),
            "peak_rss_gb": res["peak_rss_gb"], "recipe": res.get("recipe")}


def table(rows: list[dict]) -> str:
    """Markdown: one line per row grouped by setting, with the wall time relative to that setting's GPTQ row
    (SmoothQuant+GPTQ, else SpinQuant+GPTQ, where the setting has no plain GPTQ row)."""
    gptq: dict[str, float] = {}
    for tool in ("spinquant-gptq", "sq-gptq", "gptq"):  # the later tool wins where several ran
        gptq.update({r["setting"]: r["calib_time_s"] for r in rows if r["kind"] == "peer" and r["tool"] == tool})
    lines = ["| setting | row | PPL | calib s | x GPTQ time | calib CPU s | peak RSS GB | load 1m start/end |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    order = {s: i for i, s in enumerate(dict.fromkeys(r["setting"] for r in rows))}
    for r in sorted(rows, key=lambda r: (order[r["setting"]], r["ppl"])):
        name = PEER_LABELS.get(r["tool"], r["tool"]) if r["kind"] == "peer" else f"lrquant `{r['spec']}`"
        base = gptq.get(r["setting"])
        ratio = f"{r['calib_time_s'] / base:.2f}" if base and r.get("calib_time_s") else "–"
        secs = f"{r['calib_time_s']:.0f}" if r.get("calib_time_s") else "–"
        cpu = f"{r['calib_cpu_s']:.0f}" if r.get("calib_cpu_s") else "–"
        load = "/".join(f"{r[k]:.1f}" if k in r else "–" for k in ("load_1m", "load_1m_end"))
        lines.append(f"| {r['setting']} | {name} | {r['ppl']:.2f} | {secs} | {ratio} | {cpu} | "
                     f"{r.get('peak_rss_gb') or 0:.2f} | {load} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", nargs="*", default=[], help="PEER:SETTING or LABEL=RECIPE[+KEY=VALUE...]")
    ap.add_argument("--model", default="default", help="lrquant --model (default: SmolLM2-135M)")
    ap.add_argument("--protocol", default=None, help="peers' protocol file (default: <out>/protocol.safetensors)")
    ap.add_argument("--eval-windows", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--data-dir", default=os.environ.get("LRQUANT_DATA_DIR"))
    ap.add_argument("--out", default="runs/vs-peers")
    ap.add_argument("--rerun", action="store_true", help="run rows already in <out>/rows.jsonl again")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    args.protocol = args.protocol or str(out / "protocol.safetensors")
    bad = [r for r in args.rows if "=" not in r and not PEER_RE.match(r)]
    if bad:
        raise SystemExit(f"bad row {bad[0]!r}: expected PEER:SETTING or LABEL=RECIPE[+KEY=VALUE...]")
    if any("=" not in r for r in args.rows) and not PEERS_PYTHON.is_file():
        raise SystemExit(f"peer rows need the peers' venv ({PEERS_PYTHON}): bash bench/peers/setup.sh")
    ledger = out / "rows.jsonl"
    done = {json.loads(x)["row"] for x in ledger.read_text().splitlines()} if ledger.is_file() else set()
    if args.rows:
        check_protocol(args)
    for row in args.rows:
        if row in done and not args.rerun:
            print(f"(done) {row}", flush=True)
            continue
        load, started = os.getloadavg()[0], time.time()
        if "=" in row:
            label, _, spec = row.partition("=")
            res = run_ours(args, label, spec)
        else:
            res = run_peer(args, row, out / "peer-row.jsonl")
        if res is None:
            print(f"row failed: {row}", flush=True)
            continue
        res.update(load_1m=load, load_1m_end=os.getloadavg()[0],
                   started=time.strftime("%H:%M:%S", time.localtime(started)),
                   row_wall_s=round(time.time() - started, 1), threads=args.threads)
        with ledger.open("a") as f:
            f.write(json.dumps(res) + "\n")
        print(f"{row}: PPL {res['ppl']:.3f}, calib {res['calib_time_s']:.0f} s", flush=True)
    rows = [json.loads(x) for x in ledger.read_text().splitlines()] if ledger.is_file() else []
    print("\n" + table(rows))


if __name__ == "__main__":
    main()
