"""Elementary operations on batched complex matrices ``(..., N, N)``.

U(1) fields use the same layout with N = 1; products of 1x1 matrices are done
elementwise because a batched matmul of 1x1 blocks is many times slower.
"""

from __future__ import annotations

import torch


def mul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Matrix product ``a @ b`` over the last two axes (broadcasting batch axes)."""
    if a.shape[-1] == 1:
        return a * b
    return torch.matmul(a, b)


def dagger(a: torch.Tensor) -> torch.Tensor:
    """Hermitian conjugate over the last two axes."""
    return a.conj().transpose(-1, -2)


def mul_dag(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b^dagger``."""
    if a.shape[-1] == 1:
        return a * b.conj()
    return torch.matmul(a, dagger(b))


def trace(a: torch.Tensor) -> torch.Tensor:
    """Trace over the last two axes."""
    return a.diagonal(dim1=-2, dim2=-1).sum(-1)


def re_trace(a: torch.Tensor) -> torch.Tensor:
    """Real part of the trace over the last two axes."""
    return a.diagonal(dim1=-2, dim2=-1).real.sum(-1)


def re_trace_mul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``Re tr(a @ b)`` without forming the product (an N^2 instead of N^3 contraction)."""
    return (a * b.transpose(-1, -2)).real.sum((-1, -2))


def eye_like(a: torch.Tensor) -> torch.Tensor:
    n = a.shape[-1]
    return torch.eye(n, dtype=a.dtype, device=a.device).expand(a.shape)
