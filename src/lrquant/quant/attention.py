"""Quantization of the attention matmul operands, model-agnostic.

transformers dispatches attention through ``ALL_ATTENTION_FUNCTIONS[config._attn_implementation]`` and
hands the function the attention module plus ``query [B, H, L, D]`` (after RoPE), ``key`` and ``value``
``[B, KV, L, D]``. We register one implementation, ``"lrquant"``, that fake-quantizes those operands with
the :class:`AttentionQuantizer` attached to the module (attribute ``attn_quantizer``) and then runs SDPA,
so no decoder layer is ever copied. Per-token strategy on ``[B, H, L, D]`` means one scale per head and
token (rows = B*H*L).

When the quantizer also has a ``probs`` module (e.g. a log2 / log√2 quantizer, see
:mod:`lrquant.quant.log`), SDPA cannot be used (it never materialises the softmax output), so the
attention runs explicitly: ``softmax(q k^T * scaling + mask)`` in float32, ``probs(...)``, then ``@ v``
(:func:`eager_quantized_attention`, which follows SDPA's masking rules so that with an identity ``probs``
it computes the same thing). Without ``probs`` the SDPA path is unchanged.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import create_position_bias_mask, repeat_kv, sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask

from ..config import QuantArgs
from .quantizers import UniformQuantizer

ATTN_IMPL = "lrquant"


class AttentionQuantizer(nn.Module):
    """Fake quantizers for Q, K (after RoPE), V (``kv_args``; ``None``: left in full precision) and,
    optionally, the softmax output ``probs`` (any module ``[B, H, Lq, Lk] -> same``). ``input_transform``:
    an online op ``(query, key) -> (query', key')`` with ``query' key'^T = query key^T`` run before the
    quantizers (kronquant's per-head q/k transform, :class:`~lrquant.transforms.kron.OnlineQK`), or ``None``."""

    def __init__(self, kv_args: QuantArgs | None, probs: nn.Module | None = None) -> None:
        super().__init__()
        self.q = UniformQuantizer(kv_args) if kv_args is not None else None
        self.k = UniformQuantizer(kv_args) if kv_args is not None else None
        self.v = UniformQuantizer(kv_args) if kv_args is not None else None
        self.probs = probs
        self.input_transform: nn.Module | None = None

    def forward(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``query [B, H, L, D]``, ``key/value [B, KV, L, D]`` -> the same, transformed and fake-quantized."""
        if self.input_transform is not None:
            query, key = self.input_transform(query, key)
        if self.q is None:
            return query, key, value
        return self.q(query), self.k(key), self.v(value)


def eager_quantized_attention(
    module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
    attention_mask: torch.Tensor | None, probs_quantizer: nn.Module, dropout: float = 0.0,
    scaling: float | None = None, is_causal: bool | None = None, position_bias: torch.Tensor | None = None,
    softcap: float | None = None, **_kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Explicit attention with a quantizer on the softmax output.

    ``query [B, H, Lq, D]``, ``key/value [B, KV, Lk, D]`` (GQA: each kv head repeated for its ``H / KV``
    query heads); ``attention_mask``: boolean (``True`` = attend, as transformers builds it for SDPA) or
    additive float, broadcasting to ``[B, H, Lq, Lk]``, or ``None``, in which case the causal mask is
    applied when SDPA would (``Lq > 1`` and the module is causal). Returns ``(out [B, Lq, H, D],
    quantized probabilities [B, H, Lq, Lk])``.
    """
    n_rep = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, n_rep), repeat_kv(value, n_rep)
    q_len, kv_len = query.shape[2], key.shape[2]
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    is_causal = q_len > 1 and attention_mask is None and is_causal
    if position_bias is not None:
        attention_mask = create_position_bias_mask(position_bias, attention_mask, is_causal, query, key)
        is_causal = False
    if is_causal:  # SDPA's is_causal: upper-left aligned, key j visible to query i iff j <= i
        attention_mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).tril()
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = torch.matmul(query, key.transpose(2, 3)) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask
    probs = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = nn.functional.dropout(probs, p=dropout, training=module.training)
    probs = probs_quantizer(probs)
    out = torch.matmul(probs, value).transpose(1, 2).contiguous()
    return out, probs


def lrquant_attention_forward(
    module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
    attention_mask: torch.Tensor | None, **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention on fake-quantized operands (``query [B, H, L, D]``, ``key/value [B, KV, L, D]``): SDPA,
    or :func:`eager_quantized_attention` when the module's quantizer has a ``probs`` quantizer."""
    quantizer = getattr(module, "attn_quantizer", None)
    if quantizer is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    query, key, value = quantizer(query, key, value)
    if quantizer.probs is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    return eager_quantized_attention(module, query, key, value, attention_mask, quantizer.probs, **kwargs)


def enable_attention_quantization(model: nn.Module) -> None:
    """Route ``model``'s attention through :func:`lrquant_attention_forward` (idempotent)."""
    if ATTN_IMPL not in AttentionInterface._global_mapping:
        AttentionInterface.register(ATTN_IMPL, lrquant_attention_forward)
    if ATTN_IMPL not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
        AttentionMaskInterface.register(ATTN_IMPL, sdpa_mask)
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation"):
            config._attn_implementation = ATTN_IMPL
