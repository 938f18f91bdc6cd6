"""RepQuant (RepQ-ViT style quantization-inference decoupling) for vision and language blocks.

Per block:

1. **Calibrate in the accurate form.** The inputs of the linears fed by a norm (q/k/v from the attention
   norm, the MLP input linears from the MLP norm) get one shared
   :class:`~lrquant.quant.dualclip.ChannelDualClipQuantizer` per norm: per-channel asymmetric, with a
   learnable lower and upper clipping factor per channel initialised from the per-channel min/max of the
   quantized stream. Attention probabilities are quantized with log√2
   (:class:`~lrquant.quant.log.LogSqrt2Quantizer`, the scheme's activation bit-width or option
   ``softmax_bits``). The clip logits (param group ``clip``) are trained against the FP block output with
   the shared loop while the weights stay in full precision; the other activations (o, down inputs) and
   Q/K/V use the scheme's quantizers throughout.
2. **Reparameterize exactly.** Each per-channel quantizer becomes a per-tensor static one; the scale
   ratios go into the norm weight and the next linears' columns, the zero-point offsets into the norm bias
   and the next linears' biases (:mod:`lrquant.quant.dualclip`). The block computes the same thing.
   RMSNorm has no bias, so on RMSNorm models the quantizer runs with one shared integer zero point per
   tensor from the start and only the scale ratios are folded (exact too); the same happens when a next
   linear has no bias. We never add a bias the architecture lacks.
3. **Quantize the changed weights.** The weights, now ``W diag(r)``, are quantized with learnable weight
   clipping (param group ``lwc``) trained with the shared loop against the same targets (activations in
   their final per-tensor form, softmax in log√2 with the straight-through estimator), then frozen.
4. **Integer-friendly softmax.** The log√2 quantizer is swapped for its log2 shift form
   (:class:`Log2ShiftQuantizer`: ``2^(-floor(c/2))`` with a ``1/√2`` correction on odd codes), which gives
   bit-identical values.

Block report: ``init_loss`` is the loss before calibration (clip init, FP weights), ``final_loss`` the
loss of the finished block before freezing (per-tensor activations, quantized weights); ``losses`` holds
the epochs of both phases; a note records each phase and the largest output change caused by the
reparameterization on the first calibration sample. Options: ``softmax_bits`` (default: activation bits;
16 leaves the softmax in full precision), ``loss``, ``q_target``, ``amp`` as every learned method.
Limitations: no test-time adaptation (the block changes structure), and the per-tensor static inputs of
the norm-fed linears differ from the scheme's activation format, so a compressed-tensors export is only
possible when the scheme's activations are themselves static per-tensor asymmetric.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..arch.base import ArchMapping, SmoothPair
from ..errors import ConfigError
from ..quant.attention import AttentionQuantizer, enable_attention_quantization
from ..quant.dualclip import ChannelDualClipQuantizer, fold_linear, fold_norm
from ..quant.log import LogSqrt2Quantizer, reparam_dequant
from ..quant.quantizers import QuantLinear, UniformQuantizer, quant_linears, quantization_disabled
from . import register_method
from .learned import LR_BACKOFF, LR_RETRIES, LearnedMethod

if TYPE_CHECKING:
    from ..engine import BlockContext

log = logging.getLogger("lrquant")


class Log2ShiftQuantizer(LogSqrt2Quantizer):
    """Inference form of :class:`~lrquant.quant.log.LogSqrt2Quantizer`: the same codes, dequantized as
    ``2^(-floor(c/2)) * (1/√2 if c is odd) * scale`` (a shift plus one constant correction), equal to the
    log√2 values bit for bit. No gradient (inference only). ``scale`` is non-persistent, so saved
    checkpoints keep the plain transformers keys."""

    def __init__(self, num_bits: int = 4, scale: float = 1.0) -> None:
        super().__init__(num_bits, scale)
        value = self.scale
        del self._buffers["scale"]
        self.register_buffer("scale", value, persistent=False)

    @classmethod
    def from_log_sqrt2(cls, quantizer: LogSqrt2Quantizer) -> Log2ShiftQuantizer:
        return cls(quantizer.num_bits, float(quantizer.scale)).to(quantizer.scale.device)

    def forward(self, p: torch.Tensor) -> torch.Tensor:
        shift, odd, zero = self.shift_form(p)
        return reparam_dequant(shift, odd, zero, self.scale.to(p.dtype), dtype=p.dtype)


@contextlib.contextmanager
def full_precision(block: nn.Module) -> Iterator[None]:
    """Every quantizer of ``block`` off, the attention-probability quantizers included (which
    :func:`~lrquant.quant.quantizers.quantization_disabled` does not know about)."""
    holders = [m for m in block.modules() if isinstance(m, AttentionQuantizer) and m.probs is not None]
    saved = [m.probs for m in holders]
    for m in holders:
        m.probs = None
    try:
        with quantization_disabled(block):
            yield
    finally:
        for m, p in zip(holders, saved, strict=True):
            m.probs = p


@contextlib.contextmanager
def weights_in_full_precision(block: nn.Module) -> Iterator[None]:
    """Weight quantizers off (activation quantizers untouched)."""
    quantizers = [m.weight_quantizer for m in quant_linears(block).values()
                  if m.weight_quantizer is not None and m.weight_quantizer.enabled]
    for q in quantizers:
        q.enabled = False
    try:
        yield
    finally:
        for q in quantizers:
            q.enabled = True


def norm_pairs(mapping: ArchMapping) -> tuple[SmoothPair, ...]:
    """``norm -> linears`` pairs of a block (attention norm -> q/k/v, MLP norm -> MLP input linears)."""
    return tuple(p for p in mapping.smooth_pairs() if p.kind == "norm")


def per_channel_offsets_possible(block: nn.Module, pair: SmoothPair, mapping: ArchMapping) -> bool:
    """Zero-point offsets fold only into a LayerNorm with a bias whose next linears all have biases."""
    norm = block.get_submodule(pair.prev)
    linears = [block.get_submodule(n) for n in pair.nexts]
    return (mapping.norm_kind == "layer" and getattr(norm, "bias", None) is not None
            and all(getattr(lin, "bias", None) is not None for lin in linears))


@register_method("repquant")
class RepQuant(LearnedMethod):
    """RepQuant: per-channel dual-clip activation quantization and log√2 softmax while calibrating,
    reparameterized exactly to per-tensor / log2-shift inference (see module docstring)."""

    default_lr: dict[str, float] = {**LearnedMethod.default_lr, "clip": 5e-2}

    def __init__(self, recipe) -> None:
        super().__init__(recipe)
        if self.tta_blocks:
            raise ConfigError("repquant does not support test-time adaptation (its block step reparameterizes "
                              "the block)")
        acts = self.scheme.input_activations
        self.act_bits = acts.num_bits if acts is not None else None
        bits = self.options.get("softmax_bits", self.act_bits)
        self.softmax_bits = None if bits is None or int(bits) >= 16 else int(bits)

    # ---- structure ---------------------------------------------------------------------------------
    def prepare_model(self, model: nn.Module, mapping: ArchMapping, calib: Any) -> None:
        if self.scheme.kv_cache is not None or self.softmax_bits is not None:
            enable_attention_quantization(model)

    def prepare_block(self, ctx: BlockContext) -> None:
        super().prepare_block(ctx)
        if self.act_bits is not None:
            for pair in norm_pairs(ctx.mapping):
                linears = [ctx.block.get_submodule(n) for n in pair.nexts]
                shared = not per_channel_offsets_possible(ctx.block, pair, ctx.mapping)
                quantizer = ChannelDualClipQuantizer(self.act_bits, linears[0].in_features, shared)
                for lin in linears:
                    lin.input_quantizer = quantizer
        if self.softmax_bits is not None:
            attn = ctx.block.get_submodule(ctx.mapping.attention)
            if getattr(attn, "attn_quantizer", None) is None:
                attn.attn_quantizer = AttentionQuantizer(None)
            attn.attn_quantizer.probs = LogSqrt2Quantizer(self.softmax_bits)

    def restore_block(self, ctx: BlockContext) -> None:
        """The checkpoint holds the finished block: per-tensor quantizers (their mode follows from the loaded
        ``scale``) and frozen weights; only the softmax quantizer's form is not a tensor."""
        self.to_shift_form(ctx.block)

    # ---- steps -------------------------------------------------------------------------------------
    @staticmethod
    def clip_quantizers(block: nn.Module) -> list[ChannelDualClipQuantizer]:
        """The shared dual-clip quantizers of ``block``, each once (one per norm pair)."""
        out: list[ChannelDualClipQuantizer] = []
        for m in block.modules():  # named_modules de-duplicates shared modules
            if isinstance(m, ChannelDualClipQuantizer) and not any(m is o for o in out):
                out.append(m)
        return out

    @torch.no_grad()
    def init_clips(self, ctx: BlockContext) -> None:
        """Per-channel min/max of each norm output on the quantized stream (full-precision block), then
        :meth:`ChannelDualClipQuantizer.set_range`."""
        quantizers = self.clip_quantizers(ctx.block)
        ranges: dict[int, list[torch.Tensor]] = {}
        handles = []

        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            lo, hi = x.amin(0), x.amax(0)
            cur = ranges.get(id(module))
            ranges[id(module)] = [lo, hi] if cur is None else [torch.minimum(cur[0], lo), torch.maximum(cur[1], hi)]

        for q in quantizers:
            handles.append(q.register_forward_pre_hook(hook))
        try:
            with full_precision(ctx.block):
                for idx in ctx.batches(1, shuffle=False):
                    ctx.forward(ctx.q_in[idx])
        finally:
            for h in handles:
                h.remove()
        for q in quantizers:
            q.set_range(*ranges[id(q)])

    @torch.no_grad()
    def reparameterize(self, ctx: BlockContext) -> None:
        """Per-channel -> per-tensor for every norm pair, folding ``r`` and the offsets (in float64) into
        the norm and its next linears. Must run before the weights are frozen."""
        by_quantizer = {}
        for pair in norm_pairs(ctx.mapping):
            q = ctx.block.get_submodule(pair.nexts[0]).input_quantizer
            if isinstance(q, ChannelDualClipQuantizer) and q.mode == "learn":
                by_quantizer[id(q)] = (q, pair)
        for q, pair in by_quantizer.values():
            linears = [ctx.block.get_submodule(n) for n in pair.nexts]
            if any(isinstance(lin, QuantLinear) and lin.weight_frozen for lin in linears):
                raise ConfigError(f"{pair.prev}: reparameterize before freezing the weights")
            r, offset = q.to_per_tensor()
            norm = ctx.block.get_submodule(pair.prev)
            bias = getattr(norm, "bias", None)
            w, b = fold_norm(norm.weight.double(), bias.double() if bias is not None else None,
                             r.to(norm.weight.device), offset.to(norm.weight.device),
                             plus_one=ctx.mapping.norm_kind == "rms_plus_one")
            norm.weight.copy_(w.to(norm.weight.dtype))
            if b is not None:
                bias.copy_(b.to(bias.dtype))
            for lin in linears:
                w, b = fold_linear(lin.weight.double(), lin.bias.double() if lin.bias is not None else None,
                                   r.to(lin.weight.device), offset.to(lin.weight.device))
                lin.weight.copy_(w.to(lin.weight.dtype))
                if b is not None:
                    lin.bias.copy_(b.to(lin.bias.dtype))

    @staticmethod
    def to_shift_form(block: nn.Module) -> None:
        """Swap every log√2 softmax quantizer for its bit-identical log2 shift form."""
        for m in block.modules():
            if isinstance(m, AttentionQuantizer) and type(m.probs) is LogSqrt2Quantizer:
                m.probs = Log2ShiftQuantizer.from_log_sqrt2(m.probs)

    # ---- the block step ----------------------------------------------------------------------------
    def targets(self, ctx: BlockContext) -> list[tuple[torch.Tensor, float]]:
        with full_precision(ctx.block):
            return super().targets(ctx)

    def fit(self, ctx: BlockContext, targets, groups: list[dict[str, Any]], label: str) -> tuple[float, float]:
        """Train ``groups`` with the shared loop (rollback and lr back-off on non-finite losses, never end
        worse than the start); returns ``(initial loss, final loss)`` and notes the phase in the report."""
        params = [p for g in groups for p in g["params"]]
        init = self.eval_loss(ctx, targets)
        if not params:
            return init, init
        for p in params:
            p.requires_grad_(True)
        initial = [p.detach().clone() for p in params]
        scale_lr = 1.0
        for attempt in range(LR_RETRIES + 1):
            if self._train(ctx, [], groups, params, targets, ctx.recipe.train.epochs, scale_lr):
                break
            with torch.no_grad():
                for p, p0 in zip(params, initial, strict=True):
                    p.copy_(p0)
            scale_lr *= LR_BACKOFF
            msg = f"{label}: non-finite loss in block {ctx.index}; rolled back"
            msg += f", retrying with lr x{scale_lr:g}" if attempt < LR_RETRIES else " to its initialisation"
            log.warning(msg)
            ctx.report.notes.append(msg)
        final = self.eval_loss(ctx, targets)
        if not final <= init:
            with torch.no_grad():
                for p, p0 in zip(params, initial, strict=True):
                    p.copy_(p0)
            ctx.report.notes.append(f"{label}: training raised the loss ({final:.4g} > {init:.4g}); kept the init")
            final = init
        for p in params:
            p.requires_grad_(False)
        ctx.report.notes.append(f"{label}: loss {init:.4g} -> {final:.4g}")
        return init, final

    @torch.no_grad()
    def reparam_change(self, ctx: BlockContext, before: torch.Tensor) -> float:
        """Largest absolute change of the first sample's block output caused by the reparameterization."""
        with weights_in_full_precision(ctx.block):
            after = ctx.forward(ctx.q_in[:1])
        return float((after - before).abs().max())

    def quantize_block(self, ctx: BlockContext) -> None:
        targets = self.targets(ctx)
        for p in ctx.block.parameters():
            p.requires_grad_(False)
        quantizers = self.clip_quantizers(ctx.block)
        # phase 1: dual clips (and log√2 softmax), weights in full precision
        if quantizers:
            self.init_clips(ctx)
            clip = [p for q in quantizers for p in (q.clip_lower, q.clip_upper)]
            with weights_in_full_precision(ctx.block):
                ctx.report.init_loss, _ = self.fit(ctx, targets, [{"params": clip, "lr": self.lr["clip"],
                                                                   "name": "clip"}], "clip phase")
                with torch.no_grad():
                    before = ctx.forward(ctx.q_in[:1])
            self.reparameterize(ctx)
            change = self.reparam_change(ctx, before)
            ctx.report.notes.append(f"reparameterization: max |output change| {change:.3g}")
        # phase 2: weights quantized after the reparameterization changed them
        lwc = [p for m in ctx.block.modules() if isinstance(m, UniformQuantizer) and m.lwc
               for p in (m.upbound_factor, m.lowbound_factor)]
        groups = [{"params": lwc, "lr": self.lr["lwc"], "name": "lwc"}] if lwc else []
        init, ctx.report.final_loss = self.fit(ctx, targets, groups, "weight phase")
        if ctx.report.init_loss is None:
            ctx.report.init_loss = init
        self.freeze_weights(ctx.block)
        self.to_shift_form(ctx.block)
        self.calibrate_static(ctx)


__all__ = ["Log2ShiftQuantizer", "RepQuant", "full_precision", "norm_pairs", "per_channel_offsets_possible"]
