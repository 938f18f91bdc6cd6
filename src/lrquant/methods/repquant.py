"""RepQuant (RepQ-ViT style quantization-inference decoupling) for vision and language blocks.

Per block:

1. **Calibrate in the accurate form.** The inputs of the linears fed by a norm (q/k/v from the attention
   norm, the MLP input linears from the MLP norm) get one shared
   :class:`~lrquant.quant.dualclip.ChannelDualClipQuantizer` per norm: per-channel asymmetric, with a
   learnable lower and upper clipping factor per channel initialised from the per-channel min/max of the
   quantized stream. Attention probabilities are quantized with log√2
   (:class:`~lrquant.quant.log.LogSqrt2Quantizer`, the scheme's activation bit-width or option
   ``softmax_bits``). The other activations (o, down inputs) and Q/K/V use the scheme's quantizers. The
   clip logits (param group ``clip``) and the weight clipping of every linear (``lwc``) are trained
   against the FP block output with the shared loop. Each norm-fed linear sees, while training, the
   weights the reparameterization will give it, in per-channel coordinates (:func:`calibration_view`):
   ``Q(W diag(r)) diag(1/r)`` and bias ``b + (Q(W') - W') o``, so the loss is the inference loss.
2. **Reparameterize exactly.** Each per-channel quantizer becomes a per-tensor static one; the scale
   ratios ``r`` go into the norm weight and the next linears' columns, the zero-point offsets ``o`` into
   the norm bias and the next linears' biases (:mod:`lrquant.quant.dualclip`). RMSNorm has no bias, so on
   RMSNorm models the quantizer runs with one shared integer zero point per tensor from the start and
   only ``r`` is folded (exact too); the same when a next linear has no bias or the block may zero-pad
   the norm output (``mapping.padded_norms``: Swin's attention norm). No bias is ever added.
3. **Quantize the changed weights.** ``W' = W diag(r)`` is frozen on its grid with the learned clipping.
4. **Integer-friendly softmax.** The log√2 quantizer is swapped for its log2 shift form
   (:class:`Log2ShiftQuantizer`: ``2^(-floor(c/2))`` with a ``1/√2`` correction on odd codes), which gives
   bit-identical values.

Block report: ``init_loss`` / ``final_loss`` of the training; notes record the largest change of the
first sample's block output caused by the reparameterization (float rounding only). Options:
``softmax_bits`` (default: activation bits; 16 leaves the softmax in full precision), ``loss``,
``q_target``, ``amp`` as every learned method. Weight-only schemes: no activation or softmax quantizers,
RepQuant reduces to learnable weight clipping. Limitations: no test-time adaptation (the block changes
structure). A compressed-tensors checkpoint cannot hold the softmax quantizer, nor per-tensor static
inputs when the scheme's activations are something else (the default per-token dynamic ones): both are
declared in ``online_ops`` (so export refuses) unless ``softmax_bits`` is 16 and the scheme's activations
are static per-tensor asymmetric. The fake-quant checkpoint ``save_pretrained`` writes holds the folded
norms and the quantized folded weights but, as for the KV quantizers, no activation or softmax quantizer.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..arch.base import ArchMapping, SmoothPair
from ..config import QuantArgs
from ..errors import ConfigError
from ..quant.attention import AttentionQuantizer, enable_attention_quantization
from ..quant.dualclip import ChannelDualClipQuantizer, fold_linear, fold_norm
from ..quant.log import LogSqrt2Quantizer, reparam_dequant
from ..quant.observers import MinMaxObserver
from ..quant.primitives import fake_quant
from ..quant.quantizers import QuantLinear, UniformQuantizer, quantization_disabled
from ..transforms.base import add_param, original
from . import register_method
from .learned import LearnedMethod, LearnedOptions, observe_inputs

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


def weights_in_full_precision(block: nn.Module):
    """Weight quantizers off (activation quantizers untouched)."""
    return quantization_disabled(block, weights_only=True)

def quantized_weight(quantizer: UniformQuantizer, w: torch.Tensor) -> torch.Tensor:
    """``w [out, in]`` fake-quantized on ``quantizer``'s grid with its current clipping, whether or not the
    quantizer is enabled (differentiable in ``w`` and the clipping factors)."""
    rows = quantizer.rows(w)
    scale, zp = quantizer.qparams(rows)
    return fake_quant(rows, scale, zp, quantizer.qmin, quantizer.qmax).reshape(w.shape)


@contextlib.contextmanager
def calibration_view(block: nn.Module, mapping: ArchMapping) -> Iterator[None]:
    """While calibrating, show every norm-fed linear its post-reparameterization weights in per-channel
    coordinates: weight ``Q(W diag(r)) diag(1/r)``, bias ``b + (Q(W') - W') o`` (``r, o`` from the
    current clips, ``Q`` its own weight quantizer, which is bypassed meanwhile). With this view the
    per-channel block computes exactly what the reparameterized block will."""
    touched: list[tuple[nn.Module, UniformQuantizer]] = []
    for pair in norm_pairs(mapping):
        for path in pair.nexts:
            lin = block.get_submodule(path)
            q, wq = lin.input_quantizer, lin.weight_quantizer
            if not isinstance(q, ChannelDualClipQuantizer) or q.mode != "learn" or wq is None:
                continue

            def weight(w: torch.Tensor, q=q, wq=wq) -> torch.Tensor:
                r = q.reparam_terms()[0][None, :]
                w_new = (w.double() * r).to(w.dtype)  # W' exactly as the fold will write it
                return (quantized_weight(wq, w_new).double() / r).to(w.dtype)

            add_param(lin, "weight", weight)
            if lin.bias is not None and not q.shared_zero_point:
                def bias(b: torch.Tensor, q=q, wq=wq, lin=lin) -> torch.Tensor:
                    r, o = q.reparam_terms()
                    w_new = (original(lin, "weight").double() * r[None, :]).to(b.dtype)
                    return (b.double() + (quantized_weight(wq, w_new) - w_new).double() @ o).to(b.dtype)

                add_param(lin, "bias", bias)
            wq.enabled = False
            touched.append((lin, wq))
    try:
        yield
    finally:
        for lin, wq in touched:
            for name in ("weight", "bias"):
                if parametrize.is_parametrized(lin, name):
                    parametrize.remove_parametrizations(lin, name, leave_parametrized=False)
            wq.enabled = True


def norm_pairs(mapping: ArchMapping) -> tuple[SmoothPair, ...]:
    """``norm -> linears`` pairs of a block (attention norm -> q/k/v, MLP norm -> MLP input linears)."""
    return tuple(p for p in mapping.smooth_pairs() if p.kind == "norm")


def per_channel_offsets_possible(block: nn.Module, pair: SmoothPair, mapping: ArchMapping) -> bool:
    """Zero-point offsets fold only into a LayerNorm with a bias whose next linears all have biases, and
    whose output is never zero-padded before them (``mapping.padded_norms``)."""
    norm = block.get_submodule(pair.prev)
    linears = [block.get_submodule(n) for n in pair.nexts]
    return (mapping.norm_kind == "layer" and pair.prev not in mapping.padded_norms
            and getattr(norm, "bias", None) is not None
            and all(getattr(lin, "bias", None) is not None for lin in linears))


@dataclass
class RepQuantOptions(LearnedOptions):
    """``softmax_bits``: bits of the log√2 softmax quantizer (``None``: the activation bits; 16: off)."""

    softmax_bits: int | None = None

    def __post_init__(self) -> None:
        if self.softmax_bits is not None and not 2 <= self.softmax_bits <= 16:
            raise ConfigError(f"options.softmax_bits must be in [2, 16], got {self.softmax_bits}")


@register_method("repquant")
class RepQuant(LearnedMethod):
    """RepQuant: per-channel dual-clip activation quantization and log√2 softmax while calibrating,
    reparameterized exactly to per-tensor / log2-shift inference (see module docstring)."""

    Options: ClassVar[type] = RepQuantOptions
    roundings: ClassVar[tuple[str, ...]] = ("rtn",)
    supports_tta: ClassVar[bool] = False  # its block step reparameterizes the block
    default_lr: ClassVar[dict[str, float]] = {**LearnedMethod.default_lr, "clip": 1e-1}

    @classmethod
    def export_problem(cls, recipe) -> str | None:
        acts = recipe.scheme.input_activations
        if acts is None:
            return None
        bits = recipe.options.get("softmax_bits") or acts.num_bits
        if bits < 16:
            return (f"RepQuant's {bits}-bit log2 softmax quantizer has no place in an exported checkpoint "
                    "(--option softmax_bits=16 keeps the softmax in full precision)")
        static = QuantArgs(acts.num_bits, symmetric=False, strategy="tensor", dynamic=False)
        if acts != static:
            return (f"RepQuant ends with static per-tensor inputs ({static.describe()}), which the scheme's "
                    f"activations ({acts.describe()}) cannot declare in an exported checkpoint")
        return None

    def __init__(self, recipe) -> None:
        super().__init__(recipe)
        acts = self.scheme.input_activations
        self.act_bits = acts.num_bits if acts is not None else None
        bits = self.opts.softmax_bits if self.opts.softmax_bits is not None else self.act_bits
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
        ``scale``) and frozen weights; what is not a tensor: the quantizers' sharing, the softmax form."""
        self.unshare_inputs(ctx)
        self.to_shift_form(ctx.block)
        self.declare_online(ctx)

    def declare_online(self, ctx: BlockContext) -> None:
        """Record what a compressed-tensors checkpoint of this scheme cannot express (export refuses it):
        the softmax quantizer, and per-tensor static inputs where the scheme's activations differ."""
        if self.softmax_bits is not None:
            self.online_ops.append(f"{ctx.name}.{ctx.mapping.attention}: {self.softmax_bits}-bit log2-shift "
                                   "softmax quantizer")
        acts = self.scheme.input_activations
        for pair in norm_pairs(ctx.mapping):
            q = ctx.block.get_submodule(pair.nexts[0]).input_quantizer
            if isinstance(q, ChannelDualClipQuantizer) and q.args != acts:
                self.online_ops.append(f"{ctx.name}.{pair.prev} -> {', '.join(pair.nexts)}: static per-tensor "
                                       f"inputs {q.args.describe()} (scheme: {acts.describe()})")

    # ---- steps -------------------------------------------------------------------------------------
    @staticmethod
    def clip_quantizers(block: nn.Module) -> list[ChannelDualClipQuantizer]:
        """The dual-clip quantizers of ``block``, each once (while calibrating: one per norm pair)."""
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
        observers = {id(q): MinMaxObserver() for q in quantizers}

        def hook(module: nn.Module, args: tuple) -> None:
            observers[id(module)].update(args[0].float())

        observe_inputs(ctx, [(q, hook) for q in quantizers], ctx.q_in, full_precision(ctx.block))
        for q in quantizers:
            q.set_range(observers[id(q)].min, observers[id(q)].max)

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
        self.unshare_inputs(ctx)

    @staticmethod
    def unshare_inputs(ctx: BlockContext) -> None:
        """Give each norm-fed linear its own copy of the (now static, per-tensor) input quantizer, so every
        linear owns its ``input_scale`` tensor (safetensors refuses tensors shared between names)."""
        for pair in norm_pairs(ctx.mapping):
            first = ctx.block.get_submodule(pair.nexts[0]).input_quantizer
            if not isinstance(first, ChannelDualClipQuantizer) or first.mode != "static":
                continue
            for path in pair.nexts[1:]:
                lin = ctx.block.get_submodule(path)
                if lin.input_quantizer is first:
                    lin.input_quantizer = copy.deepcopy(first)

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

    def quantize_block(self, ctx: BlockContext) -> None:
        targets = self.targets(ctx)
        for p in ctx.block.parameters():
            p.requires_grad_(False)
        quantizers = self.clip_quantizers(ctx.block)
        if quantizers:
            self.init_clips(ctx)
        groups = []
        clip = [p for q in quantizers for p in (q.clip_lower, q.clip_upper)]
        if clip:
            groups.append({"params": clip, "lr": self.lr["clip"], "name": "clip"})
        lwc = [p for m in ctx.block.modules() if isinstance(m, UniformQuantizer)
               for p in m.learnable().get("lwc", [])] if self.recipe.clip.learn else []
        if lwc:
            groups.append({"params": lwc, "lr": self.lr["lwc"], "name": "lwc"})
        with calibration_view(ctx.block, ctx.mapping):
            ctx.report.init_loss, ctx.report.final_loss = self.fit(ctx, targets, groups)
            with torch.no_grad():
                before = ctx.forward(ctx.q_in[:1])
        if quantizers:
            self.reparameterize(ctx)
            with torch.no_grad():
                change = float((ctx.forward(ctx.q_in[:1]) - before).abs().max())
            ctx.report.notes.append(f"reparameterization: max |output change| {change:.3g}")
        self.freeze_weights(ctx.block)
        self.to_shift_form(ctx.block)
        self.calibrate_static(ctx)
        self.declare_online(ctx)


__all__ = [
    "Log2ShiftQuantizer", "RepQuant", "calibration_view", "full_precision", "norm_pairs",
    "per_channel_offsets_possible", "quantized_weight", "weights_in_full_precision",
]
