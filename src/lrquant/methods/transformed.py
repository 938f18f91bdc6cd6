"""SmoothQuant, OmniQuant (LWC + LET) and AffineQuant (LWC + LET + per-head affine matrices)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..arch.base import SmoothPair
from ..transforms import HeadAffine, ScaleShift, Transform
from ..transforms.rotation import pairs_without_online_inputs
from ..transforms.scale_shift import pair_channels, shift_possible
from . import register_method
from .base import Method
from .learned import LearnedMethod, channel_stats, smooth_scales, weight_absmax

if TYPE_CHECKING:
    from ..engine import BlockContext


def init_scale_shift(
    ctx: BlockContext, pair: SmoothPair, stats: dict, alpha: float, use_shift: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """SmoothQuant initialisation of one pair (OmniQuant's LET init): shift = channel centre (where a
    shift folds), scale from the (shifted) activation range and the next weights. ``qk``: ones."""
    if pair.kind == "qk":
        return torch.ones(pair_channels(pair, ctx.mapping, ctx.block, ctx.config)), None
    st = stats[pair.prev]
    shift = (st["max"] + st["min"]) / 2 if use_shift else None
    act = (st["max"] - st["min"]) / 2 if use_shift else st["absmax"]
    return smooth_scales(act, weight_absmax(ctx, pair), alpha), shift


@register_method("smoothquant")
class SmoothQuant(Method):
    """SmoothQuant: migrate activation outliers into the weights at every norm -> linears pair with
    ``s = max|X|^alpha / max|W|^(1-alpha)`` (option ``alpha``, default 0.5), fold, then RTN."""

    def quantize_block(self, ctx: BlockContext) -> None:
        from ..transforms import fold_block

        alpha = float(self.recipe.options.get("alpha", 0.5))
        pairs = tuple(p for p in ctx.mapping.smooth_pairs() if p.kind == "norm")
        stats = channel_stats(ctx, pairs)
        for pair in pairs:
            scale, _ = init_scale_shift(ctx, pair, stats, alpha, use_shift=False)
            ScaleShift(pair, ctx.mapping, ctx.config, scale, block=ctx.block).attach(ctx.block)
        fold_block(ctx.block)
        self.freeze_weights(ctx.block)
        self.calibrate_static(ctx)


@register_method("omniquant")
class OmniQuant(LearnedMethod):
    """OmniQuant: learnable weight clipping + learnable equivalent transformation.

    Options: ``let`` (default: on for weight-activation schemes, off for weight-only, as the paper's
    scripts), ``alpha`` (SmoothQuant init, 0.5), ``pairs`` (pair kinds to transform, default all the
    mapping offers: norm, heads, qk, linear). Learning rates ``lwc`` 1e-2, ``let`` 5e-3.
    """

    def let_enabled(self) -> bool:
        default = self.scheme.input_activations is not None
        return bool(self.options.get("let", default))

    def pairs(self, ctx: BlockContext) -> tuple[SmoothPair, ...]:
        kinds = set(self.options.get("pairs", ("norm", "heads", "qk", "linear")))
        if self.scheme.kv_cache is None:
            kinds.discard("qk")  # q <-> k only matters when Q/K are quantized
        # after a rotation pre-step, a scale cannot fold into a linear whose input is rotated online
        return pairs_without_online_inputs((p for p in ctx.mapping.smooth_pairs() if p.kind in kinds), ctx.block)

    def init_scales(self, ctx: BlockContext, pair: SmoothPair, stats: dict, use_shift: bool):
        return init_scale_shift(ctx, pair, stats, float(self.options.get("alpha", 0.5)), use_shift)

    def make_transform(self, ctx: BlockContext, pair: SmoothPair, scale, shift) -> Transform:
        return ScaleShift(pair, ctx.mapping, ctx.config, scale, shift, block=ctx.block)

    def make_transforms(self, ctx: BlockContext) -> list[Transform]:
        if not self.let_enabled():
            return []
        pairs = self.pairs(ctx)
        stats = channel_stats(ctx, pairs)
        out = []
        for pair in pairs:
            use_shift = shift_possible(pair, ctx.mapping, ctx.block) and self.options.get("shift", True)
            scale, shift = self.init_scales(ctx, pair, stats, use_shift)
            out.append(self.make_transform(ctx, pair, scale, shift))
        return out


@register_method("affinequant")
class AffineQuant(OmniQuant):
    """AffineQuant: OmniQuant with a full invertible matrix per kv head at v -> o (gradual mask, option
    ``stability`` 1e-2), diagonal elsewhere (a matrix there would not fold). LET is on by default for
    every scheme, weight-only included (the matrices also help weight quantization)."""

    def let_enabled(self) -> bool:
        return bool(self.options.get("let", True))

    def make_transform(self, ctx: BlockContext, pair: SmoothPair, scale, shift) -> Transform:
        if pair.kind == "heads" and shift is None:
            return HeadAffine(pair, ctx.mapping, ctx.config, scale, float(self.options.get("stability", 1e-2)),
                              block=ctx.block)
        return ScaleShift(pair, ctx.mapping, ctx.config, scale, shift, block=ctx.block)
