"""Logarithmic quantizers for attention probabilities (softmax outputs in [0, 1]).

Codes are non-negative integers ``c in [0, 2^b - 1]``; the largest code ``2^b - 1`` means exactly 0 (so a
zero probability, and everything below the smallest level, is representable):

* log2: ``c = round(-log2(p / scale))``, value ``2^(-c) * scale``;
* log√2: ``c = round(-2 * log2(p / scale))``, value ``2^(-c/2) * scale`` (twice the resolution of log2).

Codes are clamped to ``[0, 2^b - 1]``: ``p > scale`` saturates at code 0 (value ``scale``), tiny ``p``
and ``p <= 0`` get the zero code. The rounding goes through :func:`~lrquant.quant.primitives.round_ste`,
so the fake-quantizers pass gradients straight through inside the grid (zero in the clipped regions).

Reparameterisation (RepQ-ViT): a log√2 value equals an integer shift with one constant correction on
odd codes, ``2^(-c/2) = 2^(-floor(c/2)) * (1 if c even else 1/√2)``, so log√2 attention can run on
log2 (shift) hardware: ``P @ V = Σ_even 2^(-s) V + (1/√2) Σ_odd 2^(-s) V``.
:func:`reparam_log_sqrt2_to_log2` gives that form; :func:`reparam_dequant` evaluates it and equals
:func:`log_sqrt2_fake_quant` bit for bit.

Grid values ``2^(-c)`` / ``2^(-c/2)`` are computed in float32 (exact powers of two; ``2^(-c/2)`` for
``c <= 255`` agrees with ``2^(-floor(c/2)) * fl32(1/√2)`` exactly) and then cast to the input's dtype, so
levels below float32's smallest subnormal (8-bit log2 codes >= 150, i.e. probabilities under 1e-45)
dequantize to 0.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import ConfigError
from .primitives import round_ste

MAX_LOG_BITS = 8
_SQRT1_2 = math.sqrt(0.5)


def _check_bits(num_bits: int) -> int:
    """The zero code ``2^b - 1``; raises :class:`ConfigError` outside 2..8 bits."""
    if not 2 <= num_bits <= MAX_LOG_BITS:
        raise ConfigError(f"log quantizers support 2-{MAX_LOG_BITS} bits, got {num_bits}")
    return 2**num_bits - 1


def _log_codes(
    p: torch.Tensor, num_bits: int, scale: torch.Tensor | float, steps_per_octave: int
) -> torch.Tensor:
    """Float codes ``clamp(round(-steps * log2(p / scale)), 0, 2^b - 1)`` with an STE round.

    ``p``: any shape; ``scale``: a positive scalar or a tensor broadcasting against ``p``.
    """
    zero_code = _check_bits(num_bits)
    x = p / scale
    positive = x > 0
    safe = torch.where(positive, x, torch.ones_like(x))  # log2(0) = -inf would poison the gradient
    code = torch.clamp(round_ste(-steps_per_octave * torch.log2(safe)), 0, zero_code)
    return torch.where(positive, code, torch.full_like(code, zero_code))


def log2_codes(p: torch.Tensor, num_bits: int, scale: torch.Tensor | float = 1.0) -> torch.Tensor:
    """Integer log2 codes of ``p`` (int32, same shape, in ``[0, 2^b - 1]``; ``2^b - 1`` means 0)."""
    with torch.no_grad():
        return _log_codes(p, num_bits, scale, 1).to(torch.int32)


def log_sqrt2_codes(p: torch.Tensor, num_bits: int, scale: torch.Tensor | float = 1.0) -> torch.Tensor:
    """Integer log√2 codes of ``p`` (int32, same shape, in ``[0, 2^b - 1]``; ``2^b - 1`` means 0)."""
    with torch.no_grad():
        return _log_codes(p, num_bits, scale, 2).to(torch.int32)


def log2_fake_quant(p: torch.Tensor, num_bits: int, scale: torch.Tensor | float = 1.0) -> torch.Tensor:
    """Quantize-dequantize ``p`` (softmax probabilities, any shape) on the log2 grid ``2^(-c) * scale``."""
    code = _log_codes(p, num_bits, scale, 1)
    value = torch.exp2(-code.float()).to(p.dtype) * scale
    return torch.where(code >= 2**num_bits - 1, torch.zeros_like(value), value)


def log_sqrt2_fake_quant(p: torch.Tensor, num_bits: int, scale: torch.Tensor | float = 1.0) -> torch.Tensor:
    """Quantize-dequantize ``p`` (softmax probabilities, any shape) on the log√2 grid
    ``2^(-c/2) * scale``."""
    code = _log_codes(p, num_bits, scale, 2)
    value = torch.exp2(-code.float() / 2).to(p.dtype) * scale
    return torch.where(code >= 2**num_bits - 1, torch.zeros_like(value), value)


def reparam_log_sqrt2_to_log2(
    codes: torch.Tensor, num_bits: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log√2 codes -> the shift form ``(shift, odd, zero)``, each shaped like ``codes``.

    ``shift = floor(c / 2)`` (int32, a right shift), ``odd`` (bool): the value takes the 1/√2
    correction, ``zero`` (bool): the zero code. Value: ``0 if zero else 2^(-shift) * (1/√2 if odd else 1)``.
    """
    zero_code = _check_bits(num_bits)
    codes = codes.to(torch.int32)
    if codes.numel() and (codes.min() < 0 or codes.max() > zero_code):
        raise ConfigError(f"log-sqrt2 codes must lie in [0, {zero_code}] for {num_bits} bits")
    return torch.div(codes, 2, rounding_mode="floor"), codes % 2 == 1, codes == zero_code


def reparam_dequant(
    shift: torch.Tensor, odd: torch.Tensor, zero: torch.Tensor, scale: torch.Tensor | float = 1.0,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Evaluate the shift form of :func:`reparam_log_sqrt2_to_log2`: ``2^(-shift) * (1/√2 if odd) * scale``
    (an exact ``ldexp``), 0 on the zero code, in ``dtype``."""
    mantissa = torch.ones(odd.shape, dtype=torch.float32, device=odd.device).masked_fill(odd, _SQRT1_2)
    value = torch.ldexp(mantissa, -shift.to(torch.int32)).to(dtype) * scale
    return torch.where(zero, torch.zeros_like(value), value)


class _LogQuantizer(nn.Module):
    """Shared part of the log quantizer modules: bit-width and a positive ``scale`` buffer (default 1, the
    largest softmax probability; :meth:`calibrate` sets it to an observed maximum)."""

    steps_per_octave = 1

    def __init__(self, num_bits: int = 4, scale: float = 1.0) -> None:
        super().__init__()
        _check_bits(num_bits)
        if not scale > 0:
            raise ConfigError(f"log quantizer scale must be positive, got {scale}")
        self.num_bits = num_bits
        self.register_buffer("scale", torch.tensor(float(scale)))

    @torch.no_grad()
    def calibrate(self, p: torch.Tensor) -> None:
        """Set ``scale`` to ``max(p)`` (probabilities seen on calibration data)."""
        peak = float(p.detach().amax())
        if not peak > 0:
            raise ConfigError("log quantizer calibration saw no positive value")
        self.scale.fill_(peak)

    def codes(self, p: torch.Tensor) -> torch.Tensor:
        """Integer codes of ``p`` (int32, same shape)."""
        with torch.no_grad():
            return _log_codes(p, self.num_bits, self.scale.to(p.dtype), self.steps_per_octave).to(torch.int32)

    def extra_repr(self) -> str:
        return f"num_bits={self.num_bits}, scale={float(self.scale):.4g}"


class Log2Quantizer(_LogQuantizer):
    """Fake-quantizes attention probabilities ``p`` (any shape) on the log2 grid."""

    steps_per_octave = 1

    def forward(self, p: torch.Tensor) -> torch.Tensor:
        return log2_fake_quant(p, self.num_bits, self.scale.to(p.dtype))


class LogSqrt2Quantizer(_LogQuantizer):
    """Fake-quantizes attention probabilities ``p`` (any shape) on the log√2 grid."""

    steps_per_octave = 2

    def forward(self, p: torch.Tensor) -> torch.Tensor:
        return log_sqrt2_fake_quant(p, self.num_bits, self.scale.to(p.dtype))

    def shift_form(self, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(shift, odd, zero)`` of :func:`reparam_log_sqrt2_to_log2` for ``p``."""
        return reparam_log_sqrt2_to_log2(self.codes(p), self.num_bits)
