"""Block reconstruction losses. ``pred, target: [B, L, H]`` -> scalar."""

from __future__ import annotations

import torch
import torch.nn.functional as F

NLC_EPS = 1e-6


def mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(pred.float(), target.float())


def nlc(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Negative log of the cosine similarity per token over the hidden dimension, averaged (LRQuant).

    The cosine is clamped to ``[eps, 1]`` so the log is defined for non-positive similarities.
    """
    cos = F.cosine_similarity(pred.float(), target.float(), dim=-1)
    return -torch.log(cos.clamp(NLC_EPS, 1.0)).mean()


LOSSES = {"mse": mse, "nlc": nlc}


def combined(pred: torch.Tensor, target: torch.Tensor, terms: dict[str, float]) -> torch.Tensor:
    """Weighted sum of named losses, e.g. ``{"mse": 1.0, "nlc": 1.0}``."""
    return sum(w * LOSSES[name](pred, target) for name, w in terms.items() if w)
