"""SmoothQuant, OmniQuant (LWC + LET) and AffineQuant (LWC + LET + per-head affine matrices)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import torch

from ..arch.base import SmoothPair
from ..config import check_choice, check_range
from ..transforms import HeadAffine, ScaleShift, Transform
from ..transforms.rotation import pairs_without_online_inputs
from ..transforms.scale_shift import pair_channels, shift_possible
from . import register_method
from .base import Method
from .learned import LearnedMethod, LearnedOptions, channel_stats, smooth_scales, weight_absmax

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


@dataclass
class SmoothQuantOptions:
    """``alpha``: migration strength in ``s = max|X|^alpha / max|W|^(1-alpha)``."""

    alpha: float = 0.5

    def __post_init__(self) -> None:
        check_range(self.alpha, 0.0, 1.0, "options.alpha")


@register_method("smoothquant")
class SmoothQuant(Method):
    """SmoothQuant: migrate activation outliers into the weights at every norm -> linears pair with
    ``s = max|X|^alpha / max|W|^(1-alpha)``, fold, then the rounding stage (RTN, or GPTQ)."""

    Options: ClassVar[type] = SmoothQuantOptions

    def quantize_block(self, ctx: BlockContext) -> None:
        from ..transforms import fold_block

        pairs = tuple(p for p in ctx.mapping.smooth_pairs() if p.kind == "norm")
        stats = channel_stats(ctx, pairs)
        for pair in pairs:
            scale, _ = init_scale_shift(ctx, pair, stats, self.opts.alpha, use_shift=False)
            ScaleShift(pair, ctx.mapping, ctx.config, scale, block=ctx.block).attach(ctx.block)
        fold_block(ctx.block)
        self.init_clipping(ctx)
        self.round_weights(ctx)
        self.calibrate_static(ctx)


PAIR_KINDS = ("norm", "heads", "qk", "linear")
SCALE_PARAMS = ("linear", "log")


@dataclass
class OmniQuantOptions(LearnedOptions):
    """``let``: learn equivalent transforms (``None``: on for weight-activation schemes, off for
    weight-only, as the paper's scripts); ``alpha``: SmoothQuant init strength; ``pairs``: pair kinds to
    transform; ``shift``: learn shifts where they fold; ``scale_param``: store the LET scales as they are
    (``linear``) or as their logarithm (``log``: relative steps, scales stay positive)."""

    let: bool | None = None
    alpha: float = 0.5
    pairs: list[str] = field(default_factory=lambda: list(PAIR_KINDS))
    shift: bool = True
    scale_param: str = "linear"

    def __post_init__(self) -> None:
        check_range(self.alpha, 0.0, 1.0, "options.alpha")
        for kind in self.pairs:
            check_choice(kind, PAIR_KINDS, "options.pairs entry")
        check_choice(self.scale_param, SCALE_PARAMS, "options.scale_param")


@register_method("omniquant")
class OmniQuant(LearnedMethod):
    """OmniQuant: learnable weight clipping + learnable equivalent transformation.

    Options: :class:`OmniQuantOptions`. Learning rates ``lwc`` 1e-2, ``let`` 5e-3.
    """

    Options: ClassVar[type] = OmniQuantOptions

    def let_enabled(self) -> bool:
        if self.opts.let is None:  # by scheme, resolved here: a recipe's scheme may change after loading
            return self.scheme.input_activations is not None
        return self.opts.let

    def pairs(self, ctx: BlockContext) -> tuple[SmoothPair, ...]:
        kinds = set(self.opts.pairs)
        if self.scheme.kv_cache is None:
            kinds.discard("qk")  # q <-> k only matters when Q/K are quantized
        # after a rotation pre-step, a scale cannot fold into a linear whose input is rotated online
        return pairs_without_online_inputs((p for p in ctx.mapping.smooth_pairs() if p.kind in kinds), ctx.block)

    def init_scales(self, ctx: BlockContext, pair: SmoothPair, stats: dict, use_shift: bool):
        return init_scale_shift(ctx, pair, stats, self.opts.alpha, use_shift)

    def make_transform(self, ctx: BlockContext, pair: SmoothPair, scale, shift) -> Transform:
        return ScaleShift(pair, ctx.mapping, ctx.config, scale, shift, block=ctx.block, param=self.opts.scale_param)

    def make_transforms(self, ctx: BlockContext) -> list[Transform]:
        if not self.let_enabled():
            return []
        pairs = self.pairs(ctx)
        stats = channel_stats(ctx, pairs)
        out = []
        for pair in pairs:
            use_shift = shift_possible(pair, ctx.mapping, ctx.block) and self.opts.shift
            scale, shift = self.init_scales(ctx, pair, stats, use_shift)
            out.append(self.make_transform(ctx, pair, scale, shift))
        return out


@dataclass
class AffineQuantOptions(OmniQuantOptions):
    """``stability``: the gradual mask's stability factor (diagonal dominance of the affine matrices)."""

    stability: float = 1e-2

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range(self.stability, 0.0, None, "options.stability")


@register_method("affinequant")
class AffineQuant(OmniQuant):
    """AffineQuant: OmniQuant with a full invertible matrix per kv head at v -> o (gradual mask, option
    ``stability`` 1e-2), diagonal elsewhere (a matrix there would not fold). LET is on by default for
    every scheme, weight-only included (the matrices also help weight quantization)."""

    Options: ClassVar[type] = AffineQuantOptions

    def let_enabled(self) -> bool:
        return self.opts.let is not False

    def make_transform(self, ctx: BlockContext, pair: SmoothPair, scale, shift) -> Transform:
        if pair.kind == "heads" and shift is None:
            return HeadAffine(pair, ctx.mapping, ctx.config, scale, self.opts.stability, block=ctx.block)
        return super().make_transform(ctx, pair, scale, shift)
