"""Dump lrquant's exact calibration tokens and evaluation windows for the peer tools.

Run with lrquant's venv (it uses lrquant's own data code, so the peers see byte-identical inputs):

    .venv/bin/python bench/peers/dump_protocol.py --data-dir ../shared/data \
        --output bench/peers/results/protocol-smollm2.safetensors

Writes one safetensors file holding

* ``calib``  int64 [nsamples, seqlen]: what ``lrquant quantize --calib wikitext2 --nsamples 32 --seqlen 512
  --seed 0`` calibrates on (``lrquant.data.text.calibration_batches``, as ``api.calibration_data`` calls it);
* ``eval``   int64 [windows, 2048]: the first ``windows`` non-overlapping windows of the WikiText-2 test split
  (``eval_tokens``: joined with "\\n\\n", tokenized once), exactly the windows ``eval/perplexity.py`` scores;

and in its metadata the model folder (the fp32 transformers folder lrquant caches for a GGUF), the protocol
parameters and the sha256 of each tensor (also printed). ``run_peers.py`` checks these before using them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys

import torch


def tensor_sha256(t: torch.Tensor) -> str:
    """sha256 of the contiguous little-endian int64 bytes of ``t`` (same function in run_peers.py)."""
    return hashlib.sha256(t.contiguous().to(torch.int64).numpy().tobytes()).hexdigest()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default", help="lrquant model name: default (SmolLM2-135M), .gguf, folder")
    p.add_argument("--data-dir", default=None, help="local corpora (../shared/data); else $LRQUANT_DATA_DIR")
    p.add_argument("--calib", default="wikitext2")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval", default="wikitext2")
    p.add_argument("--eval-seqlen", type=int, default=2048)
    p.add_argument("--windows", type=int, default=40, help="first N evaluation windows (0 = all)")
    p.add_argument("--output", required=True)
    a = p.parse_args(argv)

    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    from lrquant.data.text import calibration_batches, eval_tokens
    from lrquant.models import resolve_model_path

    model_path, model_name = resolve_model_path(a.model)  # converts and caches a GGUF once
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    calib = calibration_batches(tokenizer, a.calib, a.nsamples, a.seqlen, seed=a.seed, data_dir=a.data_dir)
    tokens = eval_tokens(tokenizer, a.eval, data_dir=a.data_dir)  # [1, T]
    total = tokens.shape[1] // a.eval_seqlen
    n = total if a.windows == 0 else min(a.windows, total)
    windows = tokens[0, : n * a.eval_seqlen].reshape(n, a.eval_seqlen).clone()

    tensors = {"calib": calib.to(torch.int64).contiguous(), "eval": windows.to(torch.int64).contiguous()}
    sha = {k: tensor_sha256(v) for k, v in tensors.items()}
    meta = {
        "model_path": model_path, "model_name": model_name,
        "calib": a.calib, "nsamples": str(a.nsamples), "seqlen": str(a.seqlen), "seed": str(a.seed),
        "eval": a.eval, "eval_seqlen": str(a.eval_seqlen), "windows": str(n), "total_windows": str(total),
        "eval_tokens_total": str(tokens.shape[1]), "sha256": json.dumps(sha),
    }
    save_file(tensors, a.output, metadata=meta)
    print(f"model folder: {model_path}  ({model_name})")
    for k, v in tensors.items():
        print(f"{k}: shape {tuple(v.shape)} sha256 {sha[k]}")
    print(f"eval: {n} of {total} windows of {a.eval_seqlen} tokens; wrote {a.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
