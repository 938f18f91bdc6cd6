"""Quantization of the attention matmul operands, model-agnostic.

transformers dispatches attention through ``ALL_ATTENTION_FUNCTIONS[config._attn_implementation]`` and
hands the function the attention module plus ``query [B, H, L, D]`` (after RoPE), ``key`` and ``value``
``[B, KV, L, D]``. We register one implementation, ``"lrquant"``, that fake-quantizes those operands with
the :class:`AttentionQuantizer` attached to the module (attribute ``attn_quantizer``) and then runs SDPA,
so no decoder layer is ever copied. Per-token strategy on ``[B, H, L, D]`` means one scale per head and
token (rows = B*H*L).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask

from ..config import QuantArgs
from .quantizers import UniformQuantizer

ATTN_IMPL = "lrquant"


class AttentionQuantizer(nn.Module):
    """Fake quantizers for Q, K (after RoPE) and V; ``None`` entries are left in full precision."""

    def __init__(self, kv_args: QuantArgs) -> None:
        super().__init__()
        self.q = UniformQuantizer(kv_args)
        self.k = UniformQuantizer(kv_args)
        self.v = UniformQuantizer(kv_args)

    def forward(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.q(query), self.k(key), self.v(value)


def lrquant_attention_forward(
    module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
    attention_mask: torch.Tensor | None, **kwargs,
) -> tuple[torch.Tensor, None]:
    """SDPA on fake-quantized operands (``query [B, H, L, D]``, ``key/value [B, KV, L, D]``)."""
    quantizer = getattr(module, "attn_quantizer", None)
    if quantizer is not None:
        query, key, value = quantizer(query, key, value)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


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
