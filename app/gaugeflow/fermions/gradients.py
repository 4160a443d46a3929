"""Differentiable fermion terms for training flows: the pseudofermion action and a stochastic
gradient of ``log det(D^dagger D)``, each with one CG solve per configuration and no dense matrix.

Both are *surrogates*: functions of the links (and fields) whose autograd gradient is the one
wanted, built from a solution ``x`` that is computed without a graph (CG is not differentiated;
the solution enters as a constant, so the backward pass costs two Dirac applications).

* :func:`pseudofermion_action`: ``S(U, phi) = phi^dagger (D^dagger D)^{-1} phi``. With
  ``x = (D^dagger D)^{-1} phi`` held fixed, ``s = 2 Re<x, phi> - |D x|^2`` has the value
  ``phi^dagger x = S`` at the solution and the gradient ``2 Re<x, d phi> - x^dagger d(D^dagger D) x
  = dS`` (the derivative of the inverse is ``-M^{-1} dM M^{-1}``). This is the joint target of
  pseudofermion flows (Albergo et al. 2106.05934; Abbott et al. 2207.08945).
* :func:`stochastic_logdet`: ``d log det(D^dagger D) = 2 Re tr(D^{-1} dD) = 2 E_eta Re(eta^dagger
  D^{-1} dD eta)`` for complex Gaussian ``eta`` with ``E[eta eta^dagger] = 1``. With
  ``xi = D^{-dagger} eta = D (D^dagger D)^{-1} eta`` (one CG solve), ``2 Re<xi, D(U) eta>`` has
  that estimate as its gradient; its value (``2|eta|^2``) carries no information and is removed,
  so the surrogate is zero-valued. This is the stochastic marginal training of docs/fermions.md
  (the estimator of the determinant's force in HMC, applied to reparametrised flow samples).
"""

from __future__ import annotations

import torch

from gaugeflow.fermions.fields import gaussian_fermion, inner
from gaugeflow.fermions.solvers import cg
from gaugeflow.fermions.wilson import WilsonDirac


def pseudofermion_action(op: WilsonDirac, phi: torch.Tensor, *, tol: float = 1e-10,
                         maxiter: int = 10_000) -> tuple[torch.Tensor, int]:
    """``phi^dagger (D^dagger D)^{-1} phi`` per configuration, differentiable in the links of ``op``
    (built from links with a graph) and in ``phi``; also the CG iterations (summed over the batch).

    The value is exact to the solver's ``tol``; :class:`gaugeflow.fermions.SolverNotConverged` if
    CG does not converge within ``maxiter``.
    """
    with torch.no_grad():
        res = cg(op.normal, phi.detach(), tol=tol, maxiter=maxiter)
    x = res.x
    dx = op.apply(x)
    s = 2.0 * inner(x, phi).real - inner(dx, dx).real
    return s, int(res.iterations.sum())


def stochastic_logdet(op: WilsonDirac, generator: torch.Generator | None = None, n_noise: int = 1, *,
                      tol: float = 1e-10, maxiter: int = 10_000) -> tuple[torch.Tensor, int]:
    """A zero-valued function of the links whose gradient is an unbiased estimate of the gradient of
    ``log det(D^dagger D)`` (``n_noise`` Gaussian vectors, one CG solve each); also the CG
    iterations (summed)."""
    if n_noise < 1:
        raise ValueError(f"n_noise must be >= 1, got {n_noise}")
    total, iters = None, 0
    shape = (op.links.shape[0], *op.lattice_shape, op.n_spin, op.n_colour)
    for _ in range(int(n_noise)):
        eta = gaussian_fermion(shape, generator, op.links.dtype, op.links.device)
        with torch.no_grad():
            res = cg(op.normal, eta, tol=tol, maxiter=maxiter)
            xi = op.apply(res.x)  # D (D^dagger D)^{-1} eta = D^{-dagger} eta
        iters += int(res.iterations.sum())
        g = 2.0 * inner(xi, op.apply(eta)).real
        total = g if total is None else total + g
    total = total / n_noise
    return total - total.detach(), iters

