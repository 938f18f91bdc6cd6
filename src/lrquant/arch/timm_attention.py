"""The attention module of timm ViTs in lrquant's split layout: :class:`SplitQKVAttention` is timm's
``Attention`` (``timm.layers.attention.Attention``) with the fused ``qkv`` Linear split into ``q_proj``,
``k_proj``, ``v_proj`` (rows ``[0, A)``, ``[A, 2A)``, ``[2A, 3A)`` of ``qkv``) and ``proj`` named ``o_proj``
(the same Linear object), so that the separate q/k/v paths of :class:`~lrquant.arch.base.ArchMapping` and
every method apply unchanged.

Its forward is numerically identical to timm's (fused SDPA and explicit paths, ``q_norm``/``k_norm``,
``scale``, ``attn_drop``, boolean / additive masks, ``is_causal``). Q/K (after ``q_norm``/``k_norm``) and V
go through the same :class:`~lrquant.quant.attention.AttentionQuantizer` (attribute ``attn_quantizer``)
the transformers path uses; with a softmax quantizer (``probs``, RepQuant) the attention runs through
:func:`~lrquant.quant.attention.eager_quantized_attention`. :meth:`SplitQKVAttention.to_timm` gives timm's
module back (q/k/v rows concatenated into ``qkv``): exact for per-channel and per-group weight
quantization, whose scales are per row.

timm is not imported here: the module only reads the attributes of the timm module it wraps.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

QKV_ROLES = ("q", "k", "v")


class SplitQKVAttention(nn.Module):
    """timm's ``Attention`` with the fused ``qkv`` split into ``q_proj``/``k_proj``/``v_proj`` and ``proj``
    named ``o_proj``. ``x [B, N, D] -> [B, N, D_out]``; Q/K/V are ``[B, H, N, head_dim]``.

    ``attn_quantizer`` (``None`` until a method attaches an
    :class:`~lrquant.quant.attention.AttentionQuantizer`) fake-quantizes Q, K (after ``q_norm``/``k_norm``)
    and V; with a ``probs`` quantizer the softmax is computed explicitly and quantized.
    """

    def __init__(self, attn: nn.Module) -> None:
        super().__init__()
        qkv: nn.Linear = attn.qkv
        self.num_heads: int = attn.num_heads
        self.head_dim: int = attn.head_dim
        self.attn_dim: int = attn.attn_dim
        self.scale: float = attn.scale
        self.fused_attn: bool = bool(attn.fused_attn)
        self.is_causal = False  # read by eager_quantized_attention when no is_causal is passed
        bias = qkv.bias is not None
        for i, role in enumerate(QKV_ROLES):
            lin = nn.Linear(qkv.in_features, self.attn_dim, bias=bias, device=qkv.weight.device,
                            dtype=qkv.weight.dtype)
            with torch.no_grad():
                lin.weight.copy_(qkv.weight[i * self.attn_dim : (i + 1) * self.attn_dim])
                if bias:
                    lin.bias.copy_(qkv.bias[i * self.attn_dim : (i + 1) * self.attn_dim])
            setattr(self, f"{role}_proj", lin)
        self.q_norm = attn.q_norm
        self.k_norm = attn.k_norm
        self.attn_drop = attn.attn_drop
        self.norm = attn.norm
        self.o_proj = attn.proj
        self.proj_drop = attn.proj_drop
        self.attn_quantizer: nn.Module | None = None
        # the emptied timm module, kept (unregistered: no parameters of its own) to be refilled by to_timm
        attn.qkv = None
        attn.proj = None
        object.__setattr__(self, "_timm_attention", attn)

    def _heads(self, y: torch.Tensor, batch: int, tokens: int) -> torch.Tensor:
        """``[B, N, H * head_dim] -> [B, H, N, head_dim]``."""
        return y.reshape(batch, tokens, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
                ) -> torch.Tensor:
        """``x [B, N, D]``; ``attn_mask``: boolean (True = attend) or additive, broadcasting to
        ``[B, H, N, N]``; returns ``[B, N, D_out]``."""
        from ..quant.attention import eager_quantized_attention

        b, n, _ = x.shape
        q = self._heads(self.q_proj(x), b, n)
        k = self._heads(self.k_proj(x), b, n)
        v = self._heads(self.v_proj(x), b, n)
        q, k = self.q_norm(q), self.k_norm(k)
        quantizer = self.attn_quantizer
        if quantizer is not None:
            q, k, v = quantizer(q, k, v)
        dropout = self.attn_drop.p if self.training else 0.0
        if quantizer is not None and quantizer.probs is not None:
            out, _ = eager_quantized_attention(self, q, k, v, attn_mask, quantizer.probs, dropout=dropout,
                                               scaling=self.scale, is_causal=is_causal)
            y = out.reshape(b, n, self.attn_dim)  # out: [B, N, H, head_dim]
        else:
            if self.fused_attn:
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout,
                                                   is_causal=is_causal)
            else:  # timm's explicit path, operation for operation
                scores = (q * self.scale) @ k.transpose(-2, -1)
                bias = _additive_mask(n, scores, attn_mask, is_causal)
                if bias is not None:
                    scores = scores + bias
                y = self.attn_drop(scores.softmax(dim=-1)) @ v
            y = y.transpose(1, 2).reshape(b, n, self.attn_dim)
        return self.proj_drop(self.o_proj(self.norm(y)))

    @torch.no_grad()
    def to_timm(self) -> nn.Module:
        """The timm ``Attention`` again: ``qkv`` = the q/k/v rows concatenated (plain ``nn.Linear``; the
        weights as they are now, e.g. frozen fake-quant values), ``proj`` = ``o_proj`` as a plain Linear."""
        attn = self._timm_attention
        lins = [getattr(self, f"{r}_proj") for r in QKV_ROLES]
        w = torch.cat([lin.weight.detach() for lin in lins], 0)
        qkv = nn.Linear(w.shape[1], w.shape[0], bias=lins[0].bias is not None, device=w.device, dtype=w.dtype)
        qkv.weight.copy_(w)
        if qkv.bias is not None:
            qkv.bias.copy_(torch.cat([lin.bias.detach() for lin in lins], 0))
        attn.qkv = qkv
        attn.proj = _plain_linear(self.o_proj)
        attn.q_norm, attn.k_norm, attn.attn_drop = self.q_norm, self.k_norm, self.attn_drop
        attn.norm, attn.proj_drop = self.norm, self.proj_drop
        attn.fused_attn = self.fused_attn
        attn.train(self.training)
        return attn


def _additive_mask(n: int, scores: torch.Tensor, attn_mask: torch.Tensor | None, is_causal: bool
                   ) -> torch.Tensor | None:
    """timm's ``resolve_self_attn_mask``: the additive bias SDPA would apply (``None``: no mask)."""
    if is_causal:
        return scores.new_full((n, n), float("-inf")).triu_(1)
    if attn_mask is None:
        return None
    if attn_mask.dtype == torch.bool:
        return torch.zeros_like(attn_mask, dtype=scores.dtype).masked_fill_(~attn_mask, float("-inf"))
    return attn_mask


def _plain_linear(linear: nn.Linear) -> nn.Linear:
    """An ``nn.Linear`` holding ``linear``'s parameters (unwraps a QuantLinear)."""
    if type(linear) is nn.Linear:
        return linear
    out = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None,
                    device=linear.weight.device, dtype=linear.weight.dtype)
    out.weight = nn.Parameter(linear.weight.detach(), requires_grad=linear.weight.requires_grad)
    if linear.bias is not None:
        out.bias = nn.Parameter(linear.bias.detach(), requires_grad=linear.bias.requires_grad)
    return out
