"""Fermion determinants of small lattices from the dense Dirac matrix.

Two flavours of Wilson(-clover) fermions weigh a gauge configuration with
``det(D^dagger D) = |det D|^2``; the exact-determinant action is ``S_G - log det(D^dagger D)``.
``det D`` is real for gamma_5-hermitian D (its eigenvalues come in complex-conjugate pairs), so
``log det(D^dagger D) = 2 log|det D|``; it is computed with ``torch.linalg.slogdet`` of the dense
D in complex128 (O(n^3), n = V * spin * colour), never by forming D^dagger D. Dense matrices
are refused beyond :data:`gaugeflow.fermions.wilson.MAX_DENSE_UNKNOWNS` unknowns per
configuration, with a ``ValueError`` naming the lattice.

The even/odd route (:func:`slogdet_evenodd`) uses ``det D = det D_oo * det D_hat``: the
site-local ``D_oo`` (clover) and the dense Schur complement, half the size of D.
"""

from __future__ import annotations

import torch

from gaugeflow.fermions.evenodd import EvenOdd
from gaugeflow.fermions.wilson import WilsonDirac

__all__ = ["log_det_normal", "slogdet_dense", "slogdet_evenodd"]

METHODS = ("dense", "evenodd")


def slogdet_dense(op: WilsonDirac, max_unknowns: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sign, log|det D|)`` per configuration, as ``torch.linalg.slogdet`` (complex unit sign).

    Computed in complex128 whatever the links' dtype; ``log|det D|`` is returned in float64.
    Differentiable with respect to the links.
    """
    m = op.dense(max_unknowns).to(torch.complex128)
    return torch.linalg.slogdet(m)


def slogdet_evenodd(op: WilsonDirac, max_unknowns: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sign, log|det D|)`` from ``log det D = log det D_oo + log det D_hat`` (complex128)."""
    eo = EvenOdd(op.to(torch.complex128) if op.dtype != torch.complex128 else op)
    phase_oo, logabs_oo = eo.log_det_oo()
    sign_hat, logabs_hat = torch.linalg.slogdet(eo.schur_dense(eo.op.dense(max_unknowns)))
    sign = sign_hat * torch.polar(torch.ones_like(phase_oo), phase_oo)
    return sign, logabs_oo + logabs_hat


def log_det_normal(op: WilsonDirac, method: str = "dense", max_unknowns: int | None = None) -> torch.Tensor:
    """``log det(D^dagger D) = 2 log|det D|`` per configuration, in the links' real dtype.

    ``method``: ``"dense"`` (slogdet of D) or ``"evenodd"`` (D_oo and the Schur complement).
    """
    if method not in METHODS:
        raise ValueError(f"log-determinant method must be one of {list(METHODS)}, got {method!r}")
    fn = slogdet_dense if method == "dense" else slogdet_evenodd
    _, logabs = fn(op, max_unknowns)
    return (2.0 * logabs).to(op.dtype.to_real())
