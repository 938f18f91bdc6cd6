"""The method interface the engine drives (see :mod:`lrquant.engine`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from ..arch.base import ArchMapping, set_submodule
from ..config import Recipe, typed
from ..errors import ConfigError
from ..quant.attention import AttentionQuantizer, enable_attention_quantization
from ..quant.quantizers import QuantLinear, UniformQuantizer, quant_linears

if TYPE_CHECKING:
    from ..engine import BlockContext


@dataclass
class NoOptions:
    """A preset without options of its own."""


class Method:
    """Base class: wraps the mapped linears in :class:`QuantLinear` and attaches attention quantizers.

    A method is a *preset*: :meth:`expand` checks the recipe's ``options`` against the method's typed
    ``Options`` and fills what the recipe leaves to the preset (``None`` in ``clip``/``loss``). Hooks, in
    the order the engine calls them: :meth:`prepare_model` (once), then per block :meth:`prepare_block`
    (structure only, also used when resuming), :meth:`quantize_block` (or :meth:`restore_block` when the
    block comes from a checkpoint), and :meth:`finalize_model` at the end.
    """

    name: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    #: preset values of ``recipe.clip.learn`` and of the ``recipe.loss`` weights
    uses_lwc: ClassVar[bool] = False
    loss_preset: ClassVar[dict[str, float]] = {"mse": 1.0, "nlc": 0.0, "q_target": 0.0}
    #: rounding kinds this method can run (``learned`` needs the block-training loop)
    roundings: ClassVar[tuple[str, ...]] = ("rtn", "gptq")
    #: whether the engine must propagate the full-precision stream (targets, statistics); without it
    #: only the quantized stream runs, which halves the cost of a method that learns nothing
    needs_fp_stream: bool = True
    #: whether the ``tta`` post-step can continue this method's block training (see :mod:`lrquant.tta`)
    supports_tta: ClassVar[bool] = False

    def __init__(self, recipe: Recipe) -> None:
        self.recipe = recipe
        self.scheme = recipe.scheme
        self.opts = self.Options(**recipe.options)

    # ---- the preset ------------------------------------------------------------------------------
    @classmethod
    def expand(cls, recipe: Recipe) -> None:
        """Validate ``recipe.options`` (typed, unknown keys refused) and resolve the preset's defaults
        in place, so ``recipe.to_dict()`` is the complete recipe as run."""
        opts = typed(cls.Options, recipe.options, f"options of method {cls.name}")
        recipe.options = asdict(opts)
        if recipe.clip.learn is None:
            recipe.clip.learn = cls.uses_lwc
        for key, value in cls.loss_preset.items():
            if getattr(recipe.loss, key) is None:
                setattr(recipe.loss, key, value)
        from .rounding import get_rounding

        get_rounding(recipe.rounding.kind)  # unknown kinds: the registered ones are listed
        if recipe.rounding.kind not in cls.roundings:
            raise ConfigError(f"rounding.kind {recipe.rounding.kind!r} is not available with method {cls.name} "
                              f"(available: {', '.join(cls.roundings)})")
        if recipe.tta is not None and not cls.supports_tta:
            raise ConfigError(f"test-time adaptation continues a learned method's block training; {cls.name} "
                              "cannot (use omniquant, affinequant, lrquant or lrquant_plus)")
        if recipe.clip.learn and not cls.uses_lwc:
            raise ConfigError(f"clip.learn needs a learned method; {cls.name} trains nothing")

    # ---- hooks -----------------------------------------------------------------------------------
    def prepare_model(self, model: nn.Module, mapping: ArchMapping, calib: Any) -> None:
        if self.scheme.kv_cache is not None:
            enable_attention_quantization(model)

    def prepare_block(self, ctx: BlockContext) -> None:
        for path in ctx.mapping.linears():
            linear = ctx.block.get_submodule(path)
            if not isinstance(linear, QuantLinear):
                set_submodule(ctx.block, path, QuantLinear(
                    linear, self.scheme.weights, self.scheme.input_activations, lwc=self.clip_params,
                    lwc_init=self.recipe.clip.logit))
        if self.scheme.kv_cache is not None:
            attn = ctx.block.get_submodule(ctx.mapping.attention)
            attn.attn_quantizer = AttentionQuantizer(self.scheme.kv_cache)

    def quantize_block(self, ctx: BlockContext) -> None:
        raise NotImplementedError

    def restore_block(self, ctx: BlockContext) -> None:
        """The block's tensors were just loaded from a checkpoint; fix up any non-tensor state."""

    def finalize_model(self, model: nn.Module, mapping: ArchMapping) -> None:
        """Called once after the last block."""

    @classmethod
    def export_problem(cls, recipe: Recipe) -> str | None:
        """Why a real low-bit checkpoint could not hold what this preset leaves in the model (checked
        before any work when an export is asked for), or ``None``."""
        return None

    @property
    def clip_params(self) -> bool:
        """Whether the weight quantizers carry clipping factors (learned, or searched once)."""
        return bool(self.recipe.clip.learn) or self.recipe.clip.init != "max"

    # ---- shared steps ----------------------------------------------------------------------------
    def init_clipping(self, ctx: BlockContext) -> None:
        """``clip.init: mse``: set every weight quantizer's clipping factors by grid search."""
        if self.recipe.clip.init == "mse":
            from ..quant.clipping import init_clip_mse

            for linear in quant_linears(ctx.block).values():
                if linear.weight_quantizer is not None and not linear.weight_frozen:
                    init_clip_mse(linear.weight_quantizer, linear.weight.detach(), self.recipe.clip)

    def round_weights(self, ctx: BlockContext) -> None:
        """The rounding stage, then every weight frozen on its grid (see :mod:`lrquant.methods.rounding`)."""
        from .rounding import get_rounding

        get_rounding(self.recipe.rounding.kind)(ctx, self.recipe.rounding)
        self.freeze_weights(ctx.block)

    @staticmethod
    def freeze_weights(block: nn.Module) -> None:
        for linear in quant_linears(block).values():
            linear.freeze()

    @staticmethod
    @torch.no_grad()
    def calibrate_static(ctx: BlockContext) -> None:
        """Observe the quantized stream through the block, then freeze every static quantizer."""
        observers = [m for m in ctx.block.modules() if isinstance(m, UniformQuantizer) and m.mode == "observe"]
        if not observers:
            return
        for idx in ctx.batches(1, shuffle=False):
            ctx.forward(ctx.q_in[idx])
        for q in observers:
            q.freeze()
