"""Per-channel activation quantization with learnable dual clipping, and its exact reparameterization
into per-tensor quantization (RepQuant / RepQ-ViT).

Calibration form. A post-norm activation ``x [..., C]`` is quantized per channel on the asymmetric grid
``[0, Q]`` (``Q = 2^b - 1``) with a lower and an upper clipping factor per channel::

    lo_c = min(m_c, 0) * sigmoid(theta_lo_c)      hi_c = max(M_c, 0) * sigmoid(theta_hi_c)
    scale_c = (hi_c - lo_c) / Q                  zp_c = clamp(-round(lo_c / scale_c), 0, Q)
    x_hat_c = scale_c * (clamp(round(x_c / scale_c) + zp_c, 0, Q) - zp_c)

``m_c, M_c`` are the per-channel min/max observed on calibration data; the factors are sigmoid-bounded
in (0, 1) (a clip only shrinks the observed range) and start at ``sigmoid(4) ~ 0.982`` as OmniQuant's
weight clipping. Rounding goes through :func:`~lrquant.quant.primitives.round_ste`, so both factors get
gradients (through the scale and, for the lower one, the zero point).

Reparameterization. Pick one per-tensor pair ``(s, z)`` (here ``s = mean(scale_c)``,
``z = round(mean(zp_c))``; any choice is exact, it only changes how large the folded weights get) and set
``r_c = scale_c / s`` and ``o_c = s * (zp_c - z)``. With ``x'_c = x_c / r_c + o_c``::

    x'_c / s = x_c / scale_c + (zp_c - z)           (zp_c - z is an integer)
    round(x'_c / s) + z = round(x_c / scale_c) + zp_c  =>  same integer codes q_c, same clamp [0, Q]
    x_hat_c = scale_c (q_c - zp_c) = r_c * (s (q_c - z) - o_c) = r_c * (x_hat'_c - o_c)

so the next linear ``y = W x_hat + b`` equals ``W' x_hat' + b'`` with ``W' = W diag(r)`` and
``b' = b - W' o``, and the norm that produces ``x = gamma * n + beta`` produces ``x'`` with
``gamma' = gamma / r`` and ``beta' = beta / r + o``. Per-tensor quantization of ``x'`` then gives exactly
the per-channel result (up to floating-point rounding of the folded tensors; a value within one ulp of a
rounding boundary can land on the neighbouring code).

Norms without a bias (RMSNorm) cannot produce the offset ``o``: it has to be added *before* the quantizer,
so a bias on the next linear cannot stand in for it. There the quantizer runs with one shared integer zero
point ``z`` for all channels (``shared_zero_point=True``; ``o = 0``): each channel keeps its own scale
``scale_c = max(hi_c / (Q - z), -lo_c / z)`` (the smallest grid with that zero point covering both clipped
bounds) and only ``r`` is folded, into the norm weight and the linear columns. The same holds when the
norm has a bias but some next linear does not (``b' = b - W' o`` needs a bias to exist).
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import QuantArgs
from ..errors import ConfigError
from .primitives import SCALE_EPS, fake_quant, qparams_from_range
from .quantizers import UniformQuantizer

CLIP_INIT = 4.0  # sigmoid(4) ~ 0.982, as OmniQuant's LWC


# ---- pure functions ------------------------------------------------------------------------------------
def shared_zero_point_scales(
    lo: torch.Tensor, hi: torch.Tensor, zero_point: int, qmax: int
) -> torch.Tensor:
    """Per-channel scales ``[C]`` for a grid ``[0, qmax]`` whose zero point is the integer ``zero_point`` for
    every channel: the smallest scale with ``-zero_point * s <= lo`` and ``(qmax - zero_point) * s >= hi``.

    ``lo <= 0 <= hi``: ``[C]``. A side with no grid room (``zero_point == 0`` or ``== qmax``) is clipped.
    """
    up = hi / (qmax - zero_point) if zero_point < qmax else torch.zeros_like(hi)
    down = -lo / zero_point if zero_point > 0 else torch.zeros_like(lo)
    return torch.maximum(up, down).clamp_min(SCALE_EPS)


def per_tensor_qparams(scale: torch.Tensor, zero_point: torch.Tensor, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-tensor pair a per-channel quantizer is reparameterized to: ``s = mean(scale)``,
    ``z = clamp(round(mean(zero_point)), 0, qmax)``. ``scale, zero_point: [C]`` -> two scalars."""
    return scale.mean(), zero_point.mean().round().clamp(0, qmax)


def reparam_factors(
    scale: torch.Tensor, zero_point: torch.Tensor, s: torch.Tensor, z: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``r = scale / s`` and ``offset = s * (zero_point - z)``, both ``[C]`` (see module docstring)."""
    return scale / s, s * (zero_point - z)


def fold_norm(
    weight: torch.Tensor, bias: torch.Tensor | None, r: torch.Tensor, offset: torch.Tensor,
    plus_one: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Make a norm emit ``x / r + offset`` instead of ``x``: ``gamma / r``, ``beta / r + offset``.

    ``weight, bias, r, offset: [C]``. ``plus_one``: the norm scales by ``1 + weight`` (Gemma), the stored
    weight becomes ``(1 + w) / r - 1``. Raises :class:`ConfigError` for a nonzero offset without a bias.
    """
    w = (1 + weight) / r - 1 if plus_one else weight / r
    if bias is None:
        if bool((offset != 0).any()):
            raise ConfigError("a per-channel zero-point offset needs a norm bias (use a shared zero point)")
        return w, None
    return w, bias / r + offset


def fold_linear(
    weight: torch.Tensor, bias: torch.Tensor | None, r: torch.Tensor, offset: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The linear that consumed ``x`` now consumes ``x / r + offset``: ``W' = W diag(r)``,
    ``b' = b - W' offset``. ``weight: [O, C]``, ``bias: [O]``, ``r, offset: [C]``."""
    w = weight * r[None, :]
    if bias is None:
        if bool((offset != 0).any()):
            raise ConfigError("a per-channel zero-point offset needs a bias on every next linear")
        return w, None
    return w, bias - w @ offset


# ---- the quantizer --------------------------------------------------------------------------------------
class ChannelDualClipQuantizer(UniformQuantizer):
    """Per-channel asymmetric activation quantizer ``[..., C]`` with learnable dual clipping.

    States (``mode``):

    * ``unset`` — built, no range yet (:meth:`set_range` gives it one);
    * ``learn`` — per-channel static grid from the observed range and the clip logits ``clip_lower`` /
      ``clip_upper`` (``[C]`` parameters, the only trainable tensors);
    * ``static`` — after :meth:`to_per_tensor`: an ordinary frozen per-tensor :class:`UniformQuantizer`
      (``scale``, ``zero_point``: ``[1, 1]``, args ``tensor``/asymmetric/static), the learned state dropped.

    It is a :class:`UniformQuantizer` so :func:`~lrquant.quant.quantizers.quantization_disabled`, the
    checkpoint loader and the exporters treat it like any activation quantizer; ``mode`` is never
    ``observe``, so ``Method.calibrate_static`` leaves it alone. While calibrating, one instance is shared by
    every linear the norm feeds (the reparameterization changes their common input); once static, RepQuant
    gives each linear its own copy.
    """

    def __init__(self, num_bits: int, channels: int, shared_zero_point: bool = False) -> None:
        super().__init__(QuantArgs(num_bits, symmetric=False, strategy="tensor", dynamic=False), per_input=False)
        self.channels = channels
        self.shared_zero_point = shared_zero_point
        self.clip_lower: nn.Parameter | None = None
        self.clip_upper: nn.Parameter | None = None
        self.fixed_zero_point: int | None = None
        self.register_buffer("chan_min", None, persistent=False)
        self.register_buffer("chan_max", None, persistent=False)

    @property
    def mode(self) -> str:
        if self.scale is not None:
            return "static"
        return "learn" if self.chan_min is not None else "unset"

    @torch.no_grad()
    def set_range(self, xmin: torch.Tensor, xmax: torch.Tensor, init: float = CLIP_INIT) -> None:
        """Observed per-channel range ``xmin, xmax: [C]``; (re)creates the clip logits at ``init``."""
        if xmin.shape != (self.channels,) or xmax.shape != (self.channels,):
            raise ConfigError(f"expected ranges of shape [{self.channels}], got {tuple(xmin.shape)}")
        self.chan_min = xmin.detach().float().clamp(max=0.0)
        self.chan_max = xmax.detach().float().clamp(min=0.0)
        self.clip_lower = nn.Parameter(torch.full_like(self.chan_min, float(init)))
        self.clip_upper = nn.Parameter(torch.full_like(self.chan_max, float(init)))
        self.fixed_zero_point = None
        if self.shared_zero_point:
            _, zp = qparams_from_range(*self.clipped_range(), 0, self.qmax, symmetric=False)
            self.fixed_zero_point = int(zp.mean().round().clamp(0, self.qmax))

    def clipped_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``lo, hi: [C]`` = observed range times ``sigmoid`` of the clip logits (differentiable)."""
        return self.chan_min * torch.sigmoid(self.clip_lower), self.chan_max * torch.sigmoid(self.clip_upper)

    def channel_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``scale, zero_point: [C]`` of the calibration-time per-channel grid (differentiable)."""
        if self.mode != "learn":
            raise ConfigError(f"channel_qparams needs a calibrating quantizer, this one is {self.mode}")
        lo, hi = self.clipped_range()
        if self.fixed_zero_point is not None:
            scale = shared_zero_point_scales(lo, hi, self.fixed_zero_point, self.qmax)
            return scale, torch.full_like(scale, float(self.fixed_zero_point))
        return qparams_from_range(lo, hi, 0, self.qmax, symmetric=False)

    def _per_tensor(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``scale, zero_point [C]`` and the per-tensor ``s, z`` in float64 (differentiable); ``s`` is rounded
        to float32, the dtype the inference quantizer stores it in, so folds use exactly that value."""
        scale, zp = (t.double() for t in self.channel_qparams())
        s, z = per_tensor_qparams(scale, zp, self.qmax)
        return scale, zp, s.float().double(), z

    def reparam_terms(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``r, offset: [C]`` (float64) the reparameterization would fold now, differentiable in the clips:
        lets a calibration loop see the weights it will produce, ``W diag(r)``."""
        scale, zp, s, z = self._per_tensor()
        return reparam_factors(scale, zp, s, z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled or self.mode == "static":
            return super().forward(x)
        if self.mode == "unset":
            raise ConfigError("ChannelDualClipQuantizer has no range yet; call set_range() first")
        scale, zp = self.channel_qparams()
        return fake_quant(x, scale.to(x.dtype), zp.to(x.dtype), self.qmin, self.qmax)

    @torch.no_grad()
    def to_per_tensor(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Switch to the per-tensor inference form; returns ``r, offset: [C]`` (float64, the same values as
        :meth:`reparam_terms`) to fold into the producing norm and the consuming linears
        (:func:`fold_norm`, :func:`fold_linear`)."""
        scale, zp, s, z = self._per_tensor()
        r, offset = reparam_factors(scale, zp, s, z)
        self.scale = s.float().reshape(1, 1)
        self.zero_point = z.float().reshape(1, 1)
        self.clip_lower = self.clip_upper = None
        self.chan_min = self.chan_max = None
        self.fixed_zero_point = None
        return r, offset

    def extra_repr(self) -> str:
        if self.mode == "static":
            return f"{self.args.describe()}, mode=static (reparameterized from per-channel)"
        return (f"{self.args.num_bits}b-channel-asym, channels={self.channels}, "
                f"shared_zero_point={self.shared_zero_point}, mode={self.mode}")


__all__ = [
    "ChannelDualClipQuantizer",
    "fold_linear",
    "fold_norm",
    "per_tensor_qparams",
    "reparam_factors",
    "shared_zero_point_scales",
]
