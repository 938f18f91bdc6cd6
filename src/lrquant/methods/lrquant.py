"""LRQuant (log-equivalent init, NLC loss, test-time adaptation) and LRQuant+ (rotation vectors,
two-branch loss)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from ..arch.base import SmoothPair
from ..errors import ConfigError
from ..quant.quantizers import QuantLinear
from ..transforms import Transform
from . import register_method
from .transformed import OmniQuant

if TYPE_CHECKING:
    from ..engine import BlockContext


def log_equivalent_scales(act_absmax: torch.Tensor) -> torch.Tensor:
    """LRQuant's initialisation: ``a = max|X|`` clamped at 1e-5, ``s = a / log2(2 + a)`` (no weight term)."""
    a = act_absmax.clamp_min(1e-5)
    return a / torch.log2(2 + a)


@register_method("lrquant")
class LRQuant(OmniQuant):
    """OmniQuant's LWC + LET with the logarithmic activation-equivalent initialisation of the scales
    (option ``init``: ``log`` (default) or ``smoothquant``) and the loss MSE + NLC (option ``loss``,
    default ``{"mse": 1, "nlc": 1}``). Test-time adaptation: see :mod:`lrquant.tta`."""

    def loss_terms(self) -> dict[str, float]:
        return dict(self.options.get("loss", {"mse": 1.0, "nlc": 1.0}))

    def init_scales(self, ctx: BlockContext, pair: SmoothPair, stats: dict, use_shift: bool):
        if self.options.get("init", "log") == "smoothquant" or pair.kind == "qk":
            return super().init_scales(ctx, pair, stats, use_shift)
        st = stats[pair.prev]
        shift = (st["max"] + st["min"]) / 2 if use_shift else None
        act = (st["max"] - st["min"]) / 2 if use_shift else st["absmax"]
        return log_equivalent_scales(act), shift


@register_method("lrquant_plus")
class LRQuantPlus(LRQuant):
    """LRQuant+: LRQuant plus learnable per-output-channel rotation vectors on the dequantized weights of
    the chosen linears (option ``vectors``: roles among q, k, v, o, gate, up, down; default q, o, up — up
    is fc1 for non-gated MLPs), folded into the quantization scales; and the two-branch loss: the FP
    block on the FP input (error propagation) plus the FP block on the quantized input (homologous
    reconstruction), MSE + NLC on both (option ``q_target`` weight, default 1)."""

    def targets(self, ctx: BlockContext):
        self.options.setdefault("q_target", 1.0)
        return super().targets(ctx)

    def vector_paths(self, ctx: BlockContext) -> list[str]:
        m = ctx.mapping
        roles = {"q": m.q, "k": m.k, "v": m.v, "o": m.o, "up": m.mlp_in[-1], "down": m.mlp_out}
        if m.gated_mlp:
            roles["gate"] = m.mlp_in[0]
        wanted = self.options.get("vectors", ["q", "o", "up"])
        unknown = set(wanted) - set(roles)
        if unknown:
            raise ConfigError(f"unknown rotation-vector roles {sorted(unknown)}; known: {sorted(roles)}")
        return [roles[r] for r in wanted]

    def make_transforms(self, ctx: BlockContext) -> list[Transform]:
        if self.scheme.weights is not None and self.scheme.weights.strategy == "tensor":
            raise ConfigError("LRQuant+ rotation vectors need per-channel or per-group weight scales")
        for path in self.vector_paths(ctx):
            lin = ctx.block.get_submodule(path)
            if isinstance(lin, QuantLinear) and lin.weight_quantizer is not None:
                lin.channel_vector = nn.Parameter(torch.ones(lin.out_features, device=lin.weight.device))
        return super().make_transforms(ctx)


__all__ = ["LRQuant", "LRQuantPlus", "log_equivalent_scales"]
