"""LRQuant (log-equivalent init, NLC loss, test-time adaptation) and LRQuant+ (rotation vectors,
two-branch loss)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import torch

from ..arch.base import SmoothPair
from ..config import check_choice
from ..errors import ConfigError
from ..quant.quantizers import QuantLinear
from ..transforms import Transform
from . import register_method
from .transformed import OmniQuant, OmniQuantOptions

VECTOR_ROLES = ("q", "k", "v", "o", "gate", "up", "down")

if TYPE_CHECKING:
    from ..engine import BlockContext


def log_equivalent_scales(act_absmax: torch.Tensor) -> torch.Tensor:
    """LRQuant's initialisation: ``a = max|X|`` clamped at 1e-5, ``s = a / log2(2 + a)`` (no weight term)."""
    a = act_absmax.clamp_min(1e-5)
    return a / torch.log2(2 + a)


@dataclass
class LRQuantOptions(OmniQuantOptions):
    """``init``: the LET scales' initialisation, ``log`` (activation-equivalent) or ``smoothquant``."""

    init: str = "log"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice(self.init, ("log", "smoothquant"), "options.init")


@register_method("lrquant")
class LRQuant(OmniQuant):
    """OmniQuant's LWC + LET with the logarithmic activation-equivalent initialisation of the scales
    (option ``init``: ``log`` (default) or ``smoothquant``) and the loss MSE + NLC (preset: ``loss.mse``
    1, ``loss.nlc`` 1). Test-time adaptation: see :mod:`lrquant.tta`."""

    Options: ClassVar[type] = LRQuantOptions
    loss_preset: ClassVar[dict[str, float]] = {"mse": 1.0, "nlc": 1.0, "q_target": 0.0}

    def init_scales(self, ctx: BlockContext, pair: SmoothPair, stats: dict, use_shift: bool):
        if self.opts.init == "smoothquant" or pair.kind == "qk":
            return super().init_scales(ctx, pair, stats, use_shift)
        st = stats[pair.prev]
        shift = (st["max"] + st["min"]) / 2 if use_shift else None
        act = (st["max"] - st["min"]) / 2 if use_shift else st["absmax"]
        return log_equivalent_scales(act), shift


@dataclass
class LRQuantPlusOptions(LRQuantOptions):
    """``vectors``: roles whose linears get rotation vectors (q, k, v, o, gate, up, down)."""

    vectors: list[str] = field(default_factory=lambda: ["q", "o", "up"])

    def __post_init__(self) -> None:
        super().__post_init__()
        for role in self.vectors:
            check_choice(role, VECTOR_ROLES, "options.vectors entry")


@register_method("lrquant_plus")
class LRQuantPlus(LRQuant):
    """LRQuant+: LRQuant plus learnable per-output-channel rotation vectors on the dequantized weights of
    the chosen linears (option ``vectors``: roles among q, k, v, o, gate, up, down; default q, o, up — up
    is fc1 for non-gated MLPs), folded into the quantization scales; and the two-branch loss: the FP
    block on the FP input (error propagation) plus the FP block on the quantized input (homologous
    reconstruction), MSE + NLC on both (preset ``loss.q_target`` 1)."""

    Options: ClassVar[type] = LRQuantPlusOptions
    loss_preset: ClassVar[dict[str, float]] = {"mse": 1.0, "nlc": 1.0, "q_target": 1.0}

    def vector_paths(self, ctx: BlockContext) -> list[str]:
        m = ctx.mapping
        roles = {"q": m.q, "k": m.k, "v": m.v, "o": m.o, "up": m.mlp_in[-1], "down": m.mlp_out}
        if m.gated_mlp:
            roles["gate"] = m.mlp_in[0]
        missing = [r for r in self.opts.vectors if r not in roles]
        if missing:
            raise ConfigError(f"rotation-vector roles {missing} do not exist here (no gated MLP); "
                              f"known: {sorted(roles)}")
        return [roles[r] for r in self.opts.vectors]

    def make_transforms(self, ctx: BlockContext) -> list[Transform]:
        if self.scheme.weights is not None and self.scheme.weights.strategy == "tensor":
            raise ConfigError("LRQuant+ rotation vectors need per-channel or per-group weight scales")
        for path in self.vector_paths(ctx):
            lin = ctx.block.get_submodule(path)
            if isinstance(lin, QuantLinear) and lin.weight_quantizer is not None:
                lin.weight_quantizer.enable_channel_scale(lin.out_features, lin.weight.device)
        return super().make_transforms(ctx)


__all__ = ["LRQuant", "LRQuantPlus", "log_equivalent_scales"]
