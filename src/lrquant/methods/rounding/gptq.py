"""The ``gptq`` rounding stage: GPTQ per linear (:mod:`lrquant.quant.gptq`), sequential inside the block.

The attention inputs (q, k, v), then o, then the MLP inputs, then the MLP output; each group's Hessian
comes from the block's *quantized* input stream run through the block with the earlier groups already on
their grids (activation quantizers and online input transforms on, so the Hessian sees what inference
sees; each forward stops once the group has its inputs). The grid of each group of columns is the
quantizer's own (LWC-clipped min-max of the current, error-updated weights; channel scales such as
LRQuant+'s vectors scale it), so GPTQ composes with every learned transform and clipping.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from ...config import RoundingArgs
from ...errors import ConfigError
from ...quant.gptq import HessianAccumulator, gptq_quantize
from ...quant.primitives import minmax_qparams
from ...quant.quantizers import QuantLinear, quant_linears
from . import register_rounding

if TYPE_CHECKING:
    from ...engine import BlockContext


def sequential_groups(ctx: BlockContext) -> list[tuple[str, ...]]:
    """The block's linears in dependency order: attention inputs, o, MLP inputs, MLP output."""
    m = ctx.mapping
    return [(m.q, m.k, m.v), (m.o,), tuple(m.mlp_in), (m.mlp_out,)]


def _grid_fn(lin: QuantLinear) -> Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]:
    """``(cols [O, g], start) -> scale, zero_point [O, 1]``: the quantizer's grid for one column group."""
    q = lin.weight_quantizer
    args = q.args
    n_groups = lin.in_features // args.group_size if args.strategy == "group" else 1
    clip = q.clip_factors()
    vector = q.channel_scale

    def fn(cols: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        j = start // cols.shape[1] if n_groups > 1 else 0
        if args.strategy == "tensor":
            raise ConfigError("rounding.kind gptq needs per-channel or per-group weight scales")
        lo = hi = 1.0
        if clip is not None:
            lo = clip[0].reshape(lin.out_features, n_groups)[:, j:j + 1]
            hi = clip[1].reshape(lin.out_features, n_groups)[:, j:j + 1]
        scale, zp = minmax_qparams(cols.float(), q.qmin, q.qmax, args.symmetric, lo, hi)
        if vector is not None:
            scale = scale * vector.detach()[:, None]
        return scale, zp

    return fn


class _GroupSeen(Exception):
    """Raised once every linear of the group has seen the sample: the rest of the block is not needed."""


def _collect_hessians(ctx: BlockContext, targets: dict[str, QuantLinear],
                      hessians: dict[str, HessianAccumulator]) -> None:
    """Run the quantized stream through the block, one sample at a time, accumulating each target's
    input Hessian (after its online transform and activation quantizer, as inference sees it); each
    forward stops as soon as every target has its input."""
    seen: set[str] = set()

    def hook_for(path: str):
        def hook(module: QuantLinear, inputs: tuple) -> None:
            x = inputs[0]
            if module.input_transform is not None:
                x = module.input_transform(x)
            if module.input_quantizer is not None:
                x = module.input_quantizer(x)
            hessians[path].add(x)
            seen.add(path)
            if len(seen) == len(targets):
                raise _GroupSeen
        return hook

    handles = [lin.register_forward_pre_hook(hook_for(p)) for p, lin in targets.items()]
    try:
        for idx in ctx.batches(1, shuffle=False):
            seen.clear()
            try:
                ctx.forward(ctx.q_in[idx])
            except _GroupSeen:
                pass
    finally:
        for h in handles:
            h.remove()


@register_rounding("gptq", moves_codes=True)
@torch.no_grad()
def round_gptq(ctx: BlockContext, args: RoundingArgs) -> None:
    """GPTQ on every linear of the block, group by group (see the module docstring)."""
    linears = quant_linears(ctx.block)
    for group in sequential_groups(ctx):
        targets = {p: linears[p] for p in group if p in linears and linears[p].weight_quantizer is not None
                   and not linears[p].weight_frozen}
        if not targets:
            continue
        hessians = {p: HessianAccumulator(lin.in_features, ctx.device) for p, lin in targets.items()}
        _collect_hessians(ctx, targets, hessians)
        for acc in hessians.values():
            acc.all_reduce()
        for path, lin in targets.items():
            q = lin.weight_quantizer
            w = lin.weight.detach()
            wq, scale, zp = gptq_quantize(
                w.float(), hessians[path].h, _grid_fn(lin), q.qmin, q.qmax,
                q.args.group_size if q.args.strategy == "group" else None,
                damp=args.damp, block_size=args.block_size, act_order=args.act_order)
            lin.quant_error = float((wq - w.float()).norm() / w.float().norm().clamp_min(1e-20))
            lin.weight.data.copy_(wq.to(w.dtype))
            q.scale, q.zero_point = scale.reshape(-1, 1).clone(), zp.reshape(-1, 1).round().clone()
            q.upbound_factor = q.lowbound_factor = q.rounding_offset = q.channel_scale = None
