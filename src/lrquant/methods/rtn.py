"""RTN: round-to-nearest min-max quantization, no training (the baseline every method must beat)."""

from __future__ import annotations

from . import register_method
from .base import Method


@register_method("rtn")
class RTN(Method):
    """Freeze every weight at its min-max grid; calibrate static activation quantizers if any."""

    def quantize_block(self, ctx) -> None:
        self.freeze_weights(ctx.block)
        self.calibrate_static(ctx)
