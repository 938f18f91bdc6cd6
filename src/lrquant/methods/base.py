"""The method interface the engine drives (see :mod:`lrquant.engine`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from ..arch.base import ArchMapping, set_submodule
from ..config import Recipe
from ..quant.attention import AttentionQuantizer, enable_attention_quantization
from ..quant.quantizers import QuantLinear, UniformQuantizer, quant_linears

if TYPE_CHECKING:
    from ..engine import BlockContext


class Method:
    """Base class: wraps the mapped linears in :class:`QuantLinear` and attaches attention quantizers.

    Hooks, in the order the engine calls them: :meth:`prepare_model` (once), then per block
    :meth:`prepare_block` (structure only, also used when resuming), :meth:`quantize_block` (or
    :meth:`restore_block` when the block comes from a checkpoint), and :meth:`finalize_model` at the end.
    """

    name: ClassVar[str] = ""
    uses_lwc: ClassVar[bool] = False

    def __init__(self, recipe: Recipe) -> None:
        self.recipe = recipe
        self.scheme = recipe.scheme

    # ---- hooks -----------------------------------------------------------------------------------
    def prepare_model(self, model: nn.Module, mapping: ArchMapping, calib: Any) -> None:
        if self.scheme.kv_cache is not None:
            enable_attention_quantization(model)

    def prepare_block(self, ctx: BlockContext) -> None:
        for path in ctx.mapping.linears():
            linear = ctx.block.get_submodule(path)
            if not isinstance(linear, QuantLinear):
                set_submodule(ctx.block, path, QuantLinear(
                    linear, self.scheme.weights, self.scheme.input_activations, lwc=self.uses_lwc))
        if self.scheme.kv_cache is not None:
            attn = ctx.block.get_submodule(ctx.mapping.attention)
            attn.attn_quantizer = AttentionQuantizer(self.scheme.kv_cache)

    def quantize_block(self, ctx: BlockContext) -> None:
        raise NotImplementedError

    def restore_block(self, ctx: BlockContext) -> None:
        """The block's tensors were just loaded from a checkpoint; fix up any non-tensor state."""

    def finalize_model(self, model: nn.Module, mapping: ArchMapping) -> None:
        """Called once after the last block."""

    # ---- shared steps ----------------------------------------------------------------------------
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
