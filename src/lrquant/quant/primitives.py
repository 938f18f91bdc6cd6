"""Pure quantization functions: one convention for every granularity, one straight-through estimator.

Granularity convention (``as_rows``): a tensor is viewed as ``[rows, cols]`` and one (scale, zero point)
pair is computed per row, reducing over the last dimension.

==========  ==============================  ==========================
strategy    input                           rows view
==========  ==============================  ==========================
tensor      any                             ``[1, numel]``
channel     weight ``[out, in]``            ``[out, in]``
group       weight ``[out, in]``            ``[out * in / g, g]``
token       activation ``[..., hidden]``    ``[prod(...), hidden]``
==========  ==============================  ==========================

Integer grid: symmetric ``[-2^(b-1), 2^(b-1) - 1]`` with zero point 0; asymmetric ``[0, 2^b - 1]`` with an
integer zero point. The range always contains 0 (``xmin <= 0 <= xmax``) so the zero point fits the grid.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError

SCALE_EPS = 1e-8


def qrange(num_bits: int, symmetric: bool) -> tuple[int, int]:
    """The integer grid ``(qmin, qmax)``: ``[-2^(b-1), 2^(b-1) - 1]`` symmetric, ``[0, 2^b - 1]`` otherwise."""
    if symmetric:
        return -(2 ** (num_bits - 1)), 2 ** (num_bits - 1) - 1
    return 0, 2**num_bits - 1


def signed_offset(num_bits: int, symmetric: bool) -> int:
    """Our grid minus the signed grid ``[-2^(b-1), 2^(b-1) - 1]``: ``2^(b-1)`` asymmetric, 0 symmetric.

    Subtracting it maps our codes (and integer zero points) onto the signed grid that int8 kernels and
    compressed-tensors use; adding it maps them back."""
    return 0 if symmetric else 2 ** (num_bits - 1)


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round in the forward pass, identity gradient in the backward pass (the one STE helper)."""
    return (x.round() - x).detach() + x


def as_rows(x: torch.Tensor, strategy: str, group_size: int | None = None) -> torch.Tensor:
    """View ``x`` as ``[rows, cols]`` so that each row gets its own quantization parameters."""
    if strategy == "tensor":
        return x.reshape(1, -1)
    if strategy in ("channel", "token"):
        return x.reshape(-1, x.shape[-1])
    if strategy == "group":
        if group_size is None or x.shape[-1] % group_size != 0:
            raise ConfigError(f"group_size {group_size} does not divide the input dimension {x.shape[-1]}")
        return x.reshape(-1, group_size)
    raise ConfigError(f"unknown strategy {strategy!r}")


def qparams_from_range(
    xmin: torch.Tensor, xmax: torch.Tensor, qmin: int, qmax: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point for a range. ``xmin, xmax: [rows, 1]`` -> ``scale, zero_point: [rows, 1]``.

    The zero point is returned as a float tensor holding an integer (rounded with the STE so clipping
    factors that move ``xmin`` still get gradients, as in OmniQuant's LWC).
    """
    xmin = torch.clamp(xmin, max=0.0)
    xmax = torch.clamp(xmax, min=0.0)
    if symmetric:
        absmax = torch.maximum(-xmin, xmax)
        scale = torch.clamp(absmax / qmax, min=SCALE_EPS)
        return scale, torch.zeros_like(scale)
    scale = torch.clamp((xmax - xmin) / (qmax - qmin), min=SCALE_EPS)
    zero_point = torch.clamp(qmin - round_ste(xmin / scale), qmin, qmax)
    return scale, zero_point


def minmax_qparams(
    rows: torch.Tensor, qmin: int, qmax: int, symmetric: bool, clip_min: torch.Tensor | float = 1.0,
    clip_max: torch.Tensor | float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row min-max parameters, optionally shrunk by clipping factors in (0, 1].

    ``rows: [R, C]``; ``clip_min, clip_max``: scalars or ``[R, 1]`` -> ``scale, zero_point: [R, 1]``.
    """
    xmin = rows.amin(dim=-1, keepdim=True) * clip_min
    xmax = rows.amax(dim=-1, keepdim=True) * clip_max
    return qparams_from_range(xmin, xmax, qmin, qmax, symmetric)


def fake_quant(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
    offset: torch.Tensor | None = None,
) -> torch.Tensor:
    """Quantize then dequantize, differentiable through :func:`round_ste`. Shapes broadcast.

    ``offset`` (learned rounding, same shape as ``x``, values in ``[-0.5, 0.5]``) is added before rounding,
    so each element may round the other way (SignRound)."""
    y = x / scale if offset is None else x / scale + offset
    q = torch.clamp(round_ste(y) + zero_point, qmin, qmax)
    return (q - zero_point) * scale


def quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """Integer codes (int32) in ``[qmin, qmax]``. Shapes broadcast."""
    return torch.clamp(torch.round(x / scale) + zero_point, qmin, qmax).to(torch.int32)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`quantize` on the grid: ``(q - zero_point) * scale``."""
    return (q.to(scale.dtype) - zero_point) * scale


def fake_quant_rows(
    x: torch.Tensor, num_bits: int, symmetric: bool, strategy: str, group_size: int | None = None
) -> torch.Tensor:
    """Round-to-nearest min-max fake quantization of ``x`` at one granularity (same shape out)."""
    qmin, qmax = qrange(num_bits, symmetric)
    rows = as_rows(x, strategy, group_size)
    scale, zp = minmax_qparams(rows, qmin, qmax, symmetric)
    return fake_quant(rows, scale, zp, qmin, qmax).reshape(x.shape)


def pack_int32(q: torch.Tensor, num_bits: int) -> torch.Tensor:
    """Pack unsigned codes ``q: [..., n]`` (values in ``[0, 2^b)``) into int32 words along the last dim.

    ``32 // num_bits`` codes per word, lowest bits first; ``n`` is padded with zeros to a whole word.
    Returns ``[..., ceil(n / (32 // b))]`` int32.
    """
    per_word = 32 // num_bits
    n = q.shape[-1]
    pad = (-n) % per_word
    q = torch.nn.functional.pad(q.to(torch.int64), (0, pad)).reshape(*q.shape[:-1], -1, per_word)
    shifts = torch.arange(per_word, dtype=torch.int64) * num_bits
    words = (q << shifts).sum(dim=-1)
    return (words & 0xFFFFFFFF).to(torch.int64).where(words < 2**31, words - 2**32).to(torch.int32)


def unpack_int32(words: torch.Tensor, num_bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_int32`: ``[..., w]`` int32 -> ``[..., n]`` int32 codes in ``[0, 2^b)``."""
    per_word = 32 // num_bits
    w = words.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(per_word, dtype=torch.int64) * num_bits
    q = (w.unsqueeze(-1) >> shifts) & ((1 << num_bits) - 1)
    return q.reshape(*words.shape[:-1], -1)[..., :n].to(torch.int32)
