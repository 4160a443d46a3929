"""Elementary operations on batched complex matrices ``(..., N, N)``.

U(1) fields use the same layout with N = 1; products of 1x1 matrices are done
elementwise because a batched matmul of 1x1 blocks is many times slower.

Colour-major kernels
--------------------
The ``*_cm`` functions work on the *colour-major* layout ``(K, N, N, *sites)``: the two
colour indices sit right after one leading (batch) axis and the site axes are innermost
and contiguous. A product is then ``N`` broadcast multiply-adds over long contiguous
site vectors, which vectorises far better than a batched ``matmul`` of 3x3 blocks
(1.4-2x faster on CPU; see ``docs/benchmarks.md``). The actions convert the links
to this layout once per call; public functions keep speaking ``(..., N, N)``.
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


# --------------------------------------------------------------------------- colour-major layout


def mul_cm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Matrix product of colour-major fields ``(K, N, N, *sites)`` (batch and site axes broadcast).

    ``C[:, i, k] = sum_j A[:, i, j] B[:, j, k]`` as ``N`` broadcast multiply-adds; the result
    is a fresh contiguous tensor. Differentiable (the in-place adds act on a fresh temporary).
    """
    n = a.shape[1]
    if n == 1:
        return a * b
    c = a[:, :, 0:1] * b[:, 0:1]
    for j in range(1, n):
        c = c.addcmul_(a[:, :, j : j + 1], b[:, j : j + 1])
    return c


def dagger_cm(a: torch.Tensor) -> torch.Tensor:
    """Hermitian conjugate of a colour-major field, materialised (products read it faster than a view)."""
    return a.transpose(1, 2).conj_physical()


def re_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``Re sum conj(b) a`` over every axis but the first, i.e. ``sum_x Re tr(A B^dagger)``.

    Layout-agnostic (any layout with the batch axis first, as long as ``a`` and ``b`` share it);
    done on the real views, which is faster than a complex product or ``vecdot``.
    """
    prod = torch.view_as_real(a) * torch.view_as_real(b)
    return prod.reshape(prod.shape[0], -1).sum(1)
