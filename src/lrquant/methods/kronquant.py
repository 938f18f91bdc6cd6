"""KronQuant: LRQuant+ with learnable online Kronecker transforms and learnable activation clipping
(FlatQuant's ingredients on top of the learnable-equivalence line).

Per block, in the order the parametrizations chain: LRQuant's log-equivalent diagonal scales at every pair
where they fold (the per-channel scaling, merged in front of the Kronecker transforms: ``x/s -> P``), then
an online ``P = P1 (x) P2`` on the input of each chosen linear group (:mod:`lrquant.transforms.kron`),
per-tensor activation clip logits on every dynamic input quantizer, LRQuant+'s rotation vectors, LWC, the
two-branch MSE + NLC loss; with a quantized KV cache optionally (group ``qk``) a per-kv-head online
``P = P1 (x) P2`` on the keys (``q P^-T`` on the queries) after RoPE, before the Q/K fake quantizers. After
the fold the recipe's rounding stage (GPTQ or learned rounding) runs on the transformed weights with the
online ops in front of the activation quantizers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from ..arch.base import ArchMapping, SmoothPair
from ..config import check_choice
from ..errors import ConfigError
from ..quant.observers import MinMaxObserver
from ..quant.quantizers import quant_linears, quantization_disabled
from ..transforms import Transform
from ..transforms.kron import KronAffine, QKKron, install_online, install_online_qk, kron_sizes
from . import register_method
from .learned import observe_inputs
from .lrquant import LRQuantPlus, LRQuantPlusOptions

if TYPE_CHECKING:
    from ..config import Recipe
    from ..engine import BlockContext

LINEAR_GROUPS = ("attn", "o", "mlp", "down")
"""Linear groups that can get an online transform: q/k/v (attention norm output), o_proj (per head:
``P_h`` online, ``P_d`` folded into v), the MLP inputs (MLP norm output), down_proj's input."""

ONLINE_GROUPS = (*LINEAR_GROUPS, "qk")
"""Every choice of option ``online``: the linear groups plus ``qk`` (queries and keys after RoPE, per kv
head; only with a quantized KV cache)."""

QK_INITS = ("balance", "identity")


def kron_pairs(mapping: ArchMapping, groups: list[str]) -> list[SmoothPair]:
    """The :class:`SmoothPair` of each chosen linear group (only the consumers matter, except at ``o``;
    ``qk`` has none: see :class:`~lrquant.transforms.kron.QKKron`)."""
    by_group = {
        "attn": SmoothPair(mapping.attn_norm, (mapping.q, mapping.k, mapping.v), "norm"),
        "o": SmoothPair(mapping.v, (mapping.o,), "heads"),
        "mlp": SmoothPair(mapping.mlp_norm, mapping.mlp_in, "norm"),
        "down": SmoothPair(mapping.mlp_in[-1], (mapping.mlp_out,), "linear"),
    }
    return [by_group[g] for g in LINEAR_GROUPS if g in groups]


@torch.no_grad()
def qk_balance(ctx: BlockContext) -> tuple[torch.Tensor, torch.Tensor]:
    """SmoothQuant-style initial ``log`` diagonals ``([KV, d1], [KV, d2])`` of the q/k transform.

    Per kv head ``g`` and channel ``c`` after RoPE (FP stream, quantization off), ``s = sqrt(max|q| /
    max|k|)`` (``max|q|`` over the query heads of the group) makes ``k s`` and ``q / s`` peak alike; a
    Kronecker product of diagonals holds only ``log s[i d2 + j] = a_i + b_j``, so ``(a, b)`` is the
    least-squares fit of ``log s`` seen as ``[d1, d2]`` (row means and column means, the grand mean split)."""
    n, kv, hd = ctx.mapping.heads(ctx.config, ctx.block)
    obs = {"q": MinMaxObserver(), "k": MinMaxObserver()}

    def hook(_m: nn.Module, args: tuple) -> None:  # (query [B, H, L, D], key [B, KV, L, D], value)
        for name, x in zip("qk", args[:2], strict=True):
            obs[name].update(x.float().transpose(1, 2).flatten(2))  # [B, L, heads * D]

    quantizer = ctx.block.get_submodule(ctx.mapping.attention).attn_quantizer
    observe_inputs(ctx, [(quantizer, hook)], ctx.fp_in, quantization_disabled(ctx.block))
    peak = {}
    for name, o in obs.items():
        o.all_reduce()
        peak[name] = torch.maximum(o.min.abs(), o.max.abs()).clamp_min(1e-5)
    log_s = 0.5 * (peak["q"].reshape(kv, n // kv, hd).amax(1).log() - peak["k"].reshape(kv, hd).log())
    grid = log_s.reshape(kv, *kron_sizes(hd))
    half_mean = grid.mean((1, 2))[:, None] / 2  # [KV, 1]
    return grid.mean(2) - half_mean, grid.mean(1) - half_mean


@dataclass
class KronQuantOptions(LRQuantPlusOptions):
    """``online``: where an online Kronecker transform goes: the linear groups ``attn``, ``o``, ``mlp``,
    ``down`` (the default) and ``qk`` (queries and keys after RoPE, per kv head; needs a quantized KV
    cache); ``qk_init``: the q/k transform's start, ``balance`` (:func:`qk_balance`) or ``identity``;
    ``act_clip``: learn a clip ratio per dynamic activation quantizer; ``act_clip_init``: its initial logit
    (``sigmoid(4) = 0.982``)."""

    online: list[str] = field(default_factory=lambda: list(LINEAR_GROUPS))
    qk_init: str = "balance"
    act_clip: bool = True
    act_clip_init: float = 4.0

    def __post_init__(self) -> None:
        super().__post_init__()
        for group in self.online:
            check_choice(group, ONLINE_GROUPS, "options.online entry")
        check_choice(self.qk_init, QK_INITS, "options.qk_init")


@register_method("kronquant")
class KronQuant(LRQuantPlus):
    """LRQuant+ plus online Kronecker transforms (option ``online``) and learnable activation clipping
    (``act_clip``). Learning rates: ``kron`` 5e-3, ``aclip`` 1e-2 (``train.lr`` overrides)."""

    Options: ClassVar[type] = KronQuantOptions
    default_lr: ClassVar[dict[str, float]] = {**LRQuantPlus.default_lr, "kron": 5e-3, "aclip": 1e-2}
    #: test-time adaptation re-runs the diagonal transforms only; the online ops are not re-learned there
    supports_tta: ClassVar[bool] = False

    @classmethod
    def expand(cls, recipe: Recipe) -> None:
        super().expand(recipe)
        if "qk" in recipe.options["online"] and recipe.scheme.kv_cache is None:
            raise ConfigError("options.online entry 'qk' transforms the quantized queries and keys; it needs "
                              "scheme.kv_cache (e.g. --kv-bits 4), which this recipe does not set")

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
        if "qk" in self.opts.online:
            install_online_qk(ctx.block, ctx.mapping, ctx.config)
            self.online_ops.append(f"{ctx.name}.{ctx.mapping.attention}.attn_quantizer.input_transform")
        if self.opts.act_clip:
            for lin in quant_linears(ctx.block).values():
                q = lin.input_quantizer
                if q is not None and q.per_input and q.act_clip is None:
                    q.enable_act_clip(self.opts.act_clip_init, lin.weight.device)

    def make_transforms(self, ctx: BlockContext) -> list[Transform]:
        diagonal = super().make_transforms(ctx)  # attached first: the scales sit in front of P
        kron: list[Transform] = [KronAffine(p, ctx.mapping, ctx.config, ctx.block)
                                 for p in kron_pairs(ctx.mapping, self.opts.online)]
        if "qk" in self.opts.online:
            init = qk_balance(ctx) if self.opts.qk_init == "balance" else None
            kron.append(QKKron(ctx.mapping, ctx.config, ctx.block, init))
        return [*diagonal, *kron]


__all__ = ["KronQuant", "KronQuantOptions", "kron_pairs", "qk_balance"]
