"""Range observers: running statistics of a stream of tensors, the one place they are accumulated."""

from __future__ import annotations

import torch


class MinMaxObserver:
    """Running per-channel minimum and maximum of tensors ``[..., C]``.

    Every dimension but the last is reduced; ``min, max: [C]`` in the inputs' dtype (``None`` before the
    first :meth:`update`). Min and max are exact, so the result does not depend on how the stream is split.
    """

    def __init__(self) -> None:
        self.min: torch.Tensor | None = None
        self.max: torch.Tensor | None = None

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """Fold ``x: [..., C]`` into the running range."""
        rows = x.detach().reshape(-1, x.shape[-1])
        lo, hi = rows.amin(0), rows.amax(0)
        if self.min is None:
            self.min, self.max = lo, hi
        else:
            self.min, self.max = torch.minimum(self.min, lo), torch.maximum(self.max, hi)

    @torch.no_grad()
    def all_reduce(self) -> None:
        """Combine the ranges of every rank under data parallel (no-op in one process); every rank must
        have seen data."""
        from ..distributed import all_reduce_

        if self.min is not None:
            all_reduce_(self.min, "min")
            all_reduce_(self.max, "max")
