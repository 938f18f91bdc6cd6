"""GPTQ (Frantar et al., 2022) on one weight matrix, with an arbitrary per-row grid.

Pure numerics: the caller accumulates the Hessian ``H = 2/n sum x x^T`` of the linear's inputs and
supplies the grid through ``qparams_fn`` (scale and zero point for a block of columns), so clipping
factors learned or searched beforehand (LWC) define the grid, and LRQuant+'s per-channel vectors scale
it. Columns are quantized left to right (or by decreasing ``diag(H)`` with ``act_order``) in lazy
batches of ``block_size``; the error of each column is spread over the remaining ones through the
upper Cholesky factor of ``H^-1``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .primitives import quantize

QParamsFn = Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]


class HessianAccumulator:
    """Running ``H = 2/n sum x x^T`` over inputs ``x: [..., C]`` (each batch's product in float32, the
    running sum in float64)."""

    def __init__(self, columns: int, device: torch.device | str = "cpu") -> None:
        self.h = torch.zeros(columns, columns, dtype=torch.float64, device=device)
        self.n = 0

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(self.h.device, torch.float32)
        self.h.mul_(self.n / (self.n + x.shape[0]))
        self.n += x.shape[0]
        self.h.add_((x.T @ x).double(), alpha=2.0 / self.n)

    @torch.no_grad()
    def all_reduce(self) -> None:
        """Combine the accumulators of every rank under data parallel (no-op in one process): the
        sample-weighted mean of their ``H``."""
        from ..distributed import active, all_reduce_, sum_scalars

        if not active():
            return
        self.h.mul_(self.n)
        all_reduce_(self.h, "sum")
        (total,) = sum_scalars(float(self.n))
        self.n = int(total)
        self.h.div_(max(self.n, 1))


@torch.no_grad()
def gptq_quantize(
    weight: torch.Tensor, hessian: torch.Tensor, qparams_fn: QParamsFn, qmin: int, qmax: int,
    group_size: int | None, *, damp: float = 0.01, block_size: int = 128, act_order: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize ``weight [O, I]`` with Hessian ``hessian [I, I]``.

    ``qparams_fn(w_cols, start)`` returns ``scale, zero_point`` (``[O, 1]``) for the columns of one group
    starting at (original) column ``start``, computed from the current, error-updated ``w_cols [O, g]``
    (``group_size`` ``None``: one call for the whole row, ``g = I``). With ``act_order`` the grids are
    computed once, up front, from the un-updated weight, and the columns are then visited by decreasing
    ``diag(H)``. Returns ``(dequantized weight [O, I], scale [O, I/g], zero_point [O, I/g])`` in the
    original column order.
    """
    w = weight.detach().to(torch.float64).clone()
    out_f, in_f = w.shape
    g = group_size or in_f
    h = hessian.to(torch.float64).clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    n_groups = in_f // g
    scales = torch.zeros(out_f, n_groups, dtype=torch.float64, device=w.device)
    zeros = torch.zeros_like(scales)
    if act_order:
        for j in range(n_groups):
            s, z = qparams_fn(w[:, j * g:(j + 1) * g].to(weight.dtype), j * g)
            scales[:, j], zeros[:, j] = s.reshape(-1).double(), z.reshape(-1).double()
        perm = torch.argsort(torch.diag(h), descending=True)
    else:
        perm = torch.arange(in_f, device=w.device)
    inv_perm = torch.argsort(perm)
    w, h = w[:, perm], h[perm][:, perm]
    h += torch.eye(in_f, dtype=h.dtype, device=h.device) * (damp * torch.mean(torch.diag(h)))
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    q_all = torch.zeros_like(w)
    for b0 in range(0, in_f, block_size):
        b1 = min(b0 + block_size, in_f)
        w1 = w[:, b0:b1].clone()
        q1 = torch.zeros_like(w1)
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[b0:b1, b0:b1]
        for i in range(b1 - b0):
            col = b0 + i
            orig = int(perm[col])
            grp = orig // g
            if not act_order and orig % g == 0:
                s, z = qparams_fn(w[:, col:col + g].to(weight.dtype) if col + g <= b1 else
                                  torch.cat([w1[:, i:], w[:, b1:col + g]], 1).to(weight.dtype), orig)
                scales[:, grp], zeros[:, grp] = s.reshape(-1).double(), z.reshape(-1).double()
            s, z = scales[:, grp:grp + 1], zeros[:, grp:grp + 1]
            x = w1[:, i:i + 1]
            q = (quantize(x, s, z, qmin, qmax).double() - z) * s
            q1[:, i:i + 1] = q
            e = (x - q) / hinv1[i, i]
            w1[:, i:] -= e @ hinv1[i:i + 1, i:]
            err1[:, i:i + 1] = e
        q_all[:, b0:b1] = q1
        w[:, b1:] -= err1 @ hinv[b0:b1, b1:]
    return q_all[:, inv_perm].to(weight.dtype), scales.to(weight.dtype), zeros.to(weight.dtype)
