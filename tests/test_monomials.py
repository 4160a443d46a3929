"""Pseudofermion monomials (fermions/monomials.py): even/odd, Hasenbusch, mixed precision.

float64 / complex128. Tolerances:

* forces against a 4-point Richardson central difference at eps = 1e-4 (truncation O(eps^4)),
  whose rounding is ``u |S| / eps`` ~ 1e-12 |S| and whose CG error (tol 1e-13, an error in S of
  at most ``tol |phi| |x|`` ~ tol cond |S|) is ~ 1e-9 |S|: the bound ``1e-8 (|S| + 1)`` of
  tests/test_fermion_solvers.py;
* heat baths: ``S = |eta|^2`` up to the CG error of every solve involved, ``tol |eta|^2 cond(N)``
  summed over the normal operators N of the monomial (conditions from the dense matrices);
* dense identities: complex128 LU of n <= 512 unknowns, rounding ~ n u |log det| << 1e-9;
* HMC: <exp(-dH)> = 1 within 3 standard errors of the chain means; |dH| ~ eps^2: the ratio of
  rms dH at eps and eps/2 within 4 (1 +- 1/8) at eps = 1/8 (the O(eps^2) correction of the
  ratio, measured at 1/4 -> 1/8, is below a tenth there).
"""

from __future__ import annotations

import math

import pytest
import torch
from gaugeflow.components import build_theory
from gaugeflow.errors import UsageError
from gaugeflow.exact import u1_plaquette
from gaugeflow.fermions import (
    EvenOdd,
    FermionMatrix,
    HasenbuschRatioMonomial,
    SiteLogDetMonomial,
    SolverOptions,
    TwoFlavourMonomial,
    WilsonFermions,
    build_monomials,
    gaussian_fermion,
    norm2,
    pseudofermion_force,
    pseudofermion_heatbath,
)
from gaugeflow.groups import get_group
from gaugeflow.groups.matrix import mul, trace
from gaugeflow.observables import mean_plaquette
from gaugeflow.sampling.hmc import HMC
from gaugeflow.theories import wilson_nf2_theory
from gaugeflow.theories.fermionic import PseudofermionAction


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _hot(group: str, shape, batch=2, seed=0, device="cpu") -> torch.Tensor:
    return get_group(group).random((batch, len(shape), *shape), generator=_gen(seed), device=device)


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


def _in_algebra(force):
    assert (force + force.conj().transpose(-1, -2)).abs().max() < 1e-12
    if force.shape[-1] > 1:
        assert trace(force).abs().max() < 1e-12


# (group, shape, kappa, csw)
LATTICES = [
    ("u1", (4, 4), 0.2, 0.0),
    ("su2", (2, 2, 2, 2), 0.12, 0.0),
    ("su2", (2, 2, 2, 2), 0.12, 1.0),
    ("su3", (2, 2, 2, 2), 0.11, 1.2),
]
LATTICE_IDS = [f"{g}-{len(s)}d-csw{c}" for g, s, _, c in LATTICES]
# (even_odd, Hasenbusch kappas as fractions of kappa)
VARIANTS = [(False, ()), (True, ()), (False, (0.8,)), (False, (0.6, 0.85)), (True, (0.8,)), (True, (0.6, 0.85))]
VARIANT_IDS = [("eo" if eo else "full") + "".join(f"-hb{f}" for f in hb) for eo, hb in VARIANTS]


def _monomials(kappa, csw, even_odd, fractions, tol=1e-13, mixed=False, boundary="antiperiodic"):
    fermions = WilsonFermions(kappa, csw, boundary)
    return build_monomials(fermions, even_odd, [f * kappa for f in fractions], SolverOptions(tol, 10_000, mixed))


# -- forces --------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("lattice", LATTICES, ids=LATTICE_IDS)
def test_monomial_forces_are_the_derivatives_of_their_actions(lattice, variant):
    group, shape, kappa, csw = lattice
    even_odd, fractions = variant
    links = _hot(group, shape, seed=3)
    monomials = _monomials(kappa, csw, even_odd, fractions)
    # one pseudofermion per factor, plus the clover log-det of D_oo with even/odd
    assert len(monomials) == 1 + len(fractions) + (1 if even_odd and csw else 0)
    t = get_group(group).random_algebra(links.shape[:-2], generator=_gen(4))
    for i, m in enumerate(monomials):
        m.refresh(links, _gen(10 + i))  # phi fixed from here on
        force = m.force(links)
        _in_algebra(force)
        s = m.action(links)
        fd = _fd_derivative(m.action, links, t)
        torch.testing.assert_close(_directional(force, t), fd, atol=1e-8 * float(s.abs().max() + 1), rtol=0,
                                   msg=lambda text, m=m: f"{m.name}: {text}")


def test_plain_monomial_is_the_existing_pseudofermion_force():
    fermions = WilsonFermions(0.12, 1.0)
    links = _hot("su2", (2, 2, 2, 4), seed=5)
    (m,) = build_monomials(fermions, False, [], SolverOptions(1e-12))
    m.refresh(links, _gen(6))
    phi = pseudofermion_heatbath(fermions.operator(links), _gen(6))
    torch.testing.assert_close(m.phi, phi, atol=0, rtol=0)
    torch.testing.assert_close(m.force(links), pseudofermion_force(fermions, links, phi, tol=1e-12),
                               atol=1e-12, rtol=0)


def test_half_lattice_stencil_equals_the_even_odd_blocks():
    """The packed half-lattice Schur operator (single process), the full-lattice form (the one used
    inside a domain context) and EvenOdd.schur are the same operator; forces agree."""
    for group, shape, kappa, csw in [("u1", (4, 6), 0.2, 0.0), ("su3", (2, 4, 2, 4), 0.11, 1.2)]:
        links = _hot(group, shape, seed=7)
        fermions = WilsonFermions(kappa, csw)
        half, full = FermionMatrix(fermions, links, True), FermionMatrix(fermions, links, True, half_lattice=False)
        assert half.half is not None and full.half is None
        eo = EvenOdd(fermions.operator(links))
        x = gaussian_fermion(half.noise_shape, _gen(8))
        for m in (half, full):
            torch.testing.assert_close(m.to_packed(m.apply(m.from_packed(x))), eo.schur(x), atol=1e-13, rtol=0)
            torch.testing.assert_close(m.to_packed(m.apply_dagger(m.from_packed(x))), eo.schur_dagger(x),
                                       atol=1e-13, rtol=0)
            torch.testing.assert_close(m.to_full(m.from_packed(x)), eo.unpack(x, 0), atol=0, rtol=0)
        y = gaussian_fermion(half.noise_shape, _gen(9))
        g_half = half.derivative(half.from_packed(y), half.from_packed(x))
        g_full = full.derivative(full.from_packed(y), full.from_packed(x))
        torch.testing.assert_close(g_half, g_full, atol=1e-13, rtol=0)


# -- heat baths -----------------------------------------------------------------------------------


def _cond(m: torch.Tensor) -> torch.Tensor:
    ev = torch.linalg.eigvalsh(m.conj().transpose(-1, -2) @ m)
    return ev[..., -1] / ev[..., 0]


@pytest.mark.parametrize("variant", VARIANTS[1:], ids=VARIANT_IDS[1:])
@pytest.mark.parametrize("lattice", [LATTICES[0], LATTICES[2]], ids=[LATTICE_IDS[0], LATTICE_IDS[2]])
def test_heatbath_action_is_the_noise_norm(lattice, variant):
    """phi drawn from eta of density exp(-|eta|^2) has S(phi) = |eta|^2: the density exp(-S)."""
    group, shape, kappa, csw = lattice
    even_odd, fractions = variant
    tol = 1e-12
    links = _hot(group, shape, seed=11)
    for i, m in enumerate(_monomials(kappa, csw, even_odd, fractions, tol=tol)):
        if isinstance(m, SiteLogDetMonomial):
            continue
        if isinstance(m, TwoFlavourMonomial):
            mats = [m.matrix(links)]
        else:
            mats = list(m.matrices(links))
        m.refresh(links, _gen(20 + i))
        eta = gaussian_fermion(mats[0].noise_shape, _gen(20 + i))
        bound = tol * norm2(eta) * sum(_cond(a.dense()) for a in mats)
        assert ((m.action(links) - norm2(eta)).abs() <= bound).all(), m.name


def test_refresh_per_chain_generators():
    """Chain c draws every pseudofermion from generators[c] alone, in monomial order."""
    theory = wilson_nf2_theory([4, 4], "u1", 2.0, 0.24, fermions="pseudofermion", even_odd=True,
                               hasenbusch=[0.15, 0.2])
    act = theory.action
    links = _hot("u1", (4, 4), batch=3, seed=12)
    act.refresh(links, [_gen(100 + c) for c in range(3)])
    both = [p.clone() for p in act.pseudofermions]
    assert len(both) == 3
    for c in range(3):
        act.refresh(links[c : c + 1], [_gen(100 + c)])
        for a, b in zip(act.pseudofermions, both):
            torch.testing.assert_close(a, b[c : c + 1], atol=0, rtol=0)
    # the pseudofermion part needs drawn fields; the links' marginal action does not
    fresh = PseudofermionAction(theory.action.gauge, theory.action.fermions, hasenbusch=[0.2])
    with pytest.raises(RuntimeError, match="refresh"):
        fresh.fermion_action(links)
    torch.testing.assert_close(fresh(links), fresh.gauge(links) - fresh.fermion_logdet(links))


# -- exactness of the decomposition -----------------------------------------------------------------


@pytest.mark.parametrize("lattice", LATTICES, ids=LATTICE_IDS)
def test_monomials_factorise_the_determinant(lattice):
    """log det D = log det D_oo + log det D_hat; the monomials' factors multiply to det(D^dagger D);
    each Gaussian monomial's matrix-free action is phi^dagger Q phi with the dense kernel Q of factor
    1/det Q."""
    group, shape, kappa, csw = lattice
    links = _hot(group, shape, seed=13)
    fermions = WilsonFermions(kappa, csw)
    op = fermions.operator(links)
    dense = op.dense()
    _, logabs = torch.linalg.slogdet(dense)
    eo = EvenOdd(op)
    _, log_oo = eo.log_det_oo()
    _, log_hat = torch.linalg.slogdet(eo.schur_dense(dense))
    torch.testing.assert_close(logabs, log_oo + log_hat, atol=1e-9, rtol=0)
    if csw == 0.0:
        assert (log_oo == 0).all()
    else:  # the clover blocks' log-det is not constant: it must be in the action
        assert (log_oo.abs() > 1e-3).all()
        torch.testing.assert_close(SiteLogDetMonomial(fermions).action(links), -2 * log_oo, atol=1e-12, rtol=0)
    target = 2 * logabs  # log det(D^dagger D)
    for even_odd, fractions in VARIANTS:
        monomials = _monomials(kappa, csw, even_odd, fractions, tol=1e-13)
        total = sum(m.log_weight_dense(links) for m in monomials)
        torch.testing.assert_close(total, target, atol=1e-9, rtol=0)
        for i, m in enumerate(monomials):
            if isinstance(m, SiteLogDetMonomial):
                continue
            q = m.kernel_dense(links)
            torch.testing.assert_close(-torch.linalg.slogdet(q)[1], m.log_weight_dense(links), atol=1e-9, rtol=0)
            phi = m.refresh(links, _gen(30 + i))
            mat = m.matrix(links) if isinstance(m, TwoFlavourMonomial) else m.matrices(links)[0]
            v = mat.to_packed(phi).reshape(phi.shape[0], -1)
            dense_s = torch.einsum("bi,bij,bj->b", v.conj(), q, v).real
            s = m.action(links)
            torch.testing.assert_close(s, dense_s, atol=1e-9 * float(s.abs().max()), rtol=0)


# -- HMC ---------------------------------------------------------------------------------------------

# (group, shape, beta, kappa, csw, options, batch)
HMC_CASES = [
    ("u1", [4, 4], 2.0, 0.24, None, {}, 32),
    ("u1", [4, 4], 2.0, 0.24, None, {"even_odd": True}, 32),
    ("u1", [4, 4], 2.0, 0.24, None, {"hasenbusch": [0.2]}, 32),
    ("u1", [4, 4], 2.0, 0.24, None, {"even_odd": True, "hasenbusch": [0.15, 0.21]}, 32),
    # mixed precision is slow on a CPU (its heat bath, action and force are checked above): run with -m slow
    pytest.param(("u1", [4, 4], 2.0, 0.24, None, {"even_odd": True, "hasenbusch": [0.2], "mixed_precision": True}, 32),
                 marks=pytest.mark.slow),
    ("su2", [2, 2, 2, 2], 2.2, 0.12, 1.0, {"even_odd": True}, 8),
]
HMC_IDS = ["plain", "eo", "hb", "eo-hb2", "eo-hb-mixed", "su2-clover-eo"]


def _rms_dh(theory, links, n_steps, seed, length=0.5):
    hmc = HMC(theory, n_steps, length, "omelyan", "analytic", _gen(seed))
    p = hmc.momenta(links)  # the same momenta for every n_steps
    h0, _ = hmc.hamiltonian(links, p)
    new, p1 = hmc.integrate(links, p)
    h1, _ = hmc.hamiltonian(new, p1)
    return (h1 - h0).square().mean().sqrt().item()


@pytest.mark.parametrize("case", HMC_CASES, ids=HMC_IDS)
def test_hmc_energy_violation(case):
    """<exp(-dH)> = 1 over equilibrated chains (reversible, area preserving, right heat bath), and
    |dH| = O(eps^2) at fixed links, pseudofermions and momenta."""
    group, shape, beta, kappa, csw, options, batch = case
    theory = wilson_nf2_theory(shape, group, beta, kappa, fermions="pseudofermion", csw=csw, **options)
    assert theory.action.options["even_odd"] == options.get("even_odd", False)
    gen = _gen(40)
    hmc = HMC(theory, 4, 1.0, "omelyan", "analytic", gen)
    links = theory.start(batch, "hot", gen)
    n_therm, n_traj = (6, 8) if group == "u1" else (6, 4)  # from a hot start: <exp(-dH)> > 1 before equilibrium
    expdh = []
    for t in range(n_therm + n_traj):
        r = hmc.trajectory(links)  # refreshes the pseudofermions first
        links = r.fields
        if t >= n_therm:
            expdh.append(torch.exp(-r.delta_h))
    chain_means = torch.stack(expdh, 1).mean(1)
    err = chain_means.std().item() / math.sqrt(batch)
    assert abs(chain_means.mean().item() - 1) < 3 * err, (chain_means.mean().item(), err)
    stats = theory.action.solver_stats()
    assert stats["cg_iterations"] > 0 and stats["solve_seconds"] > 0
    theory.action.refresh(links, gen)
    rms = [_rms_dh(theory, links, n, 41) for n in (2, 4, 8)]  # eps = 1/4, 1/8, 1/16
    ratios = [rms[0] / rms[1], rms[1] / rms[2]]
    assert 3.5 < ratios[1] < 4.5, (rms, ratios)


@pytest.mark.physics
def test_variants_sample_the_same_plaquette_and_charge():
    """Schwinger model, 4x4, beta 2, kappa 0.24: plain, even/odd and Hasenbusch (kappa' = 0.2)
    pseudofermion HMC against exact-determinant HMC, on the plaquette and <Q^2> (the geometric
    charge); errors from the spread of 32 chain means (each pseudofermion run 30 trajectories,
    4-10 s on one core). Power: the dynamical fermions move the plaquette well away from the
    quenched exact value."""
    shape, beta, kappa, chains = [4, 4], 2.0, 0.24, 32

    def run(theory, seed, n_therm=6, n_traj=24):
        gen = _gen(seed)
        hmc = HMC(theory, 4, 1.0, "omelyan", "analytic", gen)
        links = theory.start(chains, "cold", gen)
        plaq, q2 = [], []
        for t in range(n_therm + n_traj):
            links = hmc.trajectory(links).fields
            if t >= n_therm:
                plaq.append(mean_plaquette(links).double())
                q2.append(theory.measure(links)["topological_charge"].double().square())
        out = {}
        for name, series in (("plaquette", plaq), ("q2", q2)):
            means = torch.stack(series, 1).mean(1)
            out[name] = (means.mean().item(), means.std().item() / math.sqrt(chains))
        return out

    # the exact-determinant reference is cheap (a dense 32x32 determinant): a longer run
    ref = run(wilson_nf2_theory(shape, "u1", beta, kappa, fermions="exact"), 50, n_traj=120)
    quenched = u1_plaquette(beta, 16)
    assert abs(ref["plaquette"][0] - quenched) > 3 * ref["plaquette"][1]
    assert ref["q2"][0] > 3 * ref["q2"][1]  # charged sectors are sampled: the <Q^2> check has content
    for i, options in enumerate([{}, {"even_odd": True}, {"hasenbusch": [0.2]}]):
        theory = wilson_nf2_theory(shape, "u1", beta, kappa, fermions="pseudofermion", **options)
        got = run(theory, 51 + i)
        for name in ("plaquette", "q2"):
            (value, err), (want, want_err) = got[name], ref[name]
            assert abs(value - want) < 3 * math.hypot(err, want_err), (options, name, value, err, want, want_err)
        assert abs(got["plaquette"][0] - quenched) > 3 * got["plaquette"][1]


def test_mixed_precision_meets_the_float64_tolerance():
    """complex64 inner solves with complex128 residuals reach the float64 tolerance: heat bath,
    action and force agree with all-float64 solves within the CG error bound (cond x tol)."""
    links = _hot("su2", (2, 2, 2, 4), seed=60)
    fermions = WilsonFermions(0.12, 1.0)
    tol = 1e-10
    exact = build_monomials(fermions, True, [0.1], SolverOptions(tol))
    mixed = build_monomials(fermions, True, [0.1], SolverOptions(tol, mixed_precision=True))
    for i, (a, b) in enumerate(zip(exact, mixed)):
        pa, pb = a.refresh(links, _gen(61 + i)), b.refresh(links, _gen(61 + i))
        if isinstance(a, SiteLogDetMonomial):
            cond = 1.0
        else:
            mats = [a.matrix(links)] if isinstance(a, TwoFlavourMonomial) else list(a.matrices(links))
            cond = float(sum(_cond(m.dense()) for m in mats).max())
            # the ratio's heat bath solves too: phi agrees to the solves' accuracy
            assert float(torch.sqrt(norm2(pa - pb) / norm2(pa)).max()) <= 2 * cond * tol
            b.phi = a.phi
        sa, sb = a.action(links), b.action(links)
        torch.testing.assert_close(sb, sa, atol=2 * cond * tol * float(sa.abs().max()), rtol=0)
        fa, fb = a.force(links), b.force(links)
        torch.testing.assert_close(fb, fa, atol=2 * cond * tol * float(fa.abs().max()), rtol=0)
    assert sum(m.stats()["cg_iterations"] for m in mixed) > 0


# -- devices -------------------------------------------------------------------------------------




@pytest.mark.parametrize("group,shape,csw", [("u1", (4, 4), 0.0), ("su2", (2, 2, 2, 2), 1.0)])
def test_monomials_on_the_inputs_device(group, shape, csw, meta_default):
    assert torch.zeros(1).device.type == "meta"
    cpu = torch.device("cpu")
    links = get_group(group).random((2, len(shape), *shape), generator=_gen(70), device=cpu)
    kappa = 0.12
    for even_odd, fractions, mixed in [(False, (), False), (True, (), False), (False, (0.8,), False),
                                       (True, (0.6, 0.85), False), (True, (0.8,), True)]:
        act = PseudofermionAction(_gauge(group), WilsonFermions(kappa, csw), even_odd=even_odd,
                                  hasenbusch=[f * kappa for f in fractions], mixed_precision=mixed)
        act.refresh(links, [_gen(71), _gen(72)])
        outputs = [*act.pseudofermions, act(links), act.fermion_action(links), act.force(links)]
        outputs += [act.fermion_force(links), *act.monomial_actions(links).values()]
        assert all(t.device == cpu for t in outputs), [t.device for t in outputs]
        assert all(torch.isfinite(t).all() for t in outputs)
        assert act.solver_stats()["cg_iterations"] > 0


def _gauge(group):
    from gaugeflow.theories.gauge import GaugeAction

    return GaugeAction.named(get_group(group), 2.0, "wilson", None)


# -- configuration ---------------------------------------------------------------------------------


def test_preset_keys_build_the_variants():
    base = {"_target_": "gaugeflow.theories.wilson_nf2_theory", "name": "schwinger_2d", "group": "u1", "beta": 2.0,
            "kappa": 0.24, "fermions": "pseudofermion"}
    theory = build_theory({**base, "even_odd": True, "hasenbusch": [0.2], "mixed_precision": True}, [4, 4])
    names = [m.name for m in theory.action.monomials]
    assert names == ["eo_pf(kappa=0.2)", "eo_ratio(kappa=0.24/0.2)"]
    assert theory.action.options == {"even_odd": True, "hasenbusch": [0.2], "mixed_precision": True}
    # the algorithm is not a theory parameter: ensembles of any variant continue each other
    assert not {"even_odd", "hasenbusch", "mixed_precision"} & set(theory.params)
    plain = build_theory({**base, "even_odd": False, "hasenbusch": [], "mixed_precision": False}, [4, 4])
    assert [type(m) for m in plain.action.monomials] == [TwoFlavourMonomial]
    clover = build_theory({**base, "name": "qcd", "group": "su2", "kappa": 0.12, "csw": 1.0, "even_odd": True,
                           "hasenbusch": [0.08, 0.1]}, [2, 2, 2, 2])
    kinds = [type(m) for m in clover.action.monomials]
    assert kinds == [TwoFlavourMonomial, HasenbuschRatioMonomial, HasenbuschRatioMonomial, SiteLogDetMonomial]


def test_bad_variant_input_names_the_key():
    base = {"_target_": "gaugeflow.theories.wilson_nf2_theory", "name": "schwinger_2d", "group": "u1", "beta": 2.0,
            "kappa": 0.24, "fermions": "pseudofermion"}
    for keys, shape, needle in [
        ({"hasenbusch": [0.3]}, [4, 4], r"theory.hasenbusch=\[0.3\]: every Hasenbusch kappa must be below theory.kappa"),
        ({"hasenbusch": [0.24]}, [4, 4], r"theory.hasenbusch=\[0.24\]: every Hasenbusch kappa must be below"),
        ({"hasenbusch": [0.2, 0.1]}, [4, 4], r"theory.hasenbusch=\[0.2, 0.1\]: the Hasenbusch kappas must increase"),
        ({"hasenbusch": [0.1, 0.1]}, [4, 4], r"theory.hasenbusch=\[0.1, 0.1\]: the Hasenbusch kappas must increase"),
        ({"hasenbusch": [-0.1]}, [4, 4], r"theory.hasenbusch=\[-0.1\]: every Hasenbusch kappa must be a positive"),
        ({"hasenbusch": [float("nan")]}, [4, 4], r"theory.hasenbusch=\[nan\]: every Hasenbusch kappa must be a posi"),
        ({"hasenbusch": ["x"]}, [4, 4], r"theory.hasenbusch must be a list of numbers"),
        ({"hasenbusch": 0.2}, [4, 4], r"theory.hasenbusch must be a list of hopping parameters"),
        ({"even_odd": True}, [4, 5],
         r"theory.even_odd=true needs even extents: lattice.shape=\[4, 5\] has the odd extent 5 in direction 1"),
        ({"even_odd": "yes"}, [4, 4], r"theory.even_odd must be true or false"),
        ({"mixed_precision": 1}, [4, 4], r"theory.mixed_precision must be true or false"),
        ({"fermions": "exact", "even_odd": True}, [4, 4],
         r"theory.even_odd is a pseudofermion option: it needs theory.fermions=pseudofermion"),
        ({"fermions": "exact", "hasenbusch": [0.2]}, [4, 4], r"theory.hasenbusch is a pseudofermion option"),
        ({"fermions": "exact", "mixed_precision": True}, [4, 4], r"theory.mixed_precision is a pseudofermion option"),
    ]:
        with pytest.raises(UsageError, match=needle) as info:
            build_theory({**base, **keys}, shape)
        assert len(str(info.value).splitlines()) == 1
    # exact fermions with the defaults spelled out are fine
    build_theory({**base, "fermions": "exact", "even_odd": False, "hasenbusch": [], "mixed_precision": False}, [4, 4])
