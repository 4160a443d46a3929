"""CG (batched, capped, mixed precision), even/odd solves, fermion forces, decomposed runs, devices.

float64 / complex128. Tolerances: solutions are compared with dense solves through the bound
``|x - x*| <= cond(A) * tol * |x*|`` that a relative residual ``tol`` guarantees; forces with
finite differences by a 4-point Richardson stencil (truncation O(eps^4) ~ 1e-16 at eps = 1e-4),
whose rounding is ``u |S| / eps`` ~ 1e-12 |S| and whose CG error (tol 1e-13) is
``1e-13 |S| / eps`` = 1e-9 |S|; decomposed runs equal single-process ones to 1e-12 (sums in
another order).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from gaugeflow.fermions import (
    EvenOdd,
    SolverNotConverged,
    WilsonDirac,
    WilsonFermions,
    cg,
    cg_mixed,
    determinant_force,
    fermion_determinant_action,
    gaussian_fermion,
    inner,
    norm2,
    pseudofermion_action,
    pseudofermion_force,
    pseudofermion_heatbath,
    slogdet_dense,
)
from gaugeflow.groups import get_group
from gaugeflow.groups.matrix import mul, trace

TOL = dict(rtol=1e-12, atol=1e-12)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _hot(group: str, shape, batch=2, seed=0, device="cpu") -> torch.Tensor:
    return get_group(group).random((batch, len(shape), *shape), generator=_gen(seed), device=device)


def _field(op: WilsonDirac, seed=1) -> torch.Tensor:
    return gaussian_fermion(op.field_shape, _gen(seed))


def _normal_dense(op: WilsonDirac) -> torch.Tensor:
    m = op.dense()
    return m.conj().transpose(-1, -2) @ m


def _solve_dense(m: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.linalg.solve(m, b.reshape(b.shape[0], -1)).reshape(b.shape)


def _rel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.sqrt(norm2(a - b) / norm2(b))


# -- CG ----------------------------------------------------------------------------------------------


def test_cg_converges_to_the_dense_solution():
    op = WilsonDirac(_hot("su3", (2, 2, 2, 4), batch=3), 0.12, 1.2)
    b = _field(op, 2)
    tol = 1e-10
    res = cg(op.normal, b, tol=tol)
    m = _normal_dense(op)
    x = _solve_dense(m, b)
    cond = torch.linalg.cond(m)
    assert (res.residual <= tol).all() and res.converged.all()
    assert res.iterations.dtype == torch.int64 and (res.iterations > 5).all()
    # the reported residual is the true one
    true = torch.sqrt(norm2(torch.einsum("bij,bj->bi", m, res.x.reshape(3, -1)) - b.reshape(3, -1)) / norm2(b))
    torch.testing.assert_close(res.residual, true, atol=1e-13, rtol=0)
    assert (_rel(res.x, x) <= cond * tol).all()
    assert (_rel(res.x, x) > 0).all()


def test_cg_configurations_converge_on_their_own():
    # a diagonal toy: configuration 0 is a multiple of the identity (one step), 1 is badly
    # conditioned, 2 has b = 0; converged configurations must not change while 1 iterates
    gen = _gen(3)
    lam = torch.stack([torch.full((50,), 2.0), torch.logspace(0, 3, 50), torch.linspace(1, 2, 50)]).double()
    b = torch.randn(3, 50, generator=gen, dtype=torch.float64).to(torch.complex128)
    b[2] = 0
    res = cg(lambda x: lam * x, b, tol=1e-12)
    assert res.iterations.tolist()[0] == 1 and res.iterations[2] == 0 and res.iterations[1] > 10
    assert torch.equal(res.x[0], b[0] / 2), "alpha = 1/2 exactly, then untouched"
    assert torch.equal(res.x[2], torch.zeros_like(b[2])) and res.residual[2] == 0
    torch.testing.assert_close(res.x[1], b[1] / lam[1], atol=1e-12 * 1e3, rtol=0)


def test_iteration_cap_raises_with_the_residual():
    op = WilsonDirac(_hot("u1", (8, 8), batch=3), 0.24, 0.0)
    b = _field(op, 4)
    with pytest.raises(SolverNotConverged) as info:
        cg(op.normal, b, tol=1e-12, maxiter=5)
    err = info.value
    assert err.residual.shape == (3,) and (err.residual > 1e-12).all() and (err.iterations == 5).all()
    assert err.tol == 1e-12 and err.maxiter == 5
    message = str(err)
    assert "\n" not in message and "did not converge in 5 iterations" in message and "3 of 3" in message
    res = cg(op.normal, b, tol=1e-12, maxiter=5, raise_on_failure=False)
    assert not res.converged.any()
    torch.testing.assert_close(res.residual, err.residual, atol=0, rtol=0)


def test_mixed_precision_cg_reaches_a_float64_tolerance():
    op = WilsonDirac(_hot("su2", (2, 2, 2, 4), batch=2, seed=5), 0.12, 1.0)
    low = op.to(torch.complex64)
    seen = set()

    def op_low(x):
        seen.add(x.dtype)
        return low.normal(x)

    b = _field(op, 6)
    tol = 1e-10
    res = cg_mixed(op.normal, b, op_low, tol=tol)
    assert seen == {torch.complex64}, "the inner solves run in complex64"
    assert res.x.dtype == torch.complex128 and (res.residual <= tol).all()
    m = _normal_dense(op)
    assert (_rel(res.x, _solve_dense(m, b)) <= torch.linalg.cond(m) * tol).all()
    # complex64 alone cannot get there: defect correction is needed
    with pytest.raises(SolverNotConverged):
        cg(low.normal, b.to(torch.complex64), tol=tol, maxiter=300)


@pytest.mark.parametrize("csw", [0.0, 1.3])
def test_even_odd_solve_equals_direct_solve(csw):
    op = WilsonDirac(_hot("su3", (2, 2, 2, 4), batch=2, seed=7), 0.12, csw)
    eo = EvenOdd(op)
    eta = _field(op, 8)
    tol = 1e-12
    res = eo.solve(eta, tol=tol)
    dense = op.dense()
    direct = _solve_dense(dense, eta)
    # error bound: CG on the even sites, then psi_o = D_oo^{-1} (eta_o - D_oe psi_e)
    blocks = eo.dense_blocks(dense)
    schur = eo.schur_dense(dense)
    cond = torch.linalg.cond(schur.conj().transpose(-1, -2) @ schur)
    amplify = torch.linalg.matrix_norm(torch.linalg.solve(blocks["oo"], blocks["oe"]), ord=2)
    assert (_rel(res.x, direct) <= cond * tol * torch.sqrt(1 + amplify**2)).all()
    # the Schur system has fewer iterations than the full normal equations
    full = cg(op.normal, op.apply_dagger(eta), tol=tol)
    assert (res.iterations < full.iterations).all()


# -- forces ------------------------------------------------------------------------------------------


def _fd_derivative(action, links, t, eps=1e-4):
    """``d/d eps S(exp(eps T) U)`` at 0 by the Richardson-extrapolated central difference."""
    group = get_group("u1" if links.shape[-1] == 1 else f"su{links.shape[-1]}")

    def at(e):
        return action(mul(group.exp(e * t), links))

    d1 = (at(eps) - at(-eps)) / (2 * eps)
    d2 = (at(2 * eps) - at(-2 * eps)) / (4 * eps)
    return (4 * d1 - d2) / 3


def _directional(force, t):
    return torch.einsum("...ij,...ji->...", t, force).real.reshape(force.shape[0], -1).sum(1)


FORCE_CASES = [
    ("u1", (4, 6), 0.2, 0.0, "antiperiodic"),
    ("u1", (4, 4), 0.2, 1.0, "periodic"),
    ("su2", (2, 2, 2, 4), 0.12, 0.0, "periodic"),
    ("su3", (2, 2, 2, 4), 0.11, 1.2, "antiperiodic"),
]
FORCE_IDS = [f"{g}-{len(s)}d-csw{c}-{b[:4]}" for g, s, _, c, b in FORCE_CASES]


def _in_algebra(force):
    anti = force + force.conj().transpose(-1, -2)
    assert anti.abs().max() < 1e-13
    if force.shape[-1] > 1:
        assert trace(force).abs().max() < 1e-13


@pytest.mark.parametrize("case", FORCE_CASES, ids=FORCE_IDS)
def test_pseudofermion_force_against_finite_differences(case):
    group, shape, kappa, csw, boundary = case
    fermions = WilsonFermions(kappa, csw, boundary)
    links = _hot(group, shape, seed=9)
    phi = pseudofermion_heatbath(fermions.operator(links), _gen(10))
    force = pseudofermion_force(fermions, links, phi, tol=1e-13)
    _in_algebra(force)
    t = get_group(group).random_algebra(links.shape[:-2], generator=_gen(11))
    fd = _fd_derivative(lambda u: pseudofermion_action(fermions, u, phi, tol=1e-13), links, t)
    s = pseudofermion_action(fermions, links, phi, tol=1e-13)
    torch.testing.assert_close(_directional(force, t), fd, atol=1e-8 * float(s.abs().max() + 1), rtol=0)


def test_pseudofermion_heatbath_action_is_the_noise_norm():
    fermions = WilsonFermions(0.12, 1.0)
    links = _hot("su2", (2, 2, 2, 4), seed=12)
    op = fermions.operator(links)
    eta = gaussian_fermion(op.field_shape, _gen(13))
    phi = pseudofermion_heatbath(op, _gen(13))  # the same noise: phi = D^dagger eta
    torch.testing.assert_close(phi, op.apply_dagger(eta), atol=0, rtol=0)
    s = pseudofermion_action(fermions, links, phi, tol=1e-12)
    torch.testing.assert_close(s, norm2(eta), atol=1e-10 * float(norm2(eta).max()), rtol=0)


@pytest.mark.parametrize("case", FORCE_CASES, ids=FORCE_IDS)
def test_determinant_force_analytic_autograd_and_finite_differences(case):
    group, shape, kappa, csw, boundary = case
    fermions = WilsonFermions(kappa, csw, boundary)
    links = _hot(group, shape, seed=14)
    analytic = determinant_force(fermions, links, "analytic")
    auto = determinant_force(fermions, links, "autograd")
    _in_algebra(analytic)
    torch.testing.assert_close(analytic, auto, atol=1e-12, rtol=0)
    t = get_group(group).random_algebra(links.shape[:-2], generator=_gen(15))
    fd = _fd_derivative(lambda u: fermion_determinant_action(fermions, u), links, t)
    s = fermion_determinant_action(fermions, links)
    torch.testing.assert_close(_directional(analytic, t), fd, atol=1e-9 * float(s.abs().max() + 1), rtol=0)


# -- domain decomposition: 2 gloo processes ------------------------------------------------------------

# (name, group, global shape, lattice grid, kappa, csw); the first two split time (antiperiodic signs)
DECOMPOSED = [
    ("u1-time", "u1", (8, 8), (1, 2), 0.2, 1.0),
    ("su3-time", "su3", (2, 2, 2, 4), (1, 1, 1, 2), 0.12, 1.0),
    ("u1-space", "u1", (4, 8), (2, 1), 0.2, 0.0),
]


def _decomposed_reference():
    ref = {}
    for i, (name, group, shape, _, kappa, csw) in enumerate(DECOMPOSED):
        fermions = WilsonFermions(kappa, csw)
        links = _hot(group, shape, seed=20 + i)
        op = fermions.operator(links)
        psi = _field(op, 30 + i)
        eo = EvenOdd(op)
        res = cg(op.normal, psi, tol=1e-11)
        ref[name] = dict(
            links=links,
            psi=psi,
            d=op(psi),
            ddag=op.apply_dagger(psi),
            dot=inner(psi, op(psi)),
            x=res.x,
            iterations=res.iterations,
            schur=eo.unpack(eo.schur(eo.pack(psi, 0)), 0),
            log_det_oo=eo.log_det_oo()[1],
            force=pseudofermion_force(fermions, links, psi, x=res.x),
        )
    return ref


def _decomposed_worker(rank, world, port, ref):
    from gaugeflow.distributed.domain import Decomposition, decomposed

    torch.set_num_threads(1)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        for name, _, shape, grid, kappa, csw in DECOMPOSED:
            r = ref[name]
            dec = Decomposition(shape, grid)
            fermions = WilsonFermions(kappa, csw)
            links = dec.scatter(r["links"], lead=2)
            psi = dec.scatter(r["psi"])

            def close(actual, expected, what, name=name):
                torch.testing.assert_close(actual, expected, **TOL, msg=lambda m: f"{name} {what}: {m}")

            with decomposed(dec):
                op = fermions.operator(links)
                close(op(psi), dec.scatter(r["d"]), "D psi")
                close(op.apply_dagger(psi), dec.scatter(r["ddag"]), "D^dagger psi")
                close(inner(psi, op(psi)), r["dot"], "<psi, D psi>")
                res = cg(op.normal, psi, tol=1e-11)
                close(res.x, dec.scatter(r["x"]), "CG solution")
                assert torch.equal(res.iterations, r["iterations"]), f"{name}: the same CG iterations"
                eo = EvenOdd(op)
                close(eo.unpack(eo.schur(eo.pack(psi, 0)), 0), dec.scatter(r["schur"]), "Schur complement")
                close(eo.log_det_oo()[1], r["log_det_oo"], "log det D_oo")
                force = pseudofermion_force(fermions, links, psi, x=res.x)
                close(force, dec.scatter(r["force"], lead=2), "pseudofermion force")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_decomposed_dirac_and_cg_equal_single_process():
    from torch.distributed.elastic.utils.distributed import get_free_port

    ref = _decomposed_reference()
    fork = "fork" in mp.get_all_start_methods() and not dist.is_initialized()
    mp.start_processes(
        _decomposed_worker, args=(2, get_free_port(), ref), nprocs=2, join=True, start_method="fork" if fork else "spawn"
    )


# -- devices: nothing lands on torch's default device --------------------------------------------------




@pytest.mark.parametrize("group,shape,csw", [("u1", (4, 4), 1.0), ("su2", (2, 2, 2, 2), 1.0)])
def test_fermions_on_the_inputs_device(group, shape, csw, meta_default):
    assert torch.zeros(1).device.type == "meta"
    cpu = torch.device("cpu")
    links = get_group(group).random((2, len(shape), *shape), generator=_gen(40), device=cpu)
    fermions = WilsonFermions(0.12, csw)
    op = fermions.operator(links)
    gen = _gen(41)
    phi = pseudofermion_heatbath(op, gen)
    outputs = [phi, op(phi), op.apply_dagger(phi), op.normal(phi), op.dense(), op.site_matrices()]
    res = cg(op.normal, phi, tol=1e-10)
    mixed = cg_mixed(op.normal, phi, op.to(torch.complex64).normal, tol=1e-10)
    eo = EvenOdd(op)
    outputs += [res.x, res.iterations, res.residual, mixed.x, mixed.iterations, eo.solve(phi).x, *eo.log_det_oo()]
    outputs += [*slogdet_dense(op), pseudofermion_action(fermions, links, phi)]
    outputs += [pseudofermion_force(fermions, links, phi), determinant_force(fermions, links, "analytic")]
    outputs += [determinant_force(fermions, links, "autograd"), fermion_determinant_action(fermions, links, "evenodd")]
    assert all(t.device == cpu for t in outputs), [t.device for t in outputs]
    assert all(torch.isfinite(t).all() for t in outputs if t.is_floating_point() or t.is_complex())
