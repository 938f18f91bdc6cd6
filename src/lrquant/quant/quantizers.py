"""Fake-quantizer modules built on :mod:`lrquant.quant.primitives`.

* :class:`UniformQuantizer` — min-max uniform quantization at any granularity, with optional learnable
  weight clipping (LWC: per-row lower/upper factors ``sigmoid(theta)`` in (0, 1)), dynamic or static
  (observed then frozen) parameters.
* :class:`QuantLinear` — an ``nn.Linear`` (same parameter names, so checkpoints stay plain transformers
  checkpoints) that fake-quantizes its input and weight. Transforms parametrize ``weight``/``bias``
  while a block trains (see :mod:`lrquant.transforms`); :meth:`QuantLinear.freeze` bakes the quantized
  weight in.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..config import QuantArgs
from ..errors import ConfigError
from .observers import MinMaxObserver
from .primitives import as_rows, fake_quant, minmax_qparams, qparams_from_range


class UniformQuantizer(nn.Module):
    """Uniform fake quantizer for one tensor kind.

    Modes: ``dynamic`` (parameters from each input), ``observe`` (passes input through unquantized while
    tracking the running min/max), ``static`` (frozen ``scale``/``zero_point`` buffers, see :meth:`freeze`).
    """

    def __init__(
        self, args: QuantArgs, lwc_rows: int | None = None, lwc_init: float = 4.0, per_input: bool | None = None
    ) -> None:
        super().__init__()
        self.args = args
        self.qmin, self.qmax = args.qmin, args.qmax
        # per_input: parameters come from each input (weights, dynamic activations) until frozen
        self.per_input = args.dynamic if per_input is None else per_input
        self.enabled = True
        if lwc_rows is not None:
            # theta: [rows, 1]; clipping factor = sigmoid(theta), sigmoid(4) ~ 0.982 as in OmniQuant
            self.upbound_factor = nn.Parameter(torch.full((lwc_rows, 1), float(lwc_init)))
            self.lowbound_factor = nn.Parameter(torch.full((lwc_rows, 1), float(lwc_init)))
        else:
            self.upbound_factor = None
            self.lowbound_factor = None
        # learned rounding: per-element offsets [rows, cols] before rounding (see enable_learned_rounding)
        self.rounding_offset: nn.Parameter | None = None
        # learned per-output-channel factors on the dequantized weight, [channels] (LRQuant+'s rotation
        # vectors); :meth:`fold_channel_scale` moves them into ``scale``
        self.channel_scale: nn.Parameter | None = None
        # learnable activation clipping (dynamic quantizers): one logit ``[1, 1]``; each input's min/max
        # shrink by ``sigmoid(act_clip)`` (see :meth:`enable_act_clip`); it stays at inference
        self.act_clip: nn.Parameter | None = None
        self.register_buffer("scale", None, persistent=False)
        self.register_buffer("zero_point", None, persistent=False)
        # observe mode: the running range of each quantization row (the rows are the observer's channels)
        self.observer = MinMaxObserver()

    @property
    def mode(self) -> str:
        """``static`` once frozen, else ``dynamic`` (per input) or ``observe`` (static, calibrating)."""
        if self.scale is not None:
            return "static"
        return "dynamic" if self.per_input else "observe"

    @property
    def lwc(self) -> bool:
        return self.upbound_factor is not None

    def clip_factors(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(lower, upper)`` clipping factors ``[rows, 1]`` in (0, 1), or ``None`` without LWC."""
        if not self.lwc:
            return None
        return torch.sigmoid(self.lowbound_factor), torch.sigmoid(self.upbound_factor)

    def enable_learned_rounding(self, rows: torch.Tensor) -> nn.Parameter:
        """Give the quantizer zero rounding offsets shaped like ``rows: [R, C]`` and return them."""
        self.rounding_offset = nn.Parameter(torch.zeros_like(rows, dtype=torch.float32))
        return self.rounding_offset

    def enable_channel_scale(self, channels: int, device: torch.device | str) -> nn.Parameter:
        """Give the quantizer per-output-channel factors ``[channels]`` (ones) and return them."""
        self.channel_scale = nn.Parameter(torch.ones(channels, device=device))
        return self.channel_scale

    def enable_act_clip(self, logit: float, device: torch.device | str) -> nn.Parameter:
        """Give a dynamic quantizer a learnable clip logit ``[1, 1]`` (FlatQuant's learnable activation
        clipping; per tensor: one ratio for every token) and return it."""
        if not self.per_input or self.lwc:
            raise ConfigError("activation clipping needs a dynamic quantizer without weight clipping")
        self.act_clip = nn.Parameter(torch.full((1, 1), float(logit), device=device))
        return self.act_clip

    def _per_row(self, v: torch.Tensor, rows: int) -> torch.Tensor:
        """Per-channel ``v [channels]`` -> per quantization row ``[rows, 1]`` (groups of a channel share)."""
        return v.repeat_interleave(rows // v.shape[0])[:, None]

    @torch.no_grad()
    def fold_channel_scale(self) -> None:
        """Frozen quantizer: ``(code - zp) * scale * v`` becomes ``(code - zp) * scale'``, exactly."""
        if self.channel_scale is None:
            return
        self.scale = self.scale * self._per_row(self.channel_scale.detach(), self.scale.shape[0])
        self.channel_scale = None

    def learnable(self) -> dict[str, list[nn.Parameter]]:
        """Parameter groups this quantizer trains: ``lwc`` clip logits, ``round`` rounding offsets,
        ``rot`` channel factors, ``aclip`` the activation clip logit."""
        groups: dict[str, list[nn.Parameter]] = {}
        if self.lwc:
            groups["lwc"] = [self.upbound_factor, self.lowbound_factor]
        if self.rounding_offset is not None:
            groups["round"] = [self.rounding_offset]
        if self.channel_scale is not None:
            groups["rot"] = [self.channel_scale]
        if self.act_clip is not None:
            groups["aclip"] = [self.act_clip]
        return groups

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        return as_rows(x, self.args.strategy, self.args.group_size)

    def qparams(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Parameters for ``rows: [R, C]`` -> ``scale, zero_point: [R, 1]`` (or the frozen ones)."""
        if self.mode == "static":
            return self.scale, self.zero_point
        clip = self.clip_factors()
        if clip is not None:
            return minmax_qparams(rows, self.qmin, self.qmax, self.args.symmetric, *clip)
        if self.act_clip is not None:
            ratio = torch.sigmoid(self.act_clip).to(rows.dtype)
            return minmax_qparams(rows, self.qmin, self.qmax, self.args.symmetric, ratio, ratio)
        return minmax_qparams(rows, self.qmin, self.qmax, self.args.symmetric)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        rows = self.rows(x)
        if self.mode == "observe":
            self.observer.update(rows.t())  # [C, R]: min/max of each row
            return x
        scale, zp = self.qparams(rows)
        offset = None if self.rounding_offset is None else self.rounding_offset.clamp(-0.5, 0.5)
        out = fake_quant(rows, scale, zp, self.qmin, self.qmax, offset)
        if self.channel_scale is not None:
            out = out * self._per_row(self.channel_scale, out.shape[0])
        return out.reshape(x.shape)

    @torch.no_grad()
    def freeze(self, x: torch.Tensor | None = None) -> None:
        """Fix the parameters: from ``x`` (e.g. the weight) or from the observed range."""
        if x is not None:
            scale, zp = self.qparams(self.rows(x))
        elif self.observer.min is not None:
            self.observer.all_reduce()
            scale, zp = qparams_from_range(self.observer.min[:, None], self.observer.max[:, None], self.qmin,
                                           self.qmax, self.args.symmetric)
        else:
            raise ConfigError("static activation quantizer saw no calibration data before freeze()")
        self.scale, self.zero_point = scale.detach().clone(), zp.detach().round().clone()
        self.observer = MinMaxObserver()

    def extra_repr(self) -> str:
        return f"{self.args.describe()}, mode={self.mode}, lwc={self.lwc}"


class QuantLinear(nn.Linear):
    """``nn.Linear`` with fake-quantized input and weight.

    ``x: [..., in] -> [..., out]``. Parameters keep the names ``weight [out, in]`` / ``bias [out]`` and
    are the *same tensors* as the wrapped linear's, so state dicts are unchanged.
    """

    def __init__(
        self, linear: nn.Linear, weight_args: QuantArgs | None, act_args: QuantArgs | None, lwc: bool = False,
        lwc_init: float = 4.0,
    ) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        # an online op on the input that could not be folded (e.g. a Hadamard rotation), kept from the
        # wrapped linear; it runs before the input quantizer
        self.input_transform: nn.Module | None = getattr(linear, "input_transform", None)
        self.weight_quantizer: UniformQuantizer | None = None
        self.input_quantizer: UniformQuantizer | None = None
        if weight_args is not None:
            rows = as_rows(linear.weight.detach(), weight_args.strategy, weight_args.group_size).shape[0]
            self.weight_quantizer = UniformQuantizer(weight_args, lwc_rows=rows if lwc else None, lwc_init=lwc_init,
                                                     per_input=True)
        if act_args is not None:
            self.input_quantizer = UniformQuantizer(act_args)
        self.quant_error: float | None = None

    @property
    def weight_frozen(self) -> bool:
        """True once :meth:`freeze` baked the quantized weight in (``weight_quantizer.scale`` is set)."""
        return self.weight_quantizer is not None and self.weight_quantizer.scale is not None

    def effective_weight(self) -> torch.Tensor:
        """The weight the forward uses: ``[out, in]``, fake-quantized unless already frozen."""
        w = self.weight
        if self.weight_quantizer is not None and not self.weight_frozen:
            w = self.weight_quantizer(w)
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_transform is not None:
            x = self.input_transform(x)
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        return F.linear(x, self.effective_weight(), self.bias)

    @torch.no_grad()
    def freeze(self) -> None:
        """Replace ``weight`` by its fake-quantized value and drop the learnable clipping factors.

        The quantizer keeps ``scale`` / ``zero_point`` (``[rows, 1]``) for export.
        """
        if self.weight_quantizer is None or self.weight_frozen:
            return
        q = self.weight_quantizer
        q.freeze(self.weight)
        wq = q(self.weight)  # codes on the frozen grid, times the channel factors (if any)
        q.fold_channel_scale()
        self.quant_error = float((wq - self.weight).norm() / self.weight.norm().clamp_min(1e-20))
        self.weight.data.copy_(wq)
        q.upbound_factor = None
        q.lowbound_factor = None
        q.rounding_offset = None

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


@contextlib.contextmanager
def quantization_disabled(module: nn.Module, weights_only: bool = False) -> Iterator[None]:
    """Run ``module`` in full precision (every quantizer passes its input through), or only its weights
    (``weights_only``: the QuantLinear weight quantizers; activation quantizers stay on)."""
    if weights_only:
        candidates = [m.weight_quantizer for m in module.modules() if isinstance(m, QuantLinear)]
    else:
        candidates = [m for m in module.modules() if isinstance(m, UniformQuantizer)]
    quantizers = [q for q in candidates if q is not None and q.enabled]
    for q in quantizers:
        q.enabled = False
    try:
        yield
    finally:
        for q in quantizers:
            q.enabled = True


def quant_linears(module: nn.Module) -> dict[str, QuantLinear]:
    """All :class:`QuantLinear` submodules of ``module`` by qualified name."""
    return {n: m for n, m in module.named_modules() if isinstance(m, QuantLinear)}
