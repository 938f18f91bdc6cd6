"""Cost of one block-training step against its floor, printed as a table.

The floor is a plain fp32 forward + backward of the same block (every weight requiring a gradient) on
the same batch. A method's step is measured inside the real loop: the same block quantized twice, with
``train.iters`` 1 and 1 + K, so ``(t[1+K] - t[1]) / K`` is the cost of one step without the per-block
set-up (statistics, transforms, clip search, fold, rounding). Model: SmolLM2-135M (``--model``), block
``--block``, ``--batch`` samples of ``--seqlen`` tokens from the offline default corpus.

    python bench/bench_step.py --recipes omniquant:W4A4,omniquant:W4A4:amp,lrquant_plus:W3A16g64 --steps 8

``:amp`` runs the training forward under bf16 autocast (option ``amp: true``).
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from torch import nn

from lrquant.api import quantize
from lrquant.arch import get_mapping
from lrquant.arch.base import set_submodule
from lrquant.config import CalibArgs, Recipe, Scheme, TrainArgs
from lrquant.data.text import calibration_batches
from lrquant.engine import capture_block_inputs, run_block
from lrquant.models import load_model

SCHEMES = {"W4A4": (4, 4, None), "W4A16g64": (4, 16, 64), "W3A16g64": (3, 16, 64), "W2A16g64": (2, 16, 64)}


def floor_seconds(block: nn.Module, x: torch.Tensor, kwargs: dict, repeats: int) -> float:
    """Mean seconds of a plain forward + backward of ``block`` on ``x [B, L, H]``."""
    block = copy.deepcopy(block)
    for p in block.parameters():
        p.requires_grad_(True)
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        out = run_block(block, x, kwargs)
        out.float().pow(2).mean().backward()
        times.append(time.perf_counter() - t0)
        block.zero_grad(set_to_none=True)
    return sum(times[1:]) / repeats


def step_seconds(model: nn.Module, recipe: Recipe, calib: torch.Tensor, steps: int) -> float:
    def run(iters: int) -> float:
        r = recipe.replace(train={**recipe.to_dict()["train"], "iters": iters})
        return quantize(copy.deepcopy(model), r, calib, progress=False).reports[0].seconds

    return (run(1 + steps) - run(1)) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--recipes", default="omniquant:W4A4,omniquant:W4A4:amp,lrquant_plus:W4A4,"
                    "lrquant_plus:W4A4:amp,affinequant:W3A16g64,affinequant:W3A16g64:amp")
    ap.add_argument("--block", type=int, default=5)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok, name = load_model(args.model)
    mapping = get_mapping(model)
    blocks = model.get_submodule(mapping.blocks)
    calib = calibration_batches(tok, "default", args.batch, args.seqlen, 0)
    with torch.no_grad():
        x, kwargs = capture_block_inputs(model, mapping, calib, torch.device("cpu"))
        for b in list(blocks)[: args.block]:
            x = run_block(b, x, kwargs)
    one = copy.deepcopy(model)  # a one-block model whose only block is a copy of block --block
    set_submodule(one, mapping.blocks, nn.ModuleList([copy.deepcopy(blocks[args.block])]))
    floor = floor_seconds(blocks[args.block], x, kwargs, args.steps)
    print(f"{name}, block {args.block}, {args.batch} x {args.seqlen} tokens, {args.threads} threads")
    print("| recipe | step s | floor s (fp32 fwd+bwd) | ratio |\n|---|---:|---:|---:|")
    for item in args.recipes.split(","):
        method, scheme, *flags = item.split(":")
        w, a, g = SCHEMES[scheme]
        recipe = Recipe(method=method, scheme=Scheme.from_bits(w, a, g, kv_bits=16),
                        calib=CalibArgs(nsamples=args.batch, seqlen=args.seqlen),
                        train=TrainArgs(batch_size=args.batch), options={"amp": "amp" in flags})
        # the one-block model sees token ids; its block input is the embedding, not block --block's real
        # input, which does not change the cost of a step
        s = step_seconds(one, recipe, calib, args.steps)
        print(f"| {item} | {s:.3f} | {floor:.3f} | {s / floor:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
