"""Hadamard rotations (pure maths, no model surgery): orthonormal Hadamard matrices of any order that
has one here, their randomized form, and their application without forming the matrix.

Construction: an order-``n`` rotation is ``A (x) S_p`` with ``S_p`` the orthonormal Sylvester matrix of
the power-of-two part ``p`` of ``n`` and ``A`` the smallest Paley Hadamard matrix the rest admits
(:func:`hadamard_factors`; a seeded random orthogonal matrix where no Hadamard matrix of that order
exists). Randomized Hadamard (QuaRot): ``D (A (x) S_p)`` with ``D`` a diagonal of seeded random signs
(:func:`hadamard_matrix`). Application: :func:`kron_apply` multiplies by a Kronecker product one small
factor at a time (``x [..., n] -> x H``, ``sum d_j`` instead of ``n`` multiply-adds per element);
:func:`hadamard_rotate` is the randomized rotation of a tensor's last dim, :class:`OnlineHadamard` the
module that applies the plain one at inference (the model surgery that places it is
:mod:`lrquant.transforms.rotation`).

Every matrix is float64; the appliers compute in the input's dtype.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import nn

from ..errors import ConfigError

MAX_FACTOR = 128
"""Largest Sylvester Kronecker factor applied as one GEMM by :func:`kron_apply`."""

FALLBACK_SEED = 0
"""Seed of the random orthogonal factor used where no Hadamard matrix of the needed order is known, so
that the same size always gives the same matrix (an exporter can rebuild it from the size alone)."""


# ---------------------------------------------------------------------------------------------- matrices
def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, math.isqrt(q) + 1))


def _jacobsthal(q: int) -> torch.Tensor:
    """``[q, q]`` float64 Jacobsthal matrix ``J[i, j] = chi(j - i)`` (quadratic character mod prime q)."""
    residues = {(x * x) % q for x in range(1, q)}
    chi = torch.tensor([0.0] + [1.0 if a in residues else -1.0 for a in range(1, q)], dtype=torch.float64)
    idx = torch.arange(q)
    return chi[(idx[None, :] - idx[:, None]) % q]


def _paley(order: int) -> torch.Tensor | None:
    """A ``[order, order]`` ±1 Hadamard matrix by Paley's constructions over a prime field, or None.

    Paley I: ``order = q + 1``, q prime, q = 3 mod 4. Paley II: ``order = 2 (q + 1)``, q prime,
    q = 1 mod 4. (Covers 12, 20, 24, 28, 36, 44, 48, 60, 72, 76, ...: e.g. 576 = 36 x 16, 1536 = 12 x 128.)
    """
    q = order - 1
    if _is_prime(q) and q % 4 == 3:
        s = torch.zeros(order, order, dtype=torch.float64)
        s[0, 1:], s[1:, 0], s[1:, 1:] = 1.0, -1.0, _jacobsthal(q)
        return torch.eye(order, dtype=torch.float64) + s
    q = order // 2 - 1
    if order % 2 == 0 and _is_prime(q) and q % 4 == 1:
        c = torch.zeros(q + 1, q + 1, dtype=torch.float64)
        c[0, 1:], c[1:, 0], c[1:, 1:] = 1.0, 1.0, _jacobsthal(q)
        plus = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
        zero = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
        return torch.kron(c, plus) + torch.kron(torch.eye(q + 1, dtype=torch.float64), zero)
    return None


def _random_orthogonal(m: int, seed: int) -> torch.Tensor:
    """``[m, m]`` float64 Haar-random orthogonal matrix: QR of a seeded Gaussian, signs fixed by diag(R)."""
    g = torch.randn(m, m, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    q, r = torch.linalg.qr(g)
    return (q * torch.sign(torch.diagonal(r))[None, :]).contiguous()


def sylvester(p: int) -> torch.Tensor:
    """``[p, p]`` float64 orthonormal Sylvester Hadamard matrix (``p`` a power of two), symmetric."""
    if p < 1 or p & (p - 1):
        raise ConfigError(f"Sylvester Hadamard needs a power of two, got {p}")
    h = torch.ones(1, 1, dtype=torch.float64)
    base = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    while h.shape[0] < p:
        h = torch.kron(base, h)
    return h / math.sqrt(p)


def hadamard_factors(n: int) -> tuple[torch.Tensor, int, str]:
    """Factor the order-``n`` rotation as ``A (x) S_p``: ``(A [m, m] float64 orthonormal, p, description)``
    with ``n = m p``, ``S_p`` the orthonormal Sylvester matrix of power-of-two order ``p``.

    ``A`` is the smallest Paley Hadamard matrix ``m = (odd part of n) * 2^t`` admits (``m = 1``: pure
    Sylvester). When no Hadamard matrix of any such order is known here (e.g. odd ``n`` > 1 such as 9
    heads, or 2 x odd: no Hadamard matrix of those orders exists), ``A`` is a random orthogonal matrix of
    the odd part (QR of a Gaussian seeded with :data:`FALLBACK_SEED`): still an exact rotation, but its
    entries are not all ``±1/sqrt(n)``.
    """
    if n < 1:
        raise ConfigError(f"rotation size must be positive, got {n}")
    a, p, desc = _factors(n)
    return a.clone(), p, desc


@functools.lru_cache(maxsize=64)
def _factors(n: int) -> tuple[torch.Tensor, int, str]:
    p = n & -n
    odd = n // p
    if odd == 1:
        return torch.ones(1, 1, dtype=torch.float64), n, f"sylvester({n})"
    m = odd
    while m <= n:
        h = _paley(m)
        if h is not None:
            return h / math.sqrt(m), n // m, f"paley({m}) x sylvester({n // m})"
        m *= 2
    return _random_orthogonal(odd, FALLBACK_SEED), p, f"random-orthogonal({odd}) x sylvester({p})"


def random_signs(n: int, seed: int) -> torch.Tensor:
    """``[n]`` float64 of ±1 drawn from a generator seeded with ``seed``."""
    bits = torch.randint(0, 2, (n,), generator=torch.Generator().manual_seed(seed))
    return bits.to(torch.float64) * 2 - 1


def hadamard_matrix(n: int, seed: int | None = None) -> torch.Tensor:
    """``[n, n]`` float64 orthonormal rotation ``D (A (x) S_p)`` (see :func:`hadamard_factors`).

    ``seed=None``: plain (``D = I``); else randomized Hadamard: ``D = diag(random_signs(n, seed))``.
    A true Hadamard matrix scaled by ``1/sqrt(n)`` whenever ``hadamard_factors`` finds one.
    """
    a, p, _ = hadamard_factors(n)
    h = torch.kron(a, sylvester(p))
    if seed is not None:
        h = random_signs(n, seed)[:, None] * h
    return h


def kron_factors(n: int) -> list[torch.Tensor]:
    """The order-``n`` plain rotation ``A (x) S_p`` as a list of float64 Kronecker factors, each of order
    at most :data:`MAX_FACTOR` for the Sylvester part (``S_p = S_q1 (x) S_q2 (x) ...``); empty for n=1."""
    a, p, _ = hadamard_factors(n)
    factors = [a] if a.shape[0] > 1 else []
    while p > 1:
        q = min(p, MAX_FACTOR)
        factors.append(sylvester(q))
        p //= q
    return factors


def kron_apply(x: torch.Tensor, factors: list[torch.Tensor], block: int = 1) -> torch.Tensor:
    """``x [..., d_0 * ... * d_k * block] -> x (F_0 (x) ... (x) F_k (x) I_block)`` for square factors
    ``F_j [d_j, d_j]``: one small GEMM per factor along its axis, ``sum_j d_j`` multiply-adds per element
    instead of ``prod_j d_j`` for the dense matrix (e.g. 36 + 16 instead of 576). Computed in
    ``x.dtype`` (a fast Walsh-Hadamard transform would need ``log2 p`` memory-bound passes; on CPU a few
    GEMMs are faster)."""
    if not factors:
        return x
    y = x.reshape(-1, *(f.shape[0] for f in factors), block)
    for j, f in enumerate(factors):
        y = (y.movedim(j + 1, -1) @ f.to(device=y.device, dtype=y.dtype)).movedim(-1, j + 1)
    return y.reshape(x.shape)


def hadamard_rotate(x: torch.Tensor, seed: int | None = None, block: int = 1) -> torch.Tensor:
    """``x [..., n * block] -> x (hadamard_matrix(n, seed) (x) I_block)`` without forming the matrix
    (randomized: the signs ``D`` first, then :func:`kron_apply`). Computed in ``x.dtype``."""
    n = x.shape[-1] // block
    if seed is not None:
        x = x * random_signs(n, seed).to(device=x.device, dtype=x.dtype).repeat_interleave(block)
    return kron_apply(x, kron_factors(n), block)


class OnlineHadamard(nn.Module):
    """Online rotation of the last dim: ``x [..., size * block] -> x (H_size (x) I_block)``.

    ``H_size`` is the plain (unrandomized) :func:`hadamard_matrix` of ``size``, applied by
    :func:`kron_apply` from its :func:`kron_factors`, kept as non-persistent buffers ``factor0``,
    ``factor1``, ... (checkpoints are unchanged). ``block > 1`` rotates across groups of ``block``
    contiguous channels (across heads).
    """

    def __init__(self, size: int, block: int = 1, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        factors = kron_factors(size)
        self.size, self.block, self.construction = size, block, hadamard_factors(size)[2]
        self.n_factors = len(factors)
        for j, f in enumerate(factors):
            self.register_buffer(f"factor{j}", f.to(dtype), persistent=False)

    def factors(self) -> list[torch.Tensor]:
        return [getattr(self, f"factor{j}") for j in range(self.n_factors)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kron_apply(x, self.factors(), self.block)

    def matrix(self) -> torch.Tensor:
        """The dense ``[size * block, size * block]`` float64 matrix this module multiplies by."""
        h = torch.eye(1, dtype=torch.float64)
        for f in self.factors():
            h = torch.kron(h, f.double().cpu())
        return torch.kron(h, torch.eye(self.block, dtype=torch.float64))

    def spec(self) -> dict[str, int | str]:
        """What an exporter / results.json needs: ``{"size", "block", "construction"}``."""
        return {"size": self.size, "block": self.block, "construction": self.construction}

    def extra_repr(self) -> str:
        return f"size={self.size}, block={self.block}, {self.construction}"
