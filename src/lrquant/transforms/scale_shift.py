"""Diagonal scale + shift (SmoothQuant / OmniQuant LET / LRQuant), one per :class:`SmoothPair`.

With per-channel scale ``s [C]`` and shift ``d [C]`` the channels ``x`` between ``prev`` and ``nexts``
become ``x' = (x - d) / s`` and every next linear absorbs the inverse: ``W' = W diag(s)``,
``b' = b + W d``. Where the channels go:

=======  ====================================  ==============================================
kind     prev (produces x)                     nexts (consume x)
=======  ====================================  ==============================================
norm     norm weight ``/ s``, bias ``(b-d)/s``  weight columns ``* s``, bias ``+ W d``
linear   weight rows ``/ s``, bias ``/ s``      weight columns ``* s``
heads    v rows ``/ s``, v bias ``(b-d)/s``     o columns ``* s`` per head (GQA: the kv head's
                                                scale is shared by its query heads), ``+ W d``
qk       q rows ``* s`` (per kv group)          k rows ``/ s``; with RoPE ``s`` is tied across
                                                each rotated pair (i, i + D/2)
=======  ====================================  ==============================================

Shifts are exact only where the target tensors already carry a bias (LayerNorm -> biased linears,
biased v -> biased o; P rows sum to 1 so attention passes a constant shift through), and not after a
norm whose output the block may zero-pad (``mapping.padded_norms``, Swin's attention norm). We never add a
bias the architecture lacks (the checkpoint would no longer load), so RMSNorm models learn scales only.
``linear`` (up -> down through ``act(gate) * up``, or fc1 -> ReLU -> fc2) is exact for scales only.
"""

from __future__ import annotations

import torch
from torch import nn

from ..arch.base import ArchMapping, SmoothPair
from .base import Transform, add_param, ensure_bias, original

SCALE_MIN = 1e-5


def kv_group_index(n_heads: int, n_kv: int, head_dim: int) -> torch.Tensor:
    """Index ``[H * D]`` mapping each query-head channel to its kv-head channel (GQA grouping)."""
    group = n_heads // n_kv
    heads = torch.arange(n_heads) // group
    return (heads[:, None] * head_dim + torch.arange(head_dim)[None, :]).reshape(-1)


def pair_channels(pair: SmoothPair, mapping: ArchMapping, block: nn.Module, config) -> int:
    """Number of free scale parameters of ``pair`` (see :class:`ScaleShift`)."""
    if pair.kind == "norm":
        return block.get_submodule(pair.nexts[0]).in_features
    if pair.kind in ("linear", "heads"):
        return block.get_submodule(pair.prev).out_features
    _, n_kv, hd = mapping.heads(config, block)
    return n_kv * (hd // 2 if mapping.rope else hd)


def shift_possible(pair: SmoothPair, mapping: ArchMapping, block: nn.Module) -> bool:
    """Whether a shift folds exactly into existing biases at ``pair``."""
    nexts = [block.get_submodule(n) for n in pair.nexts]
    if pair.kind == "norm":
        return (mapping.norm_kind == "layer" and pair.prev not in mapping.padded_norms
                and all(ensure_bias(n) for n in nexts))
    if pair.kind == "heads":
        return ensure_bias(block.get_submodule(pair.prev)) and all(ensure_bias(n) for n in nexts)
    return False


class ScaleShift(Transform):
    """Learnable diagonal transform for one pair. ``scale``: ``[C]``; ``shift``: ``[C]`` or ``None``;
    ``param``: ``linear`` (the parameter is ``s``, clamped at 1e-5) or ``log`` (the parameter is ``log s``).

    ``C`` is the prev's channel count, except for ``qk`` where it is ``KV * D`` (or ``KV * D / 2`` with
    RoPE, expanded to both halves of each head). ``block``: the block the transform is for, needed when
    head counts differ per block (``mapping.heads_from_attention``, e.g. Swin's stages).
    """

    def __init__(self, pair: SmoothPair, mapping: ArchMapping, config, scale: torch.Tensor,
                 shift: torch.Tensor | None = None, block: nn.Module | None = None, param: str = "linear") -> None:
        super().__init__(pair, mapping)
        # param "log": the learnable tensor holds log(s) (relative steps, s > 0 without clamping)
        self.log_param = param == "log"
        init = scale.detach().clone().float()
        self.scale = nn.Parameter(init.clamp_min(SCALE_MIN).log() if self.log_param else init)
        self.shift = nn.Parameter(shift.detach().clone().float()) if shift is not None else None
        n, kv, hd = mapping.heads(config, block)
        self.register_buffer("gqa_index", kv_group_index(n, kv, hd), persistent=False)
        self.n_kv, self.head_dim = kv, hd

    # ---- the per-channel vectors in a given dtype ---------------------------------------------------
    def s(self, dtype: torch.dtype) -> torch.Tensor:
        """Channel scales ``[C]`` (qk with RoPE: ``[KV * D]``, tied over rotated pairs)."""
        s = self.scale.to(dtype).exp() if self.log_param else self.scale.to(dtype).clamp_min(SCALE_MIN)
        if self.pair.kind == "qk" and self.mapping.rope:
            s = s.reshape(self.n_kv, self.head_dim // 2)
            s = torch.cat([s, s], dim=-1).reshape(-1)
        return s

    def d(self, dtype: torch.dtype) -> torch.Tensor | None:
        return None if self.shift is None else self.shift.to(dtype)

    def expand_to_heads(self, v: torch.Tensor) -> torch.Tensor:
        """``[KV * D] -> [H * D]`` for the query heads / o_proj input columns."""
        return v[self.gqa_index.to(v.device)]

    # ---- attach ------------------------------------------------------------------------------------
    def attach(self, block: nn.Module) -> None:
        kind = self.pair.kind
        prev = block.get_submodule(self.pair.prev)
        nexts = [block.get_submodule(n) for n in self.pair.nexts]
        if kind == "qk":
            q, k = prev, nexts[0]
            add_param(q, "weight", lambda w: w * self.expand_to_heads(self.s(w.dtype))[:, None])
            if ensure_bias(q):
                add_param(q, "bias", lambda b: b * self.expand_to_heads(self.s(b.dtype)))
            add_param(k, "weight", lambda w: w / self.s(w.dtype)[:, None])
            if ensure_bias(k):
                add_param(k, "bias", lambda b: b / self.s(b.dtype))
            return

        # prev side: channels become (x - d) / s
        if kind == "norm":
            if self.mapping.norm_kind == "rms_plus_one":
                add_param(prev, "weight", lambda w: (1 + w) / self.s(w.dtype) - 1)
            else:
                add_param(prev, "weight", lambda w: w / self.s(w.dtype))
        else:  # linear / heads: rows of the producing linear
            add_param(prev, "weight", lambda w: w / self.s(w.dtype)[:, None])
        if ensure_bias(prev):
            if self.shift is not None:
                add_param(prev, "bias", lambda b: (b - self.d(b.dtype)) / self.s(b.dtype))
            else:
                add_param(prev, "bias", lambda b: b / self.s(b.dtype))

        # next side: columns absorb s, biases absorb W d (W before any transform)
        expand = self.expand_to_heads if kind == "heads" else (lambda v: v)
        for lin in nexts:
            add_param(lin, "weight", lambda w, e=expand: w * e(self.s(w.dtype))[None, :])
            if self.shift is not None:
                add_param(lin, "bias", lambda b, lin=lin, e=expand: b + original(lin, "weight").to(b.dtype) @ e(
                    self.d(b.dtype)))

    def extra_repr(self) -> str:
        return f"{self.pair.kind}: {self.pair.prev} -> {', '.join(self.pair.nexts)}, shift={self.shift is not None}"
