"""Inference overhead of the online ops (the rotation pre-step's Hadamard, the Kronecker transforms of
``kronquant``) on CPU: prefill and decode tokens/s with and without them.

Usage: ``python bench/bench_online.py [--model default] [--prefill 512] [--prompt 64] [--new-tokens 32]
[--threads 2] [--repeat 3]``

Every variant runs the same fp32 model (the online ops' cost is what is measured, not a low-bit kernel's):

* ``plain``: the model as loaded;
* ``hadamard``: the rotation pre-step (``--rotate hadamard``): one online Hadamard on every down_proj input;
* ``kron``: an :class:`~lrquant.transforms.OnlineKron` (random invertible factors, folded exactly) on the
  inputs of q/k/v, o (across heads), gate/up and down of every block: what ``kronquant`` leaves online;
* ``hadamard+kron``: both (the ``kron-w4a4`` recipe's graph);
* ``hadamard+kron+qk``: and kronquant's per-KV-head q/k op (``online: [..., qk]``, random invertible
  factors) on the queries and keys after RoPE, through the attention quantizer without quantizers. As in
  lrquant's simulation the op runs inside attention, on every cached key at each decode step (the cache
  holds the keys before it), so its decode figure is an upper bound on a runtime that caches ``k P``.

Each linear is wrapped in a :class:`~lrquant.quant.quantizers.QuantLinear` without quantizers in every
variant, so only the online ops differ. Decode: greedy at batch 1 with a KV cache after a ``--prompt``-token
prompt (not timed); prefill: one forward of ``--prefill`` tokens; best of ``--repeat``. The logits of every
variant are checked against ``plain`` (the ops are exact) before timing.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_speed import cpu_name, decode_tps, prefill_tps  # noqa: E402


def wrap(model: nn.Module) -> None:
    from lrquant.arch import get_mapping
    from lrquant.arch.base import set_submodule
    from lrquant.quant.quantizers import QuantLinear

    mapping = get_mapping(model)
    for _, block in mapping.block_list(model):
        for path in mapping.linears():
            set_submodule(block, path, QuantLinear(block.get_submodule(path), None, None))


@torch.no_grad()
def add_kron(model: nn.Module, seed: int = 0) -> None:
    from lrquant.arch import get_mapping
    from lrquant.methods.kronquant import ONLINE_GROUPS, kron_pairs
    from lrquant.transforms import KronAffine, fold_block

    mapping = get_mapping(model)
    gen = torch.Generator().manual_seed(seed)
    for _, block in mapping.block_list(model):
        for pair in kron_pairs(mapping, list(ONLINE_GROUPS)):
            t = KronAffine(pair, mapping, model.config, block)
            for p in t.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
            t.attach(block)
        fold_block(block)


@torch.no_grad()
def add_qk(model: nn.Module, seed: int = 1) -> None:
    """An :class:`~lrquant.transforms.kron.OnlineQK` on every block's attention: key factors
    ``I + 0.05 N`` per kv head, query factors their inverse transposes (``q k^T`` unchanged)."""
    from lrquant.arch import get_mapping
    from lrquant.quant.attention import AttentionQuantizer, enable_attention_quantization
    from lrquant.transforms.kron import install_online_qk

    mapping = get_mapping(model)
    enable_attention_quantization(model)
    gen = torch.Generator().manual_seed(seed)
    for _, block in mapping.block_list(model):
        block.get_submodule(mapping.attention).attn_quantizer = AttentionQuantizer(None)
        op = install_online_qk(block, mapping, model.config)
        for k_name, q_name in (("kfactor0", "qfactor0"), ("kfactor1", "qfactor1")):
            k = getattr(op, k_name)  # [KV, d, d]
            k.add_(torch.randn(k.shape, generator=gen, dtype=k.dtype) * 0.05)
            getattr(op, q_name).copy_(torch.linalg.inv(k.double()).mT.to(k.dtype))


def variant(base: nn.Module, name: str) -> nn.Module:
    from lrquant.arch import get_mapping
    from lrquant.transforms.rotation import rotate_model

    model = copy.deepcopy(base)
    if "hadamard" in name:
        rotate_model(model, get_mapping(model), seed=0)
    wrap(model)
    if "kron" in name:
        add_kron(model)
    if "qk" in name:
        add_qk(model)
    return model.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from lrquant.models import load_model

    base, _, display = load_model(args.model)
    vocab = base.config.vocab_size
    ids = torch.randint(0, vocab, (1, 32), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = base(ids, use_cache=False).logits
    print(f"{display}, CPU {cpu_name()}, {args.threads} threads, torch {torch.__version__}")
    print("\n| variant | online ops | max logit diff vs plain | prefill tok/s | decode tok/s |")
    print("|---|---:|---:|---:|---:|")
    rows = {}
    for name in ("plain", "hadamard", "kron", "hadamard+kron", "hadamard+kron+qk"):
        model = variant(base, name)
        n_ops = sum(1 for m in model.modules() if getattr(m, "input_transform", None) is not None)
        with torch.no_grad():
            diff = float((model(ids, use_cache=False).logits - ref).abs().max())
        prefill = max(prefill_tps(model, vocab, args.prefill) for _ in range(args.repeat))
        with torch.no_grad():
            decode = max(decode_tps(model, vocab, args.prompt, args.new_tokens) for _ in range(args.repeat))
        rows[name] = (prefill, decode)
        p0, d0 = rows["plain"]
        print(f"| {name} | {n_ops} | {diff:.2e} | {prefill:.0f} ({prefill / p0:.2f}x) | {decode:.1f} "
              f"({decode / d0:.2f}x) |", flush=True)
        del model


if __name__ == "__main__":
    main()
