"""Dynamical fermions: Wilson(-clover) Dirac operators, even/odd preconditioning, CG, determinants, forces,
pseudofermion monomials (even/odd, Hasenbusch, mixed precision).

Fields ``(batch, L_0, ..., L_{d-1}, spin, colour)`` complex (colour 1 for U(1)); d = 2 or 4.
Conventions in docs/conventions.md ("Fermions"), the API in docs/fermions.md.
"""

from gaugeflow.fermions.determinant import (
    log_det_normal,
    slogdet_dense,
    slogdet_evenodd,
)
from gaugeflow.fermions.evenodd import EvenOdd
from gaugeflow.fermions.fields import JointField, cat_fields, fermion_shape, gaussian_fermion, inner, links_of, norm2
from gaugeflow.fermions.force import (
    autograd_link_force,
    determinant_force,
    fermion_determinant_action,
    hopping_derivative,
    pseudofermion_action,
    pseudofermion_force,
    pseudofermion_heatbath,
)
from gaugeflow.fermions.gamma import (
    SpinMonomial,
    gamma5,
    gamma_matrices,
    n_spin,
    sigma_munu,
)
from gaugeflow.fermions.monomials import (
    FermionMatrix,
    HasenbuschRatioMonomial,
    Monomial,
    SiteLogDetMonomial,
    SolverOptions,
    TwoFlavourMonomial,
    build_monomials,
)
from gaugeflow.fermions.solvers import SolveResult, SolverNotConverged, cg, cg_mixed
from gaugeflow.fermions.wilson import (
    BOUNDARIES,
    MAX_DENSE_UNKNOWNS,
    WilsonDirac,
    WilsonFermions,
    boundary_links,
    colour_mul,
    colour_mul_dag,
    kron_spin_colour,
)

__all__ = [
    "JointField",
    "cat_fields",
    "links_of",
    "BOUNDARIES",
    "MAX_DENSE_UNKNOWNS",
    "EvenOdd",
    "FermionMatrix",
    "HasenbuschRatioMonomial",
    "Monomial",
    "SiteLogDetMonomial",
    "SolveResult",
    "SolverNotConverged",
    "SolverOptions",
    "SpinMonomial",
    "TwoFlavourMonomial",
    "WilsonDirac",
    "WilsonFermions",
    "autograd_link_force",
    "boundary_links",
    "build_monomials",
    "cg",
    "cg_mixed",
    "colour_mul",
    "colour_mul_dag",
    "determinant_force",
    "fermion_determinant_action",
    "fermion_shape",
    "gamma5",
    "gamma_matrices",
    "gaussian_fermion",
    "hopping_derivative",
    "inner",
    "kron_spin_colour",
    "log_det_normal",
    "n_spin",
    "norm2",
    "pseudofermion_action",
    "pseudofermion_force",
    "pseudofermion_heatbath",
    "sigma_munu",
    "slogdet_dense",
    "slogdet_evenodd",
]
