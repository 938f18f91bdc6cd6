"""Block reconstruction losses. ``pred, target: [B, L, H]``, optional ``mask: [B, L]`` (tokens that
count) -> scalar."""

from __future__ import annotations

import torch
import torch.nn.functional as F

NLC_EPS = 1e-6


def _mean(per_token: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``per_token [B, L]`` over the tokens in ``mask`` (all tokens when ``None``)."""
    if mask is None:
        return per_token.mean()
    return per_token[mask.to(per_token.device)].mean()


def mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error over the hidden dimension and the (kept) tokens."""
    return _mean((pred.float() - target.float()).pow(2).mean(-1), mask)


def nlc(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Negative log of the cosine similarity per token over the hidden dimension, averaged (LRQuant).

    The cosine is clamped to ``[eps, 1]`` so the log is defined for non-positive similarities.
    """
    cos = F.cosine_similarity(pred.float(), target.float(), dim=-1)
    return _mean(-torch.log(cos.clamp(NLC_EPS, 1.0)), mask)


LOSSES = {"mse": mse, "nlc": nlc}


def combined(pred: torch.Tensor, target: torch.Tensor, terms: dict[str, float],
             mask: torch.Tensor | None = None) -> torch.Tensor:
    """Weighted sum of named losses, e.g. ``{"mse": 1.0, "nlc": 1.0}``."""
    return sum(w * LOSSES[name](pred, target, mask) for name, w in terms.items() if w)


@torch.no_grad()
def massive_token_mask(target: torch.Tensor, ratio: float) -> torch.Tensor:
    """Tokens to keep: ``target [N, L, H]`` -> ``[N, L]`` bool, False where a token's norm exceeds
    ``ratio`` x the median token norm of its sample (attention sinks / massive activations)."""
    norms = torch.stack([t.float().norm(dim=-1) for t in target])  # one sample at a time: no fp32 copy
    return norms <= ratio * norms.median(dim=1, keepdim=True).values
