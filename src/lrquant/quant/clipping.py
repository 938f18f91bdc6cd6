"""Weight-clipping initialisation by grid search (``clip.init: mse``).

For each quantization row (a channel, or a group of a channel) the clipping factor ``f`` on a grid in
``[min_factor, 1]`` that minimises ``sum |w - Q_f(w)|^2.4`` (the error norm GPTQ's own clip search
uses) is chosen; the same factor shrinks the row's minimum and maximum. The result is written into the
quantizer's LWC logits, so learned clipping starts from it and non-learned clipping keeps it.
"""

from __future__ import annotations

import torch

from ..config import ClipArgs
from .primitives import fake_quant, minmax_qparams
from .quantizers import UniformQuantizer

#: LWC logit standing for "no clipping" (sigmoid(LOGIT_MAX) = 1 - 2e-9)
LOGIT_MAX = 20.0
ERROR_NORM = 2.4


@torch.no_grad()
def search_clip(rows: torch.Tensor, qmin: int, qmax: int, symmetric: bool, min_factor: float,
                grid: int) -> torch.Tensor:
    """Best clipping factor per row: ``rows [R, C]`` -> ``[R, 1]`` in ``[min_factor, 1]``."""
    rows = rows.float()
    best_err = torch.full((rows.shape[0], 1), float("inf"), device=rows.device)
    best = torch.ones_like(best_err)
    for f in torch.linspace(1.0, min_factor, grid + 1).tolist():
        scale, zp = minmax_qparams(rows, qmin, qmax, symmetric, f, f)
        err = (fake_quant(rows, scale, zp, qmin, qmax) - rows).abs().pow(ERROR_NORM).sum(-1, keepdim=True)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, torch.full_like(best, f), best)
    return best


@torch.no_grad()
def init_clip_mse(quantizer: UniformQuantizer, weight: torch.Tensor, args: ClipArgs) -> None:
    """Set ``quantizer``'s LWC logits (``[R, 1]``) from :func:`search_clip` on ``weight [out, in]``."""
    if not quantizer.lwc:
        raise ValueError("init_clip_mse needs a quantizer with clipping factors (lwc_rows)")
    f = search_clip(quantizer.rows(weight), quantizer.qmin, quantizer.qmax, quantizer.args.symmetric,
                    args.min_factor, args.grid)
    logit = torch.where(f >= 1.0, torch.full_like(f, LOGIT_MAX), torch.logit(f.clamp(max=1 - 1e-6)))
    quantizer.upbound_factor.copy_(logit)
    quantizer.lowbound_factor.copy_(logit)
