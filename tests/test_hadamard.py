"""Hadamard maths (:mod:`lrquant.quant.hadamard`): orthonormal constructions (Sylvester powers of two,
Paley I and II, the seeded random-orthogonal fallback), randomized Hadamard, and the matrix-free appliers
(:func:`kron_apply`, :func:`hadamard_rotate`, :class:`OnlineHadamard`) against the dense matrices."""

from __future__ import annotations

import pytest
import torch

from lrquant.errors import ConfigError
from lrquant.quant.hadamard import (
    MAX_FACTOR,
    OnlineHadamard,
    hadamard_factors,
    hadamard_matrix,
    hadamard_rotate,
    kron_apply,
    kron_factors,
    random_signs,
    sylvester,
)


@pytest.mark.parametrize("n", [1, 2, 8, 12, 20, 28, 36, 64, 72, 96, 576, 1536, 9, 18, 6])
def test_hadamard_matrix_orthonormal(n):
    h = hadamard_matrix(n, seed=7)
    assert h.shape == (n, n) and h.dtype == torch.float64
    torch.testing.assert_close(h @ h.T, torch.eye(n, dtype=torch.float64), atol=1e-12, rtol=0)
    _, _, construction = hadamard_factors(n)
    if construction.startswith("random-orthogonal"):
        assert n % 4 and n > 2  # no Hadamard matrix of these orders exists
    else:  # a true (randomized) Hadamard matrix: every entry is +-1/sqrt(n)
        torch.testing.assert_close(h.abs(), torch.full_like(h, n**-0.5), atol=1e-12, rtol=0)


def test_hadamard_constructions_and_randomization():
    assert hadamard_factors(576)[2] == "paley(36) x sylvester(16)"
    assert hadamard_factors(1536)[2] == "paley(12) x sylvester(128)"
    assert hadamard_factors(2048)[2] == "sylvester(2048)"
    assert hadamard_factors(9)[2] == "random-orthogonal(9) x sylvester(1)"
    torch.testing.assert_close(hadamard_matrix(72, seed=3), hadamard_matrix(72, seed=3), atol=0, rtol=0)
    assert (hadamard_matrix(72, seed=3) - hadamard_matrix(72, seed=4)).abs().max() > 0.1
    torch.testing.assert_close(hadamard_matrix(18), hadamard_matrix(18), atol=0, rtol=0)  # fallback is seeded


@pytest.mark.parametrize(("size", "block"), [(8, 1), (96, 1), (72, 1), (9, 8), (1536, 1), (4, 3)])
def test_online_hadamard_equals_dense(size, block):
    m = OnlineHadamard(size, block=block, dtype=torch.float64)
    x = torch.randn(2, 5, size * block, dtype=torch.float64)
    dense = m.matrix()
    torch.testing.assert_close(dense @ dense.T, torch.eye(size * block, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(m(x), x @ dense, atol=1e-12, rtol=0)
    if block == 1:
        torch.testing.assert_close(dense, hadamard_matrix(size), atol=1e-12, rtol=0)
    assert not m.state_dict()  # non-persistent: checkpoints are unchanged


@pytest.mark.parametrize(("size", "seed", "block"), [(64, 3, 1), (72, 5, 1), (96, None, 1), (18, 2, 1), (9, 1, 8)])
def test_hadamard_rotate_equals_dense(size, seed, block):
    x = torch.randn(size * block, 7, dtype=torch.float64).T  # [7, n]: a non-contiguous view, as W.T is
    dense = torch.kron(hadamard_matrix(size, seed), torch.eye(block, dtype=torch.float64))
    torch.testing.assert_close(hadamard_rotate(x, seed, block=block), x @ dense, atol=1e-12, rtol=0)


@pytest.mark.parametrize("p", [1, 2, 4, 64])
def test_sylvester_is_symmetric_orthonormal(p):
    s = sylvester(p)
    torch.testing.assert_close(s, s.T, atol=0, rtol=0)
    torch.testing.assert_close(s @ s, torch.eye(p, dtype=torch.float64), atol=1e-12, rtol=0)
    with pytest.raises(ConfigError, match="power of two"):
        sylvester(12)


def test_paley_one_and_two_and_refusals():
    assert hadamard_factors(20)[2] == "paley(20) x sylvester(1)"  # Paley I: 19 = 3 mod 4
    assert hadamard_factors(36)[2] == "paley(36) x sylvester(1)"  # Paley II: 2 (17 + 1), 17 = 1 mod 4
    for n in (20, 36):
        a, p, _ = hadamard_factors(n)
        signs = a * n**0.5
        torch.testing.assert_close(signs.abs(), torch.ones(n, n, dtype=torch.float64), atol=1e-12, rtol=0)
        assert p == 1
    with pytest.raises(ConfigError, match="positive"):
        hadamard_factors(0)


def test_factors_are_copies_of_the_cache():
    a, _, _ = hadamard_factors(12)
    a.zero_()
    assert hadamard_factors(12)[0].abs().sum() > 0


def test_random_signs_are_seeded():
    torch.testing.assert_close(random_signs(50, 3), random_signs(50, 3), atol=0, rtol=0)
    assert set(random_signs(50, 3).tolist()) == {-1.0, 1.0}
    assert not torch.equal(random_signs(50, 3), random_signs(50, 4))


@pytest.mark.parametrize(("n", "block"), [(1, 1), (576, 1), (2 * MAX_FACTOR * 3, 2), (12, 5)])
def test_kron_apply_equals_the_dense_product(n, block):
    factors = kron_factors(n)
    assert all(f.shape[0] <= max(MAX_FACTOR, hadamard_factors(n)[0].shape[0]) for f in factors)
    dense = torch.eye(1, dtype=torch.float64)
    for f in factors:
        dense = torch.kron(dense, f)
    torch.testing.assert_close(dense, hadamard_matrix(n), atol=1e-12, rtol=0)
    x = torch.randn(3, n * block, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    expected = x @ torch.kron(dense, torch.eye(block, dtype=torch.float64))
    torch.testing.assert_close(kron_apply(x, factors, block), expected, atol=1e-12, rtol=0)
