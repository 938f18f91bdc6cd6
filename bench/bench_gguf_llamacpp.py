"""Run lrquant's GGUF exports in llama.cpp itself and compare its perplexity with the in-memory model's.

    python bench/bench_gguf_llamacpp.py --llama-perplexity PATH/llama-perplexity --data-dir ../shared/data

llama.cpp is not a dependency: build its ``llama-perplexity`` tool yourself (no Python wheel of llama.cpp
installs offline here; ``llama-cpp-python`` ships its source, ``cmake --build build --target llama-perplexity``).
For SmolLM2-135M RTN W4A16 g32, asymmetric (Q4_1) and symmetric (Q4_0): quantize with lrquant, export GGUF,
run ``llama-perplexity -c CTX --chunks N -f wiki.test.raw``, and score the same chunks the same way in
Python (llama.cpp's protocol: each chunk of CTX tokens, only its second half scored) with the in-memory
fake-quant model and with the GGUF reloaded by transformers. Prints one Markdown table.
"""

from __future__ import annotations

import argparse
import math
import re
import subprocess
import tempfile
from pathlib import Path

import torch

from lrquant.config import QuantArgs, Scheme
from lrquant.export.gguf import export_gguf
from lrquant.methods.rtn import quantize_weights_rtn
from lrquant.models import load_model


def llamacpp_protocol_ppl(model: torch.nn.Module, tokens: torch.Tensor, ctx: int, chunks: int) -> float:
    """llama-perplexity's score: ``tokens: [T]``; per chunk of ``ctx`` tokens, NLL of the tokens in its
    second half given everything before them in the chunk; PPL = exp(mean NLL)."""
    nll, count = 0.0, 0
    with torch.no_grad():
        for c in range(chunks):
            ids = tokens[c * ctx:(c + 1) * ctx].unsqueeze(0)
            logp = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
            first = ctx // 2
            targets = ids[0, first + 1:]
            nll -= logp[first:-1].gather(1, targets.unsqueeze(1)).sum().item()
            count += targets.numel()
    return math.exp(nll / count)


def run_llamacpp(binary: str, gguf: Path, text_file: Path, ctx: int, chunks: int, threads: int) -> float:
    out = subprocess.run([binary, "-m", str(gguf), "-f", str(text_file), "-c", str(ctx), "--chunks", str(chunks),
                          "-t", str(threads), "-b", str(ctx)], capture_output=True, text=True, check=True)
    found = re.search(r"Final estimate: PPL = ([0-9.]+)", out.stdout + out.stderr)
    if found is None:
        raise RuntimeError(f"no final estimate in llama-perplexity output:\n{(out.stdout + out.stderr)[-2000:]}")
    return float(found.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llama-perplexity", required=True, help="path of llama.cpp's llama-perplexity binary")
    parser.add_argument("--data-dir", required=True, help="folder with wikitext-2-raw/wiki.test.raw")
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--chunks", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM

    text_file = Path(args.data_dir) / "wikitext-2-raw" / "wiki.test.raw"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for symmetric in (False, True):
            model, tokenizer, _ = load_model("default")
            tokens = torch.tensor(tokenizer(text_file.read_text())["input_ids"])
            scheme = Scheme(QuantArgs(4, symmetric, "group", 32))
            quantize_weights_rtn(model, scheme)
            path = export_gguf(model, scheme, Path(tmp) / f"smollm2-{'sym' if symmetric else 'asym'}.gguf",
                               tokenizer, dtype=torch.float16, tokenizer_pre="smollm")
            ppl_mem = llamacpp_protocol_ppl(model, tokens, args.ctx, args.chunks)
            reloaded = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=path.name, dtype=torch.float32).eval()
            ppl_hf = llamacpp_protocol_ppl(reloaded, tokens, args.ctx, args.chunks)
            ppl_cpp = run_llamacpp(args.llama_perplexity, path, text_file, args.ctx, args.chunks, args.threads)
            rows.append((f"W4A16g32 {'sym -> Q4_0' if symmetric else 'asym -> Q4_1'}", ppl_mem, ppl_hf, ppl_cpp,
                         path.stat().st_size / 2**20))
    print(f"SmolLM2-135M RTN, WikiText-2 test, llama-perplexity protocol: {args.chunks} chunks x {args.ctx}, "
          "second half of each chunk scored\n")
    print("| setting | lrquant in memory | GGUF via transformers | GGUF via llama.cpp | file MiB |")
    print("|---|---:|---:|---:|---:|")
    for name, mem, hf, cpp, size in rows:
        print(f"| {name} | {mem:.4f} | {hf:.4f} | {cpp:.4f} | {size:.1f} |")


if __name__ == "__main__":
    main()
