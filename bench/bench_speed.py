"""Decode / prefill speed and weight memory of the integer runtime (lrquant.export.kernels) on CPU.

Usage: ``python bench/bench_speed.py [--models smollm2,llama7b] [--new-tokens 64] [--prefill 512]``

Prints the machine (CPU model, torch threads, torch version, measured memcpy bandwidth), a kernel table
(one 11008 x 4096 linear at 1 and 512 rows: which torch op is fastest here) and, per model, a table of

* decode tokens/s at batch 1: greedy, ``--new-tokens`` steps with a KV cache after a ``--prompt``-token
  prompt (the prompt's prefill is not timed);
* prefill tokens/s: one forward of ``--prefill`` tokens;
* weight memory (MB): parameters and buffers, tied tensors once;
* the decode bandwidth bound: ``memcpy bandwidth / bytes read per token`` (every weight once, except
  an untied input embedding, of which one row is read) and the measured fraction of it.

Formats: fp32; bf16; and RTN-quantized decoder linears run by the integer kernels with every other
weight in bf16: int8 weight-only (per channel), int4 weight-only g128 / g64, W8A8 (int8 GEMM, dynamic
per-token activations). ``llama7b`` is a Llama-7B-shaped stack of random weights (hidden 4096,
intermediate 11008, 32 heads) with ``--layers`` decoder layers and a 32000-token vocabulary.
"""

from __future__ import annotations

import argparse
import copy
import gc
import platform
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lrquant.config import Scheme
from lrquant.errors import ConfigError
from lrquant.export.kernels import convert_to_runtime, weight_bytes
from lrquant.methods.rtn import quantize_weights_rtn

FORMATS: dict[str, Scheme | None] = {
    "fp32": None,
    "bf16": None,
    "int8 weight-only": Scheme.from_bits(8, 16, w_symmetric=True),
    "int4 weight-only g128": Scheme.from_bits(4, 16, 128),
    "int4 weight-only g64": Scheme.from_bits(4, 16, 64),
    "W8A8 (int8 GEMM)": Scheme.from_bits(8, 8, w_symmetric=True, kv_bits=16),
}


# ---- machine -------------------------------------------------------------------------------------------
def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def timed(fn: Callable[[], object], repeat: int = 3, warmup: int = 1) -> float:
    """Best wall time in seconds of ``fn()`` over ``repeat`` runs (after ``warmup`` runs)."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def memcpy_bandwidth(mbytes: int = 512) -> float:
    """Bytes/s moved by a large tensor copy (read + write traffic, i.e. 2 x size / time)."""
    src = torch.empty(mbytes * 2**20, dtype=torch.uint8).fill_(1)
    dst = torch.empty_like(src)
    t = timed(lambda: dst.copy_(src), repeat=5)
    return 2 * src.numel() / t


# ---- kernels -------------------------------------------------------------------------------------------
def kernel_table(n: int = 11008, k: int = 4096) -> list[tuple[str, float, float]]:
    """ms of one ``[rows, k] x [n, k]^T`` product per implementation, at 1 and 512 rows."""
    torch.manual_seed(0)
    w = torch.randn(n, k) * 0.02
    codes4 = torch.randint(0, 16, (n, k), dtype=torch.int32)
    packed4 = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes4, 1)
    sz = torch.rand(k // 128, n, 2) * 1e-2
    q8 = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    s8 = torch.rand(n) * 1e-2
    wb = w.bfloat16()
    rows = []

    def row(name: str, fn: Callable[[torch.Tensor], object], dtype: torch.dtype) -> None:
        res = []
        for m in (1, 512):
            x = torch.randn(m, k).to(dtype)
            res.append(1e3 * timed(lambda x=x: fn(x), repeat=3 if m == 1 else 1))
        rows.append((name, *res))

    row("fp32 F.linear", lambda x: F.linear(x, w), torch.float32)
    row("bf16 F.linear", lambda x: F.linear(x, wb), torch.bfloat16)
    row("int8 dequant + bf16 F.linear", lambda x: F.linear(x, (q8 * s8[:, None]).bfloat16()), torch.bfloat16)
    row("int4 _weight_int4pack_mm_for_cpu bf16", lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(
        x, packed4, 128, sz.bfloat16()), torch.bfloat16)
    row("int8 _weight_int8pack_mm bf16", lambda x: torch.ops.aten._weight_int8pack_mm(x, q8, s8.bfloat16()),
        torch.bfloat16)
    row("int8 x int8 torch._int_mm", lambda x: torch._int_mm(x.to(torch.int8), q8.t()), torch.float32)
    # the float32 paths of the packed ops are reference loops: time one row only
    x1 = torch.randn(1, k)
    rows.append(("int4 _weight_int4pack_mm_for_cpu fp32", 1e3 * timed(
        lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x1, packed4, 128, sz), repeat=2), float("nan")))
    rows.append(("int8 _weight_int8pack_mm fp32", 1e3 * timed(
        lambda: torch.ops.aten._weight_int8pack_mm(x1, q8, s8), repeat=2), float("nan")))
    return rows


# ---- models --------------------------------------------------------------------------------------------
def smollm2() -> nn.Module:
    from lrquant.models import load_model

    return load_model("default")[0]


def llama7b_stack(layers: int) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers,
                      num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                      max_position_embeddings=2048, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def cast_parameters(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast every parameter (not the kernels' buffers) to ``dtype``; tied parameters stay tied."""
    for p in {id(p): p for p in model.parameters()}.values():
        p.data = p.data.to(dtype)


def build(base: nn.Module, fmt: str) -> nn.Module:
    """A copy of the float32 ``base`` model in format ``fmt``."""
    model = copy.deepcopy(base)
    scheme = FORMATS[fmt]
    if fmt == "bf16":
        model.to(torch.bfloat16)
    elif scheme is not None:
        quantize_weights_rtn(model, scheme)
        report = convert_to_runtime(model)
        kept = [n for n, v in report.items() if v.startswith("kept")]
        if kept:
            print(f"  note: {len(kept)} linears kept as fake-quant ({report[kept[0]]})")
        cast_parameters(model, torch.bfloat16)
    return model


def bytes_per_token(model: nn.Module) -> int:
    """Weight bytes one decode step reads: everything, except an untied input embedding (one row)."""
    total = weight_bytes(model)
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    return total if emb.data_ptr() == head.data_ptr() else total - emb.numel() * emb.element_size()


@torch.no_grad()
def decode_tps(model: nn.Module, vocab: int, prompt: int, new_tokens: int) -> float:
    """Greedy decode tokens/s at batch 1 with a KV cache (the prompt's prefill is not timed)."""
    from transformers import DynamicCache

    ids = torch.randint(0, vocab, (1, prompt), generator=torch.Generator().manual_seed(0))

    def run(steps: int) -> float:
        cache = DynamicCache()
        out = model(ids, past_key_values=cache, use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
        start = time.perf_counter()
        for _ in range(steps):
            out = model(nxt, past_key_values=cache, use_cache=True)
            nxt = out.logits[:, -1:].argmax(-1)
        return time.perf_counter() - start

    run(4)  # warm-up
    return new_tokens / run(new_tokens)


@torch.no_grad()
def prefill_tps(model: nn.Module, vocab: int, tokens: int) -> float:
    ids = torch.randint(0, vocab, (1, tokens), generator=torch.Generator().manual_seed(1))
    model(ids[:, :16], use_cache=False)  # warm-up on a short sequence
    return tokens / timed(lambda: model(ids, use_cache=False), repeat=1, warmup=0)


def bench_model(name: str, make: Callable[[], nn.Module], args, bandwidth: float) -> None:
    started = time.perf_counter()
    print(f"\n## {name}")
    header = ("format", "decode tok/s", "prefill tok/s", "weights MB", "bound tok/s", "% of bound")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    base = make()
    for fmt in args.formats:
        try:
            model = build(base, fmt)
        except ConfigError as exc:  # e.g. a group size that does not divide the hidden size
            print(f"| {fmt} | n/a: {exc} | | | | |", flush=True)
            continue
        vocab = model.config.vocab_size
        dec = decode_tps(model, vocab, args.prompt, args.new_tokens)
        pre = prefill_tps(model, vocab, args.prefill)
        mb = weight_bytes(model) / 1e6
        bound = bandwidth / bytes_per_token(model)
        print(f"| {fmt} | {dec:.1f} | {pre:.0f} | {mb:.0f} | {bound:.1f} | {100 * dec / bound:.0f}% |", flush=True)
        del model
        gc.collect()
    print(f"({time.perf_counter() - started:.0f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="smollm2,llama7b", help="comma list of smollm2, llama7b")
    parser.add_argument("--formats", default=",".join(FORMATS), help="comma list of " + ", ".join(FORMATS))
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prefill", type=int, default=512)
    parser.add_argument("--layers", type=int, default=2, help="decoder layers of the llama7b stack")
    parser.add_argument("--no-kernels", action="store_true", help="skip the single-linear kernel table")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.formats = [f.strip() for f in args.formats.split(",")]
    unknown = [f for f in args.formats if f not in FORMATS]
    if unknown:
        parser.error(f"unknown formats {unknown}; known: {list(FORMATS)}")

    bandwidth = memcpy_bandwidth()
    print(f"# machine: {cpu_name()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, "
          f"memcpy {bandwidth / 1e9:.1f} GB/s (2 x size / time)")
    if not args.no_kernels:
        print("\n## one 11008 x 4096 linear (ms)")
        print("| implementation | 1 row | 512 rows |\n|---|---|---|")
        for name, one, many in kernel_table():
            print(f"| {name} | {one:.2f} | {many:.1f} |", flush=True)
    makers = {"smollm2": ("SmolLM2-135M-Instruct (real weights)", smollm2),
              "llama7b": (f"Llama-7B-shaped stack, {args.layers} layers, random weights",
                          lambda: llama7b_stack(args.layers))}
    for key in args.models.split(","):
        title, make = makers[key.strip()]
        bench_model(title, make, args, bandwidth)
    print(f"\ndecode: {args.new_tokens} greedy tokens after a {args.prompt}-token prompt, batch 1, KV cache; "
          f"prefill: {args.prefill} tokens, batch 1. int formats: decoder linears in the integer kernels, "
          "embeddings / norms / lm_head in bf16.")


if __name__ == "__main__":
    main()
