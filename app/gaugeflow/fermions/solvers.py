"""Batched conjugate gradient for hermitian positive definite operators (``D^dagger D``, Schur forms).

Every configuration of the batch has its own step lengths and its own relative residual
``|b - A x| / |b|``; a configuration that has converged stops changing (its step length is set
to zero) while the others go on. Inner products go through :func:`gaugeflow.fermions.fields.inner`
(a :func:`~gaugeflow.lattice.geometry.site_reduce`), so a domain-decomposed solve takes the same
steps as the whole-lattice one.

Convergence is decided on the *true* residual: when the recursively updated residual reaches the
tolerance, ``b - A x`` is computed and, where it has not, CG restarts from the current
solution (a reliable update). A solve that has not converged after ``maxiter`` operator
applications raises :class:`SolverNotConverged`, which carries the residuals and iteration
counts; jobs report it in one line.

:func:`cg_mixed` is defect correction: low-precision (complex64) CG solves of ``A e = r`` for
the current float64 residual ``r``, accumulated into a float64 solution whose residual is
recomputed in float64 each time, so the result meets a float64 tolerance.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from gaugeflow.fermions.fields import inner, norm2

__all__ = ["SolveResult", "SolverNotConverged", "cg", "cg_mixed"]

Operator = Callable[[torch.Tensor], torch.Tensor]


class SolverNotConverged(RuntimeError):
    """A solve stopped at its iteration cap above its tolerance.

    Attributes: ``residual`` (``(batch,)`` relative residuals), ``iterations`` (``(batch,)``),
    ``tol``, ``maxiter``, ``solver`` (name).
    """

    def __init__(self, residual: torch.Tensor, iterations: torch.Tensor, tol: float, maxiter: int, solver: str = "CG"):
        self.residual = residual.detach()
        self.iterations = iterations.detach()
        self.tol = float(tol)
        self.maxiter = int(maxiter)
        self.solver = solver
        bad = (self.residual > self.tol).nonzero().flatten().tolist()
        worst = float(self.residual.max()) if self.residual.numel() else float("nan")
        shown = ", ".join(str(i) for i in bad[:8]) + (", ..." if len(bad) > 8 else "")
        super().__init__(
            f"{solver} did not converge in {self.maxiter} iterations: relative residual {worst:.3e} > "
            f"tol {self.tol:.1e} for {len(bad)} of {self.residual.numel()} configurations ({shown})"
        )


@dataclass
class SolveResult:
    """``x``: the solution; ``iterations``: operator applications per configuration (``(batch,)``,
    int64); ``residual``: final true relative residual ``|b - A x| / |b|`` (``(batch,)``, real);
    ``tol``: the tolerance asked for."""

    x: torch.Tensor
    iterations: torch.Tensor
    residual: torch.Tensor
    tol: float = 0.0

    @property
    def converged(self) -> torch.Tensor:
        """``(batch,)`` bool: relative residual within ``tol``."""
        return self.residual <= self.tol


def _per_config(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.view(-1, *([1] * (like.ndim - 1)))


def _relative(rr: torch.Tensor, bb: torch.Tensor) -> torch.Tensor:
    # |b| = 0: the solution is x = 0, report the absolute residual
    return torch.sqrt(rr / torch.where(bb > 0, bb, torch.ones_like(bb)))


@torch.no_grad()
def cg(
    op: Operator,
    b: torch.Tensor,
    x0: torch.Tensor | None = None,
    *,
    tol: float = 1e-10,
    maxiter: int = 10_000,
    raise_on_failure: bool = True,
) -> SolveResult:
    """Solve ``op(x) = b`` for hermitian positive definite ``op``, per configuration.

    Args:
        op: linear map of fields of ``b``'s shape (batch first), e.g. ``WilsonDirac.normal``.
        b: right-hand sides ``(batch, ...)``.
        x0: start (default zero).
        tol: target relative residual ``|b - A x| / |b|`` for every configuration.
        maxiter: cap on operator applications in the iteration (the true-residual checks are extra).
        raise_on_failure: raise :class:`SolverNotConverged` at the cap (else return the result).

    Not differentiable (runs without autograd).
    """
    if maxiter < 0:
        raise ValueError(f"maxiter must be >= 0, got {maxiter}")
    bb = norm2(b)
    target = (tol * tol) * bb
    if x0 is None:
        x = torch.zeros_like(b)
        r = b.clone()
    else:
        x = x0.clone()
        r = b - op(x)
    iters = torch.zeros(b.shape[0], dtype=torch.int64, device=b.device)
    total = 0
    rr = norm2(r)
    active = rr > target
    while bool(active.any()) and total < maxiter:
        p = r.clone()
        while True:
            ap = op(p)
            pap = inner(p, ap).real
            alpha = torch.where(active, rr / torch.where(active, pap, torch.ones_like(pap)), torch.zeros_like(rr))
            a = _per_config(alpha, b).to(b.dtype)
            x = x + a * p
            r = r - a * ap
            rr_new = norm2(r)
            iters += active.to(torch.int64)
            total += 1
            still = active & (rr_new > target)
            beta = torch.where(still, rr_new / torch.where(active, rr, torch.ones_like(rr)), torch.zeros_like(rr))
            rr = torch.where(active, rr_new, rr)
            active = still
            if not bool(active.any()) or total >= maxiter:
                break
            p = r + _per_config(beta, b).to(b.dtype) * p
        # the true residual decides (reliable update): restart where recursion drifted
        r = b - op(x)
        rr = norm2(r)
        active = rr > target
    result = SolveResult(x, iters, _relative(rr, bb), tol=tol)
    if raise_on_failure and bool(active.any()):
        raise SolverNotConverged(result.residual, iters, tol, maxiter)
    return result


@torch.no_grad()
def cg_mixed(
    op: Operator,
    b: torch.Tensor,
    op_low: Operator,
    *,
    tol: float = 1e-10,
    maxiter: int = 10_000,
    inner_tol: float = 1e-5,
    low_dtype: torch.dtype = torch.complex64,
    max_restarts: int = 100,
    raise_on_failure: bool = True,
) -> SolveResult:
    """Mixed-precision CG by defect correction: ``op`` in ``b``'s precision, ``op_low`` in ``low_dtype``.

    Each outer step solves ``op_low(e) = r / |r|`` with :func:`cg` to ``inner_tol`` (or until
    the remaining iteration budget is spent), adds ``|r| e`` to the solution and recomputes
    ``r = b - op(x)`` in full precision. For a :class:`~gaugeflow.fermions.WilsonDirac` ``D``:
    ``cg_mixed(D.normal, b, D.to(torch.complex64).normal)``. ``iterations`` counts low-precision
    operator applications; ``maxiter`` caps them.
    """
    bb = norm2(b)
    target = (tol * tol) * bb
    x = torch.zeros_like(b)
    r = b.clone()
    iters = torch.zeros(b.shape[0], dtype=torch.int64, device=b.device)
    total = 0
    rr = norm2(r)
    active = rr > target
    restarts = 0
    while bool(active.any()) and total < maxiter and restarts < max_restarts:
        scale = torch.where(active, torch.sqrt(rr), torch.ones_like(rr))
        rhs = torch.where(_per_config(active, r), r / _per_config(scale, r).to(r.dtype), torch.zeros_like(r))
        res = cg(op_low, rhs.to(low_dtype), tol=inner_tol, maxiter=maxiter - total, raise_on_failure=False)
        x = x + res.x.to(b.dtype) * _per_config(scale, b).to(b.dtype)
        iters += res.iterations
        total += int(res.iterations.max())
        r = b - op(x)
        rr_new = norm2(r)
        restarts += 1
        if not bool(((rr_new < rr) | ~active).all()):
            rr = rr_new
            break  # no progress: low precision cannot go further
        rr = rr_new
        active = rr > target
    active = rr > target
    result = SolveResult(x, iters, _relative(rr, bb), tol=tol)
    if raise_on_failure and bool(active.any()):
        raise SolverNotConverged(result.residual, iters, tol, maxiter, solver="mixed-precision CG")
    return result
