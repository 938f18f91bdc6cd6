"""RTN: round-to-nearest min-max quantization, no training (the baseline every method must beat)."""

from __future__ import annotations

from torch import nn

from ..arch.base import get_mapping, set_submodule
from ..config import Scheme
from ..quant.quantizers import QuantLinear
from . import register_method
from .base import Method


def quantize_weights_rtn(model: nn.Module, scheme: Scheme) -> nn.Module:
    """RTN without calibration data or the engine: every mapped linear of every block becomes a frozen
    :class:`QuantLinear` (weights on their min-max grid; dynamic activation quantizers need no data).
    For static activations or KV quantization use :func:`lrquant.quantize` with method ``rtn``."""
    mapping = get_mapping(model)
    for _, block in mapping.block_list(model):
        for path in mapping.linears():
            ql = QuantLinear(block.get_submodule(path), scheme.weights, scheme.input_activations)
            ql.freeze()
            set_submodule(block, path, ql)
    return model


@register_method("rtn")
class RTN(Method):
    """Freeze every weight on its grid (min-max, or the ``clip.init: mse`` search), through the recipe's
    rounding stage (``rounding.kind: gptq`` makes this GPTQ); calibrate static activation quantizers.

    GPTQ needs only the quantized stream, so with it the full-precision stream is not run (half the
    calibration time; the per-block output error is then not reported). Plain RTN keeps it: its
    per-block error is the baseline the other methods are judged against."""

    @property
    def needs_fp_stream(self) -> bool:
        return self.recipe.rounding.kind != "gptq"

    def quantize_block(self, ctx) -> None:
        self.init_clipping(ctx)
        self.round_weights(ctx)
        self.calibrate_static(ctx)
