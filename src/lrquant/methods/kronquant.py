"""KronQuant: LRQuant+ with learnable online Kronecker transforms and learnable activation clipping
(FlatQuant's ingredients on top of the learnable-equivalence line).

Per block, in the order the parametrizations chain: LRQuant's log-equivalent diagonal scales at every pair
where they fold (the per-channel scaling, merged in front of the Kronecker transforms: ``x/s -> P``), then
an online ``P = P1 (x) P2`` on the input of each chosen linear group (:mod:`lrquant.transforms.kron`),
per-tensor activation clip logits on every dynamic input quantizer, LRQuant+'s rotation vectors, LWC, the
two-branch MSE + NLC loss; after the fold the recipe's rounding stage (GPTQ or learned rounding) runs on the
transformed weights with the online ops in front of the activation quantizers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

from ..arch.base import ArchMapping, SmoothPair
from ..config import check_choice
from ..quant.quantizers import quant_linears
from ..transforms import Transform
from ..transforms.kron import KronAffine, install_online
from . import register_method
from .lrquant import LRQuantPlus, LRQuantPlusOptions

if TYPE_CHECKING:
    from ..config import Recipe
    from ..engine import BlockContext

ONLINE_GROUPS = ("attn", "o", "mlp", "down")
"""Linear groups that can get an online transform: q/k/v (attention norm output), o_proj (per head:
``P_h`` online, ``P_d`` folded into v), the MLP inputs (MLP norm output), down_proj's input."""


def kron_pairs(mapping: ArchMapping, groups: list[str]) -> list[SmoothPair]:
    """The :class:`SmoothPair` of each chosen group (only the consumers matter, except at ``o``)."""
    by_group = {
        "attn": SmoothPair(mapping.attn_norm, (mapping.q, mapping.k, mapping.v), "norm"),
        "o": SmoothPair(mapping.v, (mapping.o,), "heads"),
        "mlp": SmoothPair(mapping.mlp_norm, mapping.mlp_in, "norm"),
        "down": SmoothPair(mapping.mlp_in[-1], (mapping.mlp_out,), "linear"),
    }
    return [by_group[g] for g in ONLINE_GROUPS if g in groups]


@dataclass
class KronQuantOptions(LRQuantPlusOptions):
    """``online``: the linear groups that get an online Kronecker transform (``attn``, ``o``, ``mlp``,
    ``down``); ``act_clip``: learn a clip ratio per dynamic activation quantizer; ``act_clip_init``: its
    initial logit (``sigmoid(4) = 0.982``)."""

    online: list[str] = field(default_factory=lambda: list(ONLINE_GROUPS))
    act_clip: bool = True
    act_clip_init: float = 4.0

    def __post_init__(self) -> None:
        super().__post_init__()
        for group in self.online:
            check_choice(group, ONLINE_GROUPS, "options.online entry")


@register_method("kronquant")
class KronQuant(LRQuantPlus):
    """LRQuant+ plus online Kronecker transforms (option ``online``) and learnable activation clipping
    (``act_clip``). Learning rates: ``kron`` 5e-3, ``aclip`` 1e-2 (``train.lr`` overrides)."""

    Options: ClassVar[type] = KronQuantOptions
    default_lr: ClassVar[dict[str, float]] = {**LRQuantPlus.default_lr, "kron": 5e-3, "aclip": 1e-2}
    #: test-time adaptation re-runs the diagonal transforms only; the online ops are not re-learned there
    supports_tta: ClassVar[bool] = False

    @classmethod
    def export_problem(cls, recipe: Recipe) -> str | None:
        opts = cls.Options(**recipe.options)
        if opts.online or (opts.act_clip and recipe.scheme.input_activations is not None):
            return ("online Kronecker transforms and learned activation clip ratios have no type in "
                    "compressed-tensors or GGUF; the run folder's model/ + qparams.safetensors carry them "
                    "(lrquant.export.load_run_model)")
        return None

    def prepare_block(self, ctx: BlockContext) -> None:
        """Structure only (also for resumed blocks): the QuantLinears, identity online ops, clip logits."""
        super().prepare_block(ctx)
        for pair in kron_pairs(ctx.mapping, self.opts.online):
            install_online(ctx.block, pair, ctx.mapping, ctx.config)
            self.online_ops.extend(f"{ctx.name}.{n}.input_transform" for n in pair.nexts)
        if self.opts.act_clip:
            for lin in quant_linears(ctx.block).values():
                q = lin.input_quantizer
                if q is not None and q.per_input and q.act_clip is None:
                    q.enable_act_clip(self.opts.act_clip_init, lin.weight.device)

    def make_transforms(self, ctx: BlockContext) -> list[Transform]:
        diagonal = super().make_transforms(ctx)  # attached first: the scales sit in front of P
        kron = [KronAffine(p, ctx.mapping, ctx.config, ctx.block) for p in kron_pairs(ctx.mapping, self.opts.online)]
        return [*diagonal, *kron]


__all__ = ["KronQuant", "KronQuantOptions", "kron_pairs"]
