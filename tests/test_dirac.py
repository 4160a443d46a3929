"""The Wilson(-clover) Dirac operator (gaugeflow.fermions): algebra, symmetries, dense form, free field.

float64 / complex128 throughout. Tolerances come from rounding: entries of D are O(1) and each
is a sum of at most 2d + 1 + (clover) O(10) terms, so matrix-free and dense forms agree to a few
1e-16 per entry (1e-13 allows for the O(10-100) terms of a field's inner products); dense
log-determinants of n <= 400 unknowns carry relative rounding of about n * 1e-16 (1e-10 absolute
on values of O(100)).
"""

from __future__ import annotations

import math

import pytest
import torch
from gaugeflow.fermions import (
    MAX_DENSE_UNKNOWNS,
    EvenOdd,
    WilsonDirac,
    WilsonFermions,
    boundary_links,
    colour_mul,
    gamma5,
    gamma_matrices,
    gaussian_fermion,
    inner,
    log_det_normal,
    slogdet_dense,
    slogdet_evenodd,
)
from gaugeflow.groups import get_group
from gaugeflow.lattice import coordinates
from gaugeflow.observables import clover_field_strength
from gaugeflow.theories import gauge_transform

ROUND = 1e-13

# (group, lattice shape, kappa, csw, boundary): U(1) 2d, SU(2) / SU(3) / U(1) 4d; none hypercubic
CASES = [
    ("u1", (4, 6), 0.2, 0.0, "antiperiodic"),
    ("u1", (6, 4), 0.2, 1.3, "periodic"),
    ("su2", (2, 2, 2, 4), 0.12, 0.0, "antiperiodic"),
    ("su3", (2, 2, 2, 4), 0.11, 1.7, "antiperiodic"),
    ("u1", (2, 4, 2, 2), 0.12, 1.0, "antiperiodic"),
]
IDS = [f"{g}-{'x'.join(map(str, s))}-csw{c}-{b[:4]}" for g, s, _, c, b in CASES]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _hot(group: str, shape, batch=2, seed=0) -> torch.Tensor:
    return get_group(group).random((batch, len(shape), *shape), generator=_gen(seed))


def _field(op: WilsonDirac, seed=1) -> torch.Tensor:
    return gaussian_fermion(op.field_shape, _gen(seed))


def _dense_by_application(op: WilsonDirac) -> torch.Tensor:
    """Columns ``D e_k`` of the matrix-free operator, configuration by configuration."""
    n = math.prod(op.field_shape[1:])
    cols = []
    for b in range(op.links.shape[0]):
        links = op.links[b : b + 1].expand(n, *op.links.shape[1:])
        single = WilsonDirac(links, op.kappa, op.csw, op.boundary)
        basis = torch.eye(n, dtype=op.dtype).reshape(n, *op.field_shape[1:])
        cols.append(single(basis).reshape(n, n).T)
    return torch.stack(cols)


def _spin_colour(m_spin: torch.Tensor, n: int) -> torch.Tensor:
    return torch.kron(m_spin, torch.eye(n, dtype=m_spin.dtype))


# -- gamma matrices -------------------------------------------------------------------------------


@pytest.mark.parametrize("d", [2, 4])
def test_gamma_algebra(d):
    g, g5 = gamma_matrices(d), gamma5(d)
    s = g.shape[-1]
    eye = torch.eye(s, dtype=g.dtype)
    for mu in range(d):
        assert torch.equal(g[mu], g[mu].conj().T), "hermitian"
        for nu in range(d):
            anti = g[mu] @ g[nu] + g[nu] @ g[mu]
            assert torch.allclose(anti, 2 * eye * (mu == nu), atol=0), "Clifford algebra"
        assert torch.allclose(g5 @ g[mu] + g[mu] @ g5, torch.zeros_like(eye), atol=0)
    assert torch.equal(g5 @ g5, eye) and torch.equal(g5, g5.conj().T)
    if d == 2:
        assert torch.equal(g[0], torch.tensor([[0, 1], [1, 0]], dtype=g.dtype))
        assert torch.equal(g[1], torch.tensor([[0, -1j], [1j, 0]], dtype=g.dtype))
        assert torch.equal(g5, torch.tensor([[1, 0], [0, -1]], dtype=g.dtype))
    else:
        assert torch.equal(g5, g[0] @ g[1] @ g[2] @ g[3])
        assert torch.equal(g5, torch.diag(torch.tensor([1, 1, -1, -1], dtype=g.dtype))), "chiral basis"


def test_unsupported_dimension_and_boundary_refused():
    with pytest.raises(ValueError, match="d = 2 and d = 4"):
        WilsonDirac(_hot("su2", (2, 2, 2)), 0.1)
    with pytest.raises(ValueError, match="boundary"):
        WilsonDirac(_hot("u1", (4, 4)), 0.1, boundary="twisted")
    with pytest.raises(ValueError, match="kappa"):
        WilsonFermions(kappa=-0.1)
    op = WilsonDirac(_hot("u1", (4, 4)), 0.1)
    with pytest.raises(ValueError, match=r"\(batch, \*L, spin, colour\)"):
        op(torch.zeros((2, 4, 4, 1, 2), dtype=torch.complex128))
    assert op.m0 == pytest.approx(1 / 0.2 - 2)


# -- the operator: dense form, hermiticity, adjoint -------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_matrix_free_equals_dense(case):
    group, shape, kappa, csw, boundary = case
    op = WilsonDirac(_hot(group, shape), kappa, csw, boundary)
    dense = op.dense()
    n = math.prod(op.field_shape[1:])
    assert dense.shape == (2, n, n)
    torch.testing.assert_close(_dense_by_application(op), dense, atol=ROUND, rtol=0)
    # index order: psi.reshape(batch, n)
    psi = _field(op)
    torch.testing.assert_close(
        op(psi).reshape(2, n), torch.einsum("bij,bj->bi", dense, psi.reshape(2, n)), atol=ROUND, rtol=0
    )


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_gamma5_hermiticity(case):
    group, shape, kappa, csw, boundary = case
    op = WilsonDirac(_hot(group, shape), kappa, csw, boundary)
    d, nc = len(shape), op.n_colour
    dense = op.dense()
    g5 = torch.kron(torch.eye(math.prod(shape), dtype=dense.dtype), _spin_colour(gamma5(d), nc))
    torch.testing.assert_close(g5 @ dense @ g5, dense.conj().transpose(-1, -2), atol=ROUND, rtol=0)
    assert (dense - dense.conj().transpose(-1, -2)).abs().max() > 0.1, "D itself is not hermitian"
    # on fields: gamma_5 D gamma_5 psi = D^dagger psi with the dense adjoint
    psi = _field(op)
    n = dense.shape[-1]
    expected = torch.einsum("bji,bj->bi", dense.conj(), psi.reshape(2, n))
    torch.testing.assert_close(op.gamma5(op(op.gamma5(psi))).reshape(2, n), expected, atol=ROUND, rtol=0)
    torch.testing.assert_close(op.apply_dagger(psi).reshape(2, n), expected, atol=ROUND, rtol=0)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_adjoint_identity_and_normal_operator(case):
    group, shape, kappa, csw, boundary = case
    op = WilsonDirac(_hot(group, shape, seed=3), kappa, csw, boundary)
    a, b = _field(op, 4), _field(op, 5)
    lhs, rhs = inner(a, op(b)), inner(op.apply_dagger(a), b)
    torch.testing.assert_close(lhs, rhs, atol=ROUND * lhs.abs().max(), rtol=0)
    assert lhs.imag.abs().max() > 1e-3, "a generic complex inner product"
    torch.testing.assert_close(op.normal(b), op.apply_dagger(op(b)), atol=ROUND, rtol=0)
    nb = inner(b, op.normal(b))
    assert (nb.imag.abs() < ROUND * nb.real).all() and (nb.real > 0).all(), "D^dagger D hermitian positive"


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_gauge_covariance(case):
    group, shape, kappa, csw, boundary = case
    g = get_group(group)
    links = _hot(group, shape, seed=6)
    omega = g.random((2, *shape), generator=_gen(7))
    op, op_t = WilsonDirac(links, kappa, csw, boundary), WilsonDirac(gauge_transform(links, omega), kappa, csw, boundary)
    psi = _field(op, 8)
    # D[U^Omega] Omega psi = Omega D[U] psi
    lhs, rhs = op_t(colour_mul(omega, psi)), colour_mul(omega, op(psi))
    torch.testing.assert_close(lhs, rhs, atol=ROUND, rtol=0)
    assert (op_t(psi) - op(psi)).abs().max() > 1e-2, "the transformation is not trivial"


def test_antiperiodic_sign_sits_on_the_last_time_slice():
    links = _hot("su2", (2, 2, 2, 4))
    signed = boundary_links(links, "antiperiodic")
    torch.testing.assert_close(signed[:, :3], links[:, :3], atol=0, rtol=0)
    torch.testing.assert_close(signed[:, 3, ..., :3, :, :], links[:, 3, ..., :3, :, :], atol=0, rtol=0)
    torch.testing.assert_close(signed[:, 3, ..., 3, :, :], -links[:, 3, ..., 3, :, :], atol=0, rtol=0)
    assert boundary_links(links, "periodic") is links


def test_float32_operator_matches_float64():
    links = _hot("su3", (2, 2, 2, 4))
    op = WilsonDirac(links, 0.12, 1.0)
    psi = _field(op)
    low = op.to(torch.complex64)
    out = low(psi.to(torch.complex64))
    assert out.dtype == torch.complex64
    # float32 rounding (6e-8) on O(10)-term sums of O(1) entries
    torch.testing.assert_close(out.to(torch.complex128), op(psi), atol=1e-5, rtol=0)


# -- clover term -------------------------------------------------------------------------------------


def _clover_dense(links: torch.Tensor, csw: float, kappa: float) -> torch.Tensor:
    """``A(x) = 1 - (csw kappa / 2) sum_{mu,nu} sigma_{mu nu} (x) F_{mu nu}(x)`` from the formula."""
    d, nc = links.shape[1], links.shape[-1]
    g = gamma_matrices(d)
    s = g.shape[-1]
    total = 0
    for mu in range(d):
        for nu in range(d):
            if mu == nu:
                continue
            sigma = 0.5j * (g[mu] @ g[nu] - g[nu] @ g[mu])
            f = clover_field_strength(links, mu, nu)
            total = total + torch.einsum("st,...ij->...sitj", sigma, f).reshape(*f.shape[:-2], s * nc, s * nc)
    eye = torch.eye(s * nc, dtype=links.dtype)
    return eye - 0.5 * csw * kappa * total


@pytest.mark.parametrize("case", [c for c in CASES if c[3] != 0.0], ids=[i for c, i in zip(CASES, IDS) if c[3] != 0.0])
def test_clover_term_against_dense_formula(case):
    group, shape, kappa, csw, boundary = case
    links = _hot(group, shape, seed=9)
    op, wilson = WilsonDirac(links, kappa, csw, boundary), WilsonDirac(links, kappa, 0.0, boundary)
    a = _clover_dense(links, csw, kappa)
    psi = _field(op, 10)
    flat = psi.reshape(*psi.shape[:-2], -1, 1)
    a_psi = (a @ flat).reshape(psi.shape)
    torch.testing.assert_close(op.site_matrices(), a, atol=ROUND, rtol=0)
    torch.testing.assert_close(op.site_term(psi), a_psi, atol=ROUND, rtol=0)
    # the plane-by-plane matrix-free form: C = sum sigma F with A = 1 - (csw kappa / 2) C
    torch.testing.assert_close(psi - 0.5 * csw * kappa * op.clover(psi), a_psi, atol=ROUND, rtol=0)
    torch.testing.assert_close(op(psi) - wilson(psi), a_psi - psi, atol=ROUND, rtol=0)
    assert (a_psi - psi).abs().max() > 1e-2, "the clover term is not negligible"
    # and as a block of the dense matrix: D - D_wilson is site-diagonal with blocks A - 1
    bs = op.block_size
    v = math.prod(shape)
    diff = (op.dense() - wilson.dense()).reshape(2, v, bs, v, bs)
    blocks = torch.diagonal(diff, dim1=1, dim2=3).movedim(-1, 1)
    eye = torch.eye(bs, dtype=a.dtype)
    torch.testing.assert_close(blocks, a.reshape(2, v, bs, bs) - eye, atol=ROUND, rtol=0)
    torch.testing.assert_close(diff.abs().sum(), blocks.abs().sum(), atol=1e-10, rtol=0)


def _flux_links(shape, n):
    """2d U(1) links with uniform plaquette angle ``f = 2 pi n / V`` (every plaquette, wrapped ones too)."""
    x = coordinates(shape).to(torch.float64)
    l0, l1 = shape
    f = 2 * math.pi * n / (l0 * l1)
    theta = torch.zeros(2, *shape, dtype=torch.float64)
    theta[1] += f * x[0]
    theta[0] += torch.where(x[0] == l0 - 1, -f * l0 * x[1], torch.zeros_like(x[0]))
    return torch.polar(torch.ones_like(theta), theta)[None, ..., None, None], f


def test_clover_sign_convention_on_constant_flux():
    # F_01 = sin f, sigma_01 = (i/2)[sigma_1, sigma_2] = -sigma_3, so A = 1 + csw kappa sin(f) sigma_3:
    # the docs/conventions.md sign, independently of the code's sigma and F
    links, f = _flux_links((4, 6), 1)
    kappa, csw = 0.2, 1.5
    op = WilsonDirac(links, kappa, csw)
    psi = gaussian_fermion(op.field_shape, _gen(11))
    sigma3 = torch.tensor([1.0, -1.0], dtype=torch.complex128)[:, None]
    torch.testing.assert_close(op.site_term(psi), psi + csw * kappa * math.sin(f) * sigma3 * psi, atol=ROUND, rtol=0)


# -- free field and constant backgrounds ----------------------------------------------------------------


def _free_log_det(shape, kappa, multiplicity, boundary, theta=None):
    """``m sum_p log[(1 - 2 kappa sum cos p)^2 + 4 kappa^2 sum sin^2 p]`` with p_t shifted by pi/L_t if antiperiodic."""
    d = len(shape)
    theta = [0.0] * d if theta is None else theta
    axes = []
    for mu, n in enumerate(shape):
        p = 2 * math.pi * torch.arange(n, dtype=torch.float64) / n + theta[mu]
        if mu == d - 1 and boundary == "antiperiodic":
            p = p + math.pi / n
        axes.append(p)
    ps = torch.stack(torch.meshgrid(*axes, indexing="ij"))
    a = 1 - 2 * kappa * torch.cos(ps).sum(0)
    b2 = 4 * kappa**2 * torch.sin(ps).square().sum(0)
    return multiplicity * torch.log(a**2 + b2).sum()


FREE = [
    ("u1", (4, 6), 1),
    ("u1", (2, 4, 2, 4), 2),
    ("su2", (2, 2, 2, 4), 4),
    ("su3", (2, 2, 2, 4), 6),
]


@pytest.mark.parametrize("boundary", ["antiperiodic", "periodic"])
@pytest.mark.parametrize("group,shape,multiplicity", FREE, ids=[f"{g}-{len(s)}d" for g, s, _ in FREE])
def test_free_field_log_det(group, shape, multiplicity, boundary):
    # multiplicity (S/2) N: D(p) = a + i b.gamma has eigenvalues a +- i|b|, S/2 times each, per colour
    g = get_group(group)
    d = len(shape)
    links = g.identity((1, d, *shape))
    kappa = 0.11 if d == 4 else 0.2
    expected = _free_log_det(shape, kappa, multiplicity, boundary)
    for csw in (0.0, 1.0):  # F = 0 on constant fields: the clover term must vanish
        op = WilsonDirac(links, kappa, csw, boundary)
        for fn in (slogdet_dense, slogdet_evenodd):
            sign, logabs = fn(op)
            torch.testing.assert_close(logabs, expected[None], atol=1e-10, rtol=0)
            torch.testing.assert_close(sign, torch.ones_like(sign), atol=1e-12, rtol=0)


@pytest.mark.parametrize("boundary", ["antiperiodic", "periodic"])
@pytest.mark.parametrize("shape", [(4, 6), (2, 4, 2, 4)])
def test_constant_u1_background_shifts_the_momenta(shape, boundary):
    d = len(shape)
    theta = [0.3, -0.7, 1.1, 0.2][:d]
    angles = torch.tensor(theta, dtype=torch.float64).view(1, d, *([1] * d), 1, 1).expand(1, d, *shape, 1, 1)
    links = torch.polar(torch.ones_like(angles), angles)
    kappa = 0.2 if d == 2 else 0.11
    op = WilsonDirac(links, kappa, 0.0, boundary)
    expected = _free_log_det(shape, kappa, 1 if d == 2 else 2, boundary, theta)
    torch.testing.assert_close(log_det_normal(op), 2 * expected[None], atol=2e-10, rtol=0)
    torch.testing.assert_close(log_det_normal(op, "evenodd"), 2 * expected[None], atol=2e-10, rtol=0)
    assert (expected - _free_log_det(shape, kappa, 1 if d == 2 else 2, boundary)).abs() > 1e-2


def test_det_is_real_for_u1_2d():
    links = _hot("u1", (4, 6), batch=4, seed=12)
    for csw in (0.0, 1.0):
        sign, logabs = slogdet_dense(WilsonDirac(links, 0.24, csw))
        # log det D = log|det D| + i arg: the phase is 0 or pi (rounding of an n = 48 determinant)
        assert (sign.imag.abs() < 1e-12).all(), sign
        assert torch.isfinite(logabs).all()


# -- even/odd --------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_even_odd_blocks_and_schur_log_det(case):
    group, shape, kappa, csw, boundary = case
    op = WilsonDirac(_hot(group, shape, seed=13), kappa, csw, boundary)
    eo = EvenOdd(op)
    dense = op.dense()
    blocks = eo.dense_blocks(dense)
    psi = _field(op, 14)
    psi_e, psi_o = eo.split(psi)
    torch.testing.assert_close(eo.join(psi_e, psi_o), psi, atol=0, rtol=0)
    flat = lambda h: h.reshape(h.shape[0], -1)
    mv = lambda m, h: torch.einsum("bij,bj->bi", m, flat(h))
    # the matrix-free blocks equal the dense ones (packed order = dense order restricted to a parity)
    torch.testing.assert_close(flat(eo.d_ee(psi_e)), mv(blocks["ee"], psi_e), atol=ROUND, rtol=0)
    torch.testing.assert_close(flat(eo.d_oo(psi_o)), mv(blocks["oo"], psi_o), atol=ROUND, rtol=0)
    torch.testing.assert_close(flat(eo.d_eo(psi_o)), mv(blocks["eo"], psi_o), atol=ROUND, rtol=0)
    torch.testing.assert_close(flat(eo.d_oe(psi_e)), mv(blocks["oe"], psi_e), atol=ROUND, rtol=0)
    torch.testing.assert_close(eo.d_oo(eo.d_oo_inv(psi_o)), psi_o, atol=ROUND, rtol=0)
    # D psi assembled from the blocks
    d_psi = eo.join(eo.d_ee(psi_e) + eo.d_eo(psi_o), eo.d_oe(psi_e) + eo.d_oo(psi_o))
    torch.testing.assert_close(d_psi, op(psi), atol=ROUND, rtol=0)
    if csw == 0.0:
        torch.testing.assert_close(blocks["oo"], torch.eye(blocks["oo"].shape[-1], dtype=dense.dtype).expand_as(blocks["oo"]))
    # Schur complement: matrix-free = dense, its dagger by gamma_5, and det D = det D_oo det D_hat
    schur = eo.schur_dense(dense)
    torch.testing.assert_close(flat(eo.schur(psi_e)), mv(schur, psi_e), atol=ROUND, rtol=0)
    torch.testing.assert_close(flat(eo.schur_dagger(psi_e)), mv(schur.conj().transpose(-1, -2), psi_e), atol=ROUND, rtol=0)
    sign, logabs = slogdet_dense(op)
    sign_eo, logabs_eo = slogdet_evenodd(op)
    torch.testing.assert_close(logabs_eo, logabs, atol=1e-11, rtol=0)
    torch.testing.assert_close(sign_eo, sign, atol=1e-11, rtol=0)
    _, logabs_oo = eo.log_det_oo()
    _, logabs_hat = torch.linalg.slogdet(schur)
    torch.testing.assert_close(logabs_oo + logabs_hat, logabs, atol=1e-11, rtol=0)
    if csw != 0.0:
        assert logabs_oo.abs().min() > 1e-3, "D_oo contributes with clover"


def test_even_odd_needs_even_extents():
    with pytest.raises(ValueError, match=r"even extents.*\[3, 4\]"):
        EvenOdd(WilsonDirac(_hot("u1", (3, 4)), 0.1))


# -- dense size guard --------------------------------------------------------------------------------


def test_dense_size_guard_names_the_lattice():
    op = WilsonDirac(_hot("su3", (4, 4, 4, 6), batch=1), 0.1)  # 384 sites x 12 = 4608 unknowns
    assert 384 * 12 > MAX_DENSE_UNKNOWNS
    with pytest.raises(ValueError, match=r"lattice.shape=\[4, 4, 4, 6\].*4608 unknowns"):
        log_det_normal(op)
    with pytest.raises(ValueError, match=r"lattice.shape=\[4, 4, 4, 6\]"):
        slogdet_evenodd(op)
    small = WilsonDirac(_hot("u1", (4, 4), batch=1), 0.1)
    with pytest.raises(ValueError, match="more than the limit 16"):
        small.dense(max_unknowns=16)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_stencil_equals_direction_by_direction_reference(case):
    """The all-hops stencil (neighbour table, and the shift path a domain context takes) equals the
    direction-by-direction spin-projected hop through ``shift``, for D, D^dagger and D^dagger D."""
    from gaugeflow.fermions.wilson import from_internal, to_internal
    from gaugeflow.lattice.geometry import use_shift

    group, shape, kappa, csw, boundary = case
    op = WilsonDirac(_hot(group, shape, batch=3, seed=7), kappa, csw, boundary)
    psi = _field(op, seed=8)
    p = to_internal(psi)
    hop = from_internal(op._hop_reference(p))
    site = op.site_term(psi)
    d_ref = site - kappa * hop
    g5 = op.gamma5
    dd_ref = g5(op.site_term(g5(psi)) - kappa * from_internal(op._hop_reference(to_internal(g5(psi)))))
    scale = psi.abs().max()
    for roll in (False, True):
        ctx = use_shift(lambda f, mu, n: torch.roll(f, -n, 1 + mu)) if roll else torch.enable_grad()
        with ctx:
            assert (op.hop(psi) - hop).abs().max() <= ROUND * scale
            assert (op.apply(psi) - d_ref).abs().max() <= ROUND * scale
            assert (op.apply_dagger(psi) - dd_ref).abs().max() <= ROUND * scale
            assert (op.normal(psi) - op.apply_dagger(op.apply(psi))).abs().max() <= ROUND * scale
            assert (from_internal(op._apply(p)) - d_ref).abs().max() <= ROUND * scale
