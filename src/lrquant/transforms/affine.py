"""AffineQuant: a full invertible matrix per kv head between ``v_proj`` and ``o_proj``.

With per-head matrices ``A [KV, D, D]`` the values become ``v' = A^-1 v`` (rows of ``W_v``/``b_v``) and
``o_proj`` absorbs ``A`` on the input columns of every query head of the group: ``W_o' = W_o A``.
Attention mixes value vectors over tokens with weights, which commutes with a per-head linear map, so the
fold is exact for any invertible ``A``. A diagonal ``A`` is the LET ``heads`` scale.

Invertibility is kept by the *gradual mask*: the effective matrix is ``A * M_e`` where ``M_e`` is 1 on the
diagonal, ``stability`` on the off-diagonal entries within ``band_e`` of it and 0 elsewhere; the band
widens with the epochs until it covers the whole matrix in the last one. Starting from a diagonal
(strictly diagonally dominant) matrix and letting off-diagonal mass in slowly keeps ``A`` well
conditioned. The inverse is taken with ``torch.linalg.solve`` (float64 at the fold).

Positions where a full matrix could not be folded (norm -> linears: a norm only scales channels; up ->
down: ``act(gate) * up`` is elementwise) keep the diagonal transform; no matrix is left online.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..arch.base import ArchMapping, SmoothPair
from .base import Transform, add_param, ensure_bias
from .scale_shift import kv_group_index


def band_mask(dim: int, band: int, stability: float) -> torch.Tensor:
    """``[D, D]``: 1 on the diagonal, ``stability`` for ``0 < |i - j| <= band``, 0 elsewhere."""
    dist = (torch.arange(dim)[:, None] - torch.arange(dim)[None, :]).abs()
    mask = torch.where(dist <= band, torch.full((dim, dim), stability), torch.zeros(dim, dim))
    mask.fill_diagonal_(1.0)
    return mask


def band_for_epoch(epoch: int, epochs: int, dim: int) -> int:
    """Band half-width at ``epoch`` (0-based) of ``epochs``: grows linearly to the full matrix."""
    return dim if epochs <= 1 else math.ceil((dim - 1) * (epoch + 1) / epochs)


class HeadAffine(Transform):
    """Learnable ``A [KV, D, D]`` for a ``heads`` pair, initialised to ``diag(scale)``. ``block``: the block
    the transform is for, needed when head counts differ per block (``mapping.heads_from_attention``)."""

    def __init__(self, pair: SmoothPair, mapping: ArchMapping, config, scale: torch.Tensor,
                 stability: float = 1e-2, block: nn.Module | None = None) -> None:
        super().__init__(pair, mapping)
        if pair.kind != "heads":
            raise ValueError("HeadAffine only folds exactly at a v -> o (heads) pair")
        n, kv, hd = mapping.heads(config, block)
        self.n_heads, self.n_kv, self.head_dim, self.stability = n, kv, hd, stability
        self.matrix = nn.Parameter(torch.diag_embed(scale.detach().float().reshape(kv, hd)))
        self.register_buffer("mask", band_mask(hd, 0, stability), persistent=False)
        self.register_buffer("head_to_kv", torch.arange(n) // (n // kv), persistent=False)
        self.register_buffer("gqa_index", kv_group_index(n, kv, hd), persistent=False)

    def set_epoch(self, epoch: int, epochs: int) -> None:
        self.mask = band_mask(self.head_dim, band_for_epoch(epoch, epochs, self.head_dim), self.stability).to(
            self.matrix.device)

    def effective(self, dtype: torch.dtype) -> torch.Tensor:
        """The masked matrices ``[KV, D, D]`` in ``dtype``."""
        return self.matrix.to(dtype) * self.mask.to(dtype)

    def attach(self, block: nn.Module) -> None:
        v = block.get_submodule(self.pair.prev)
        kv, hd = self.n_kv, self.head_dim

        def v_weight(w: torch.Tensor) -> torch.Tensor:  # [KV*D, in] -> A^-1 W per head
            return torch.linalg.solve(self.effective(w.dtype), w.reshape(kv, hd, -1)).reshape(kv * hd, -1)

        add_param(v, "weight", v_weight)
        if ensure_bias(v):
            add_param(v, "bias", lambda b: torch.linalg.solve(
                self.effective(b.dtype), b.reshape(kv, hd, 1)).reshape(-1))
        for name in self.pair.nexts:
            o = block.get_submodule(name)

            def o_weight(w: torch.Tensor) -> torch.Tensor:  # [out, H*D] -> per head W_h A_g(h)
                a = self.effective(w.dtype)[self.head_to_kv.to(w.device)]  # [H, D, D]
                return torch.einsum("ohd,hde->ohe", w.reshape(w.shape[0], self.n_heads, hd), a).reshape(w.shape)

            add_param(o, "weight", o_weight)

    def extra_repr(self) -> str:
        d = self.head_dim
        return f"heads: {self.pair.prev} -> {', '.join(self.pair.nexts)}, A [{self.n_kv}, {d}, {d}]"
