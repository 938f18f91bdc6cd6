"""Optimisation on the Stiefel manifold of orthogonal matrices (pure functions): the Cayley retraction
SpinQuant trains its rotations with."""

from __future__ import annotations

import torch


def cayley_step(r: torch.Tensor, grad: torch.Tensor, lr: float) -> torch.Tensor:
    """One Cayley SGD step: ``r [n, n]`` orthogonal, ``grad [n, n]`` the Euclidean gradient of the loss at
    ``r``. With the skew-symmetric ``A = G R^T - R G^T`` (the Riemannian gradient, moved to the identity),
    normalised to unit Frobenius norm so ``lr`` is a step length, returns
    ``(I + lr/2 A)^-1 (I - lr/2 A) R``: orthogonal again (up to rounding) for any ``lr``, a descent step
    for small ``lr``. Computed in ``r.dtype``."""
    a = grad @ r.T - r @ grad.T
    a = a / a.norm().clamp_min(1e-30)
    eye = torch.eye(r.shape[0], dtype=r.dtype, device=r.device)
    return torch.linalg.solve(eye + 0.5 * lr * a, (eye - 0.5 * lr * a) @ r)


__all__ = ["cayley_step"]
