"""Scaling past RAM and past one process (issue 15): peak RSS against depth, streamed == in-RAM, 1 vs N
processes, streams offloaded vs in memory.

Usage::

    python bench/bench_scale.py --workdir /tmp/lrquant-scale [--layers 8,32,128] [--methods rtn,omniquant]
        [--parts depth,match,procs,export,streams] [--keep]

Builds one stack of random Llama-shaped blocks on disk (hidden 1536, MLP 4096, 12 query / 4 KV heads,
the SmolLM2 tokenizer's 49,152-token vocabulary, fp32, one safetensors shard per block: 101 MB a block)
as deep as the deepest requested model; each model is a folder whose index points at hard links to its
first shards, so every depth has the same width and the same first blocks. Every quantization is a
``lrquant quantize`` subprocess (``--eval none``; peak RSS = that process's ``VmHWM`` from its
``results.json``) on 4 calibration samples of 64 tokens (``--nsamples/--seqlen``); the learned method
is ``omniquant`` with ``train.iters=2``. Prints:

* ``depth``: per method and depth, the model's size on disk, wall time and peak RSS of the run with
  ``--stream-blocks`` (and the ratio of the largest to the smallest peak RSS: flat is <= 1.15);
* ``match``: the streamed and the in-RAM run of the shallowest model, compared tensor by tensor (max abs
  difference of every tensor of ``model/``), and the in-RAM run's peak RSS;
* ``procs``: wall time of the learned method on the shallowest model (streamed) with 1 and 2 torchrun
  processes (gloo; on a GPU machine pass ``--device cuda`` and ``--procs`` = the GPU count), and whether
  the two ``model/`` folders agree;
* ``export``: per depth, the RTN run with ``--stream-blocks --format compressed-tensors`` (the export
  written block by block beside ``model/``): wall time, peak RSS and the export's size;
* ``streams``: peak RSS of an RTN run of the shallowest model with ``--stream-samples`` x
  ``--stream-seqlen`` calibration tokens, streams in RAM vs memory-mapped (``--stream-budget-gb 0``)
  vs bfloat16 in RAM.

Everything it creates lives under ``--workdir`` and is deleted at the end unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

HIDDEN, INTER, HEADS, KV_HEADS = 1536, 4096, 12, 4
WALLS: dict[Path, float] = {}  # run folder -> wall seconds of the run this invocation made there


def build_models(root: Path, depths: list[int], vocab_from: str) -> dict[int, Path]:
    """The deepest model written block by block (never in memory as a whole), the others hard-linked."""
    from transformers import AutoTokenizer, LlamaConfig

    from lrquant.models import resolve_model_path

    tok = AutoTokenizer.from_pretrained(resolve_model_path(vocab_from)[0])
    # one stack of random blocks, deep enough for every requested depth (reused by later invocations)
    made = sorted(int(d.name.split("-")[1]) for d in root.glob("base-*") if (d / "done").is_file())
    deepest = next((n for n in made if n >= max(depths)), max(depths))
    base = root / f"base-{deepest}"
    head_dim = HIDDEN // HEADS

    def config(layers: int) -> LlamaConfig:
        return LlamaConfig(hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=layers,
                           num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, vocab_size=len(tok),
                           max_position_embeddings=2048, tie_word_embeddings=False)

    files = {i: f"block-{i:05d}.safetensors" for i in range(deepest)}
    if not (base / "done").is_file():
        base.mkdir(parents=True, exist_ok=True)
        g = torch.Generator().manual_seed(0)

        def rand(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, generator=g) * 0.02

        for i in range(deepest):
            p = f"model.layers.{i}."
            kv = KV_HEADS * head_dim
            shapes = {"self_attn.q_proj": (HIDDEN, HIDDEN), "self_attn.k_proj": (kv, HIDDEN),
                      "self_attn.v_proj": (kv, HIDDEN), "self_attn.o_proj": (HIDDEN, HIDDEN),
                      "mlp.gate_proj": (INTER, HIDDEN), "mlp.up_proj": (INTER, HIDDEN),
                      "mlp.down_proj": (HIDDEN, INTER)}
            tensors = {f"{p}{name}.weight": rand(*shape) for name, shape in shapes.items()}
            tensors.update({p + "input_layernorm.weight": torch.ones(HIDDEN),
                            p + "post_attention_layernorm.weight": torch.ones(HIDDEN)})
            save_file(tensors, str(base / files[i]), metadata={"format": "pt"})
        save_file({"model.embed_tokens.weight": rand(len(tok), HIDDEN), "model.norm.weight": torch.ones(HIDDEN)},
                  str(base / "rest-embed.safetensors"), metadata={"format": "pt"})
        save_file({"lm_head.weight": rand(len(tok), HIDDEN)}, str(base / "rest-head.safetensors"),
                  metadata={"format": "pt"})
        (base / "done").write_text("")
    out = {}
    for layers in depths:
        folder = root / f"llama-{layers}"
        folder.mkdir(exist_ok=True)
        weight_map = {}
        for name in [files[i] for i in range(layers)] + ["rest-embed.safetensors", "rest-head.safetensors"]:
            if not (folder / name).exists():
                os.link(base / name, folder / name)
            with safe_open(str(folder / name), framework="pt") as fh:
                weight_map.update(dict.fromkeys(fh.keys(), name))
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        config(layers).save_pretrained(folder)
        tok.save_pretrained(folder)
        out[layers] = folder
    return out


def disk_gb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 1e9


def quantize(model: Path, out: Path, method: str, args: argparse.Namespace, *extra: str, procs: int = 1,
             nsamples: int | None = None, seqlen: int | None = None) -> tuple[dict, float]:
    """One ``lrquant quantize`` subprocess; returns (results.json, wall seconds)."""
    launcher = [sys.executable, "-m", "lrquant"] if procs == 1 else [
        str(Path(sys.executable).with_name("torchrun")), "--nproc-per-node", str(procs), "-m", "lrquant"]
    cmd = [*launcher, "quantize", "--model", str(model), "--method", method, "--output", str(out), "--overwrite",
           "--nsamples", str(nsamples or args.nsamples), "--seqlen", str(seqlen or args.seqlen), "--eval", "none",
           "--quiet", "--device", args.device, "--batch-size", str(args.batch_size)]
    if method != "rtn":
        cmd += ["--option", f"train.iters={args.iters}"]
    cmd += list(extra)
    t0 = time.time()
    done = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.time() - t0
    if done.returncode != 0:
        raise SystemExit(f"failed ({done.returncode}): {' '.join(cmd)}\n{done.stderr[-3000:]}")
    WALLS[out] = wall
    return json.loads((out / "results.json").read_text()), wall


def compare(a: Path, b: Path) -> tuple[int, float]:
    """(tensors compared, max abs difference) between two model folders, one tensor at a time."""
    def index(folder: Path) -> dict[str, str]:
        f = folder / "model.safetensors.index.json"
        if f.is_file():
            return json.loads(f.read_text())["weight_map"]
        with safe_open(str(folder / "model.safetensors"), framework="pt") as fh:
            return dict.fromkeys(fh.keys(), "model.safetensors")

    ia, ib = index(a), index(b)
    if ia.keys() != ib.keys():
        raise SystemExit(f"different tensor names: {sorted(set(ia) ^ set(ib))[:5]}")
    worst = 0.0
    for k in ia:
        with safe_open(str(a / ia[k]), framework="pt") as fa, safe_open(str(b / ib[k]), framework="pt") as fb:
            worst = max(worst, float((fa.get_tensor(k).double() - fb.get_tensor(k).double()).abs().max()))
    return len(ia), worst


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--layers", default="8,32,128")
    p.add_argument("--methods", default="rtn,omniquant")
    p.add_argument("--parts", default="depth,match,procs,streams")
    p.add_argument("--nsamples", type=int, default=4)
    p.add_argument("--seqlen", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--iters", type=int, default=2)
    p.add_argument("--procs", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--stream-samples", type=int, default=64)
    p.add_argument("--stream-seqlen", type=int, default=512)
    p.add_argument("--keep", action="store_true")
    args = p.parse_args()
    root = Path(args.workdir)
    depths = sorted(int(x) for x in args.layers.split(","))
    methods = args.methods.split(",")
    parts = args.parts.split(",")
    learned = next((m for m in methods if m != "rtn"), "omniquant")
    t0 = time.time()
    models = build_models(root / "models", depths, "default")
    print(f"models built in {time.time() - t0:.0f}s: " + ", ".join(f"{d} layers {disk_gb(models[d]):.2f} GB"
                                                                 for d in depths), flush=True)
    runs = root / "runs"
    small = models[depths[0]]
    try:
        if "depth" in parts:
            print("\n| method | layers | fp32 on disk (GB) | wall (s) | peak RSS (GB) |\n|---|---|---|---|---|")
            for method in methods:
                peaks = []
                for d in depths:
                    res, wall = quantize(models[d], runs / f"{method}-{d}", method, args, "--stream-blocks")
                    peaks.append(res["peak_rss_gb"])
                    print(f"| {method} | {d} | {disk_gb(models[d]):.2f} | {wall:.0f} | {res['peak_rss_gb']:.3f} |",
                          flush=True)
                    if d != depths[0]:
                        shutil.rmtree(runs / f"{method}-{d}")
                print(f"| {method} | max/min peak RSS | | | {max(peaks) / min(peaks):.3f} |", flush=True)
        if "match" in parts:
            print("\n| method | streamed vs in-RAM (layers) | tensors | max abs diff | in-RAM peak RSS (GB) |"
                  "\n|---|---|---|---|---|")
            for method in methods:
                streamed = runs / f"{method}-{depths[0]}"
                if not (streamed / "results.json").is_file():
                    quantize(small, streamed, method, args, "--stream-blocks")
                res, _ = quantize(small, runs / f"{method}-ram", method, args)
                n, diff = compare(streamed / "model", runs / f"{method}-ram" / "model")
                print(f"| {method} | {depths[0]} | {n} | {diff:.3g} | {res['peak_rss_gb']:.3f} |", flush=True)
                shutil.rmtree(runs / f"{method}-ram")
        if "procs" in parts:
            print(f"\n| processes ({args.device}) | method | layers | wall (s) | calibration (s) | peak RSS rank 0 "
                  "(GB) | model/ vs 1 process (max abs diff) |\n|---|---|---|---|---|---|---|")
            one_run = runs / f"{learned}-{depths[0]}"  # the depth part's streamed run is the 1-process run
            for procs in (1, args.procs):
                out = one_run if procs == 1 else runs / f"procs-{procs}"
                if out in WALLS:
                    res, wall = json.loads((out / "results.json").read_text()), WALLS[out]
                else:
                    res, wall = quantize(small, out, learned, args, "--stream-blocks", procs=procs)
                one, this = one_run / "model", out / "model"
                diff = "-" if procs == 1 else f"{compare(one, this)[1]:.3g}"
                print(f"| {procs} | {learned} | {depths[0]} | {wall:.0f} | {res['calib_time_s']:.1f} | "
                      f"{res['peak_rss_gb']:.3f} | {diff} |", flush=True)
        if "export" in parts:
            print("\n| RTN + compressed-tensors export | layers | fp32 on disk (GB) | wall (s) | peak RSS (GB) | "
                  "compressed/ (GB) |\n|---|---|---|---|---|---|")
            for d in depths:
                out = runs / f"export-{d}"
                res, wall = quantize(models[d], out, "rtn", args, "--stream-blocks", "--format", "compressed-tensors")
                print(f"| | {d} | {disk_gb(models[d]):.2f} | {wall:.0f} | {res['peak_rss_gb']:.3f} | "
                      f"{disk_gb(out / 'compressed'):.2f} |", flush=True)
                shutil.rmtree(out)
        if "streams" in parts:
            n, L = args.stream_samples, args.stream_seqlen
            gb = n * L * HIDDEN * 4 / 1e9
            print(f"\n| streams ({n} x {L} tokens, one fp32 stream {gb:.2f} GB) | wall (s) | peak RSS (GB) | "
                  "streams in RAM at peak (GB) | mapped files |\n|---|---|---|---|---|")
            settings = (("in RAM, fp32", ()), ("memory-mapped (--stream-budget-gb 0)", ("--stream-budget-gb", "0")),
                        ("in RAM, bfloat16", ("--stream-dtype", "bfloat16")))
            for label, extra in settings:
                res, wall = quantize(small, runs / "streams", "rtn", args, "--stream-blocks", *extra,
                                     nsamples=n, seqlen=L)
                s = res["streams"]
                print(f"| {label} | {wall:.0f} | {res['peak_rss_gb']:.3f} | {s['peak_in_ram_gb']:.3f} | "
                      f"{s['mapped_files']} |", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
