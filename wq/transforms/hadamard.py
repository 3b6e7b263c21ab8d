"""Orthogonal matrices for rotation: randomized Hadamard where a Hadamard matrix of that size is
constructible here, a seeded random orthogonal matrix otherwise.

Hadamard matrices (entries +-1, H H^T = n I) are built as Kronecker products of Sylvester's (sizes
2^k) and Paley's (type I: q + 1 for a prime q = 3 mod 4; type II: 2 (q + 1) for a prime q = 1 mod 4).
That covers every width of the common model families (576 = 12 * 12 * 4, 896 = 28 * 32, 1536 =
12 * 128, 3072, 5120 = 20 * 256, ...). A randomized Hadamard D H / sqrt(n), D a random +-1 diagonal, spreads
every input channel over all outputs evenly, which is what makes outliers vanish.
"""

from __future__ import annotations

import functools
import logging

import torch
from torch import Tensor

log = logging.getLogger(__name__)


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, int(q**0.5) + 1))


def _jacobsthal(q: int) -> Tensor:
    """Q[i, j] = legendre(j - i mod q): 0 on the diagonal, +-1 elsewhere."""
    residues = {(x * x) % q for x in range(1, q)}
    chi = torch.tensor([0] + [1 if a in residues else -1 for a in range(1, q)], dtype=torch.float64)
    idx = (torch.arange(q)[None, :] - torch.arange(q)[:, None]) % q
    return chi[idx]


def _paley(n: int) -> Tensor | None:
    """A Paley Hadamard matrix of size n, or None when n is not a Paley size."""
    q = n - 1
    if _is_prime(q) and q % 4 == 3:  # type I
        Q = _jacobsthal(q)
        S = torch.zeros(n, n, dtype=torch.float64)
        S[0, 1:] = 1
        S[1:, 0] = -1
        S[1:, 1:] = Q
        return S + torch.eye(n, dtype=torch.float64)
    if n % 2 == 0:
        q = n // 2 - 1
        if _is_prime(q) and q % 4 == 1:  # type II
            Q = _jacobsthal(q)
            C = torch.zeros(q + 1, q + 1, dtype=torch.float64)
            C[0, 1:] = 1
            C[1:, 0] = 1
            C[1:, 1:] = Q
            A = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
            B = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
            return torch.kron(C, A) + torch.kron(torch.eye(q + 1, dtype=torch.float64), B)
    return None


def _is_paley_size(n: int) -> bool:
    return (_is_prime(n - 1) and (n - 1) % 4 == 3) or (n % 2 == 0 and _is_prime(n // 2 - 1) and (n // 2 - 1) % 4 == 1)


@functools.lru_cache(maxsize=256)
def _factors(n: int) -> tuple[int, ...] | None:
    """Sizes of Sylvester (2^k) and Paley factors whose Kronecker product is n x n, or None."""
    if n >= 1 and (n & (n - 1)) == 0:
        return (n,)
    two = n & -n  # the largest power of two dividing n: prefer Sylvester (cheap, exact) factors
    while two >= 1:
        if _is_paley_size(n // two):
            return (n // two, two) if two > 1 else (n,)
        two //= 2
    for a in range(4, n // 2 + 1, 4):  # smallest Paley factor first; the rest recursively
        if n % a == 0 and _is_paley_size(a):
            rest = _factors(n // a)
            if rest is not None:
                return (a,) + rest
    return None


def _sylvester(n: int) -> Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def _base(n: int) -> Tensor:
    if (n & (n - 1)) == 0:
        return _sylvester(n)
    p = _paley(n)
    if not torch.equal(p @ p.t(), n * torch.eye(n, dtype=torch.float64)):  # internal invariant
        raise AssertionError(f"Paley construction of size {n} is not a Hadamard matrix")
    return p


def hadamard(n: int) -> Tensor | None:
    """An n x n Hadamard matrix (float64, entries +-1), or None when none is constructible here.
    (Sylvester doubling and Kronecker products of Hadamard matrices are Hadamard; each Paley factor is
    checked when built.)"""
    factors = _factors(n)
    if factors is None:
        return None
    h = _base(factors[0])
    for f in factors[1:]:
        h = torch.kron(h, _base(f))
    return h


def random_orthogonal(n: int, seed: int = 0) -> Tensor:
    """Orthogonal n x n (float64): a seeded randomized Hadamard D H / sqrt(n), or, when no Hadamard matrix of
    size n is constructible, the Q factor of a seeded Gaussian matrix (logged)."""
    gen = torch.Generator().manual_seed(seed)
    h = hadamard(n)
    if h is None:
        log.info("no Hadamard matrix of size %d is constructible here; rotating with a random orthogonal matrix", n)
        q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
        return q * torch.sign(torch.diagonal(r))[None, :]
    d = torch.randint(0, 2, (n,), generator=gen, dtype=torch.int64).to(torch.float64) * 2 - 1
    return d[:, None] * h / n**0.5
