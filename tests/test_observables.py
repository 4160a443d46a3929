"""Observables: Wilson/Polyakov loops, topological charge, clover E, Wilson flow.

All checks run in float64 / complex128 on tiny, deliberately non-hypercubic lattices.
Tolerances: 1e-12 for identities that only suffer rounding (sums of O(100) terms of
size O(1) at 1e-16 each); others are derived where they are used.
"""

from __future__ import annotations

import math

import pytest
import torch

from gaugeflow.groups import get_group
from gaugeflow.groups.matrix import dagger, mul, trace
from gaugeflow.lattice import coordinates
from gaugeflow.observables import (
    FlowRecord,
    clover_field_strength,
    energy_density_clover,
    mean_plaquette,
    plaquette,
    polyakov_loop,
    polyakov_loop_abs,
    topological_charge,
    topological_charge_clover,
    topological_charge_density_clover,
    topological_charge_u1_2d,
    wilson_flow,
    wilson_loop,
)
from gaugeflow.theories.gauge import GaugeAction, gauge_transform

ROUND = 1e-12

# (group, lattice shape): U(1) 2d, SU(2) 3d, SU(3) 4d and a 5d case; none hypercubic
CASES = [("u1", (5, 4)), ("su2", (3, 4, 2)), ("su3", (3, 2, 4, 3)), ("u1", (2, 3, 2, 2, 2))]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _hot(group, shape, batch=2, seed=0):
    d = len(shape)
    return group.random((batch, d, *shape), generator=_gen(seed))


def _omega(group, shape, batch=2, seed=1):
    return group.random((batch, *shape), generator=_gen(seed))


def _eye_like(u):
    return torch.eye(u.shape[-1], dtype=u.dtype).expand_as(u)


def _observables(links):
    """Every gauge-invariant observable applicable to ``links``, by name."""
    d, n = links.shape[1], links.shape[-1]
    obs = {
        "plaquette": mean_plaquette(links),
        "wilson_1x2": wilson_loop(links, 1, 2),
        "wilson_2x2": wilson_loop(links, 2, 2),
        "polyakov_last": polyakov_loop(links),
        "polyakov_0": polyakov_loop(links, mu=0),
        "energy": energy_density_clover(links),
    }
    if d == 2 and n == 1:
        obs["q_geometric_raw"] = topological_charge_u1_2d(links, rounded=False)
    if d == 4:
        obs["q_clover"] = topological_charge_clover(links)
        obs["q_density"] = topological_charge_density_clover(links)
    return obs


# --------------------------------------------------------------------------- symmetry


@pytest.mark.parametrize("name,shape", CASES)
def test_gauge_invariance(name, shape):
    g = get_group(name)
    u = _hot(g, shape)
    om = _omega(g, shape)
    v = gauge_transform(u, om)
    assert (v - u).abs().max() > 0.1  # the transformation really moves the links
    before, after = _observables(u), _observables(v)
    for key in before:
        assert torch.allclose(after[key], before[key], atol=ROUND, rtol=0), key
    # the clover field itself is covariant, F -> Omega F Omega^dag
    f_u, f_v = clover_field_strength(u, 0, 1), clover_field_strength(v, 0, 1)
    assert torch.allclose(f_v, mul(mul(om, f_u), dagger(om)), atol=ROUND, rtol=0)


@pytest.mark.parametrize("name,shape", CASES)
def test_flow_gauge_covariance(name, shape):
    g = get_group(name)
    u = _hot(g, shape, seed=2)
    om = _omega(g, shape, seed=3)
    flowed = wilson_flow(u, 0.2, eps=0.05)
    assert (flowed - u).abs().max() > 0.05  # the flow moved the field
    lhs = wilson_flow(gauge_transform(u, om), 0.2, eps=0.05)
    rhs = gauge_transform(flowed, om)
    assert torch.allclose(lhs, rhs, atol=ROUND, rtol=0)


# --------------------------------------------------------------------------- cold field


@pytest.mark.parametrize("name,shape", CASES + [("su3", (2, 3, 2, 2)), ("u1", (3, 2, 2, 4))])
def test_cold_configuration(name, shape):
    g = get_group(name)
    u = g.identity((2, len(shape), *shape))
    one = torch.ones(2, dtype=torch.float64)
    for key, val in _observables(u).items():
        if key.startswith("q_") or key == "energy":
            assert torch.equal(val, torch.zeros_like(val)), key
        else:
            assert torch.allclose(val, one.to(val.dtype), atol=ROUND, rtol=0), key
    assert torch.allclose(wilson_flow(u, 0.1, eps=0.05), u, atol=ROUND, rtol=0)


# --------------------------------------------------------------------------- loops


def test_wilson_loop_1x1_is_mean_plaquette_and_orientations_averaged():
    g = get_group("su2")
    u = _hot(g, (3, 4, 2), batch=3, seed=4)
    assert torch.allclose(wilson_loop(u, 1, 1), mean_plaquette(u), atol=ROUND, rtol=0)
    # both orientations are averaged, so r x t and t x r are the same observable
    assert torch.allclose(wilson_loop(u, 1, 2), wilson_loop(u, 2, 1), atol=ROUND, rtol=0)
    # and the plaquette mean is the normalised trace of loops.plaquette, plane by plane
    direct = sum(
        trace(plaquette(u, mu, nu)).real.mean((1, 2, 3)) for mu, nu in [(0, 1), (0, 2), (1, 2)]
    ) / (3 * g.N)
    assert torch.allclose(mean_plaquette(u), direct, atol=ROUND, rtol=0)


def _flux_angles(shape, fluxes):
    """Link angles ``(d, *shape)`` with uniform flux ``2 pi n / (L_mu L_nu)`` in each (mu, nu) plane.

    ``theta_nu(x) = f x_mu`` everywhere and ``theta_mu(x) = -f L_mu x_nu`` on the slice
    ``x_mu = L_mu - 1``: every plaquette of the plane then has angle exactly f, including
    the ones that wrap (``f L_mu L_nu = 2 pi n``). Planes must be disjoint.
    """
    x = coordinates(shape).to(torch.float64)
    theta = torch.zeros(len(shape), *shape, dtype=torch.float64)
    fs = {}
    for (mu, nu), n in fluxes.items():
        lm, ln = shape[mu], shape[nu]
        f = 2 * math.pi * n / (lm * ln)
        theta[nu] += f * x[mu]
        theta[mu] += torch.where(x[mu] == lm - 1, -f * lm * x[nu], torch.zeros_like(x[mu]))
        fs[(mu, nu)] = f
    return theta, fs


def _embed(theta, charges):
    """``diag(exp(i q_j theta))`` for the charges q of the embedding, shape ``(*theta.shape, N, N)``."""
    q = torch.tensor(charges, dtype=torch.float64)
    return torch.diag_embed(torch.polar(torch.ones_like(theta[..., None] * q), theta[..., None] * q))


@pytest.mark.parametrize("r,t", [(1, 1), (1, 2), (2, 3), (3, 3)])
def test_wilson_loop_constant_flux_u1(r, t):
    # an abelian r x t loop carries the sum of its r t plaquette angles: Re W = cos(f r t)
    theta, fs = _flux_angles((6, 5), {(0, 1): 1})
    u = _embed(theta, [1.0])[None]
    expected = math.cos(fs[(0, 1)] * r * t)
    assert torch.allclose(wilson_loop(u, r, t), torch.tensor([expected], dtype=torch.float64), atol=ROUND)


def test_polyakov_loop_constant_phase_u1():
    g = get_group("u1")
    shape, a = (4, 6), 0.37
    u = _hot(g, shape, seed=5)
    u[:, -1] = g.from_angle(torch.full((2, *shape), a, dtype=torch.float64))
    expected = torch.polar(torch.tensor(1.0, dtype=torch.float64), torch.tensor(a * shape[-1], dtype=torch.float64))
    for links in (u, gauge_transform(u, _omega(g, shape, seed=6))):
        assert torch.allclose(polyakov_loop(links), expected.expand(2), atol=ROUND, rtol=0)
        assert torch.allclose(polyakov_loop_abs(links), torch.ones(2, dtype=torch.float64), atol=ROUND)
    # along axis 0 (length 4) only the random links enter; check against the explicit product
    expl = u[:, 0, 0, :, 0, 0] * u[:, 0, 1, :, 0, 0] * u[:, 0, 2, :, 0, 0] * u[:, 0, 3, :, 0, 0]
    assert torch.allclose(polyakov_loop(u, mu=0), expl.mean(-1), atol=ROUND, rtol=0)


def test_polyakov_loop_matches_explicit_product_su3():
    # odd length 5 exercises the binary doubling with a leftover piece
    g = get_group("su3")
    u = _hot(g, (2, 5), seed=7)
    line = u[:, 1, :, 0]
    for k in range(1, 5):
        line = line @ u[:, 1, :, k]
    expected = trace(line).mean(-1) / 3
    assert torch.allclose(polyakov_loop(u, mu=1), expected, atol=ROUND, rtol=0)


# --------------------------------------------------------------------------- topology


def test_geometric_charge_integer_and_charge_conjugation():
    g = get_group("u1")
    u = _hot(g, (6, 5), batch=16, seed=8)
    raw = topological_charge_u1_2d(u, rounded=False)
    q = topological_charge_u1_2d(u)
    assert torch.allclose(raw, q, atol=1e-10, rtol=0)  # 30 angles, each exact to ~1e-16
    assert torch.equal(q, torch.round(q))
    assert q.abs().max() >= 1  # hot fields do populate non-trivial sectors
    assert torch.equal(topological_charge_u1_2d(u.conj()), -q)
    assert torch.equal(topological_charge(u), q)
    # complex64: the float32 angles are summed in float64 and give the same integers
    assert torch.equal(topological_charge_u1_2d(u.to(torch.complex64)), q.float())


@pytest.mark.parametrize("n", [-2, -1, 0, 1, 3])
def test_geometric_charge_of_constant_flux(n):
    # every plaquette has angle 2 pi n / V in (-pi, pi), so Q = n exactly
    theta, _ = _flux_angles((5, 4), {(0, 1): n})
    u = _embed(theta, [1.0])[None]
    assert topological_charge_u1_2d(u).item() == n


# constant abelian flux in the (0,1) and (2,3) planes, embedded as diag(e^{i q_j a})
EMBEDDINGS = {"u1": [1.0], "su2": [1.0, -1.0], "su3": [1.0, -1.0, 0.0]}


@pytest.mark.parametrize("name", ["su2", "su3", "u1"])
@pytest.mark.parametrize("n01,n23", [(1, 2), (2, -1)])
def test_clover_charge_and_energy_exact_for_constant_flux(name, n01, n23):
    # Derivation. Every leaf of the (0,1) clover is diag(e^{i q_j f01}) (all plaquettes of
    # that plane equal, and diagonal links commute), so Q_leaves = 4 diag(e^{i q_j f01}) and
    # F_01 = (Q - Q^dag)/(8i) = sin(f01) H with H = diag(q_j) (traceless for SU(N)); likewise
    # F_23 = sin(f23) H. The (0,1) links depend on x0, x1 only and the (2,3) links on x2, x3,
    # so every mixed-plane plaquette is 1 and F_{mu nu} = 0 there. With c = tr H^2:
    #   E = sum_{mu<nu} tr F^2 = c (sin^2 f01 + sin^2 f23)                  per site,
    #   q = (1/32pi^2) eps tr FF = (8/32pi^2) tr F_01 F_23 = c sin f01 sin f23 / (4 pi^2),
    # the 8 counting (mu nu) in {01, 10} x (rho sigma) in {23, 32} x the two plane orders,
    # all with sign +1. Q = V q -> c n01 n23 as L -> infinity (2 n01 n23 for SU(N)).
    shape = (4, 3, 3, 4)
    vol = math.prod(shape)
    charges = EMBEDDINGS[name]
    c = sum(qj * qj for qj in charges)
    fields, expect_q, expect_e = [], [], []
    for sign in (1, -1):  # n01 -> -n01 must flip Q and keep E
        theta, fs = _flux_angles(shape, {(0, 1): sign * n01, (2, 3): n23})
        fields.append(_embed(theta, charges))
        s01, s23 = math.sin(fs[(0, 1)]), math.sin(fs[(2, 3)])
        expect_q.append(c * vol * s01 * s23 / (4 * math.pi**2))
        expect_e.append(c * (s01**2 + s23**2))
    u = torch.stack(fields)

    f01 = clover_field_strength(u, 0, 1)
    h = torch.diag(torch.tensor(charges, dtype=torch.complex128))
    for b, sign in enumerate((1, -1)):
        s01 = math.sin(2 * math.pi * sign * n01 / (shape[0] * shape[1]))
        assert torch.allclose(f01[b], (s01 * h).expand_as(f01[b]), atol=ROUND, rtol=0)
    assert torch.allclose(clover_field_strength(u, 0, 2), torch.zeros_like(f01), atol=ROUND, rtol=0)
    assert torch.allclose(clover_field_strength(u, 1, 0), -f01, atol=ROUND, rtol=0)

    q = topological_charge_clover(u)
    assert torch.allclose(q, torch.tensor(expect_q, dtype=torch.float64), atol=ROUND, rtol=1e-13)
    assert torch.allclose(q[1], -q[0], atol=ROUND)
    assert abs(q[0].item()) > 0.5  # a charge that would vanish in a sum of traces of F^2
    e = energy_density_clover(u)
    assert torch.allclose(e, torch.tensor(expect_e, dtype=torch.float64), atol=ROUND, rtol=1e-13)
    assert torch.equal(topological_charge(u), q)


def test_topological_charge_dispatch():
    g = get_group("su2")
    u = _hot(g, (2, 3, 2, 3), seed=9)
    flowed = wilson_flow(u, 0.3, eps=0.1)
    assert torch.allclose(topological_charge(u, flow_time=0.3, eps=0.1), topological_charge_clover(flowed), atol=ROUND)
    with pytest.raises(ValueError):
        topological_charge(_hot(g, (3, 3, 2)))
    with pytest.raises(ValueError):
        topological_charge(_hot(g, (3, 3)))  # 2d SU(N) has no topological sectors


# --------------------------------------------------------------------------- gradient flow


@pytest.mark.parametrize("m", [(1, 1), (0, 1), (3, 2)])
def test_flow_abelian_heat_equation(m):
    # Small plaquette angle F = A cos(k.x): the U(1) flow linearises to dF/dt = Lap F, so
    # F(t) = A cos(k.x) exp(-lambda t), lambda = 4 (sin^2(k0/2) + sin^2(k1/2)). A wrong
    # normalisation of Z (e.g. oriented plaquettes counted twice) changes lambda by 2.
    shape, amp, t, eps = (6, 4), 1e-3, 0.5, 0.01
    k = [2 * math.pi * m[i] / shape[i] for i in range(2)]
    x = coordinates(shape).to(torch.float64)
    phase = torch.exp(1j * (k[0] * x[0] + k[1] * x[1]))
    theta = torch.zeros(2, *shape, dtype=torch.float64)
    # F = d0 theta_1 - d1 theta_0 (forward differences); solve in Fourier space
    if m[0] != 0:
        theta[1] = (amp / (complex(math.cos(k[0]), math.sin(k[0])) - 1) * phase).real
    else:
        theta[0] = (-amp / (complex(math.cos(k[1]), math.sin(k[1])) - 1) * phase).real
    g = get_group("u1")
    u = g.from_angle(theta)[None]
    u = gauge_transform(u, _omega(g, shape, batch=1, seed=11))  # F is gauge invariant
    f0 = torch.angle(plaquette(u, 0, 1)[0, ..., 0, 0])
    mode = torch.cos(k[0] * x[0] + k[1] * x[1])
    assert torch.allclose(f0, amp * mode, atol=ROUND * amp)

    n = round(t / eps)
    lam = 4 * (math.sin(k[0] / 2) ** 2 + math.sin(k[1] / 2) ** 2)
    z = lam * eps
    ft = torch.angle(plaquette(wilson_flow(u, t, eps=eps), 0, 1)[0, ..., 0, 0])
    # Nonlinearity: dF/dt = Lap sin F; |sin F - F| <= A^3/6, |Lap| <= 8 and the heat kernel
    # is an l-infinity contraction, so the deviation is <= 8 t A^3 / 6 (x2 slack).
    tol_nl = 2 * 8 * t * amp**3 / 6
    # For a linear abelian field RK3 multiplies by R(z) = 1 - z + z^2/2 - z^3/6 per step.
    assert torch.allclose(ft, amp * mode * (1 - z + z**2 / 2 - z**3 / 6) ** n, atol=tol_nl, rtol=0)
    # Against the exact heat kernel: |R(z)^n - e^{-nz}| <= n |R(z) - e^{-z}| <= n z^4 / 24.
    tol = tol_nl + amp * n * z**4 / 24
    assert torch.allclose(ft, amp * mode * math.exp(-lam * t), atol=tol, rtol=0)


def test_flow_decreases_wilson_action_su3():
    g = get_group("su3")
    u = _hot(g, (4, 3, 4, 3), seed=12)
    action = GaugeAction("su3", beta=1.0)
    v, rec = wilson_flow(u, 1.0, eps=0.05, measure={"action": action})
    assert isinstance(rec, FlowRecord)
    s = rec.extra["action"]
    assert s.shape == (21, 2) and rec.energy.shape == (21, 2)
    assert torch.allclose(s[-1], action(v), atol=ROUND * s.abs().max())
    assert (s[1:] < s[:-1]).all()  # strictly: the flow is the gradient flow of S_w
    assert s[-1].max() < 0.5 * s[0].min()  # hot start -> much smoother
    assert torch.allclose(rec.t[-1], torch.tensor(1.0, dtype=torch.float64), atol=1e-15)
    assert torch.allclose(rec.t2_energy, rec.t[:, None] ** 2 * rec.energy, atol=ROUND, rtol=0)
    assert torch.allclose(rec.energy[-1], energy_density_clover(v), atol=ROUND, rtol=0)


def test_flow_rk3_is_third_order():
    # global error C eps^3: halving eps divides it by 8. Measured ratio on this field is
    # ~7.1 (log2 2.83); order 2 or 4 would give log2 2 or 4. The reference at eps/16 has
    # an error 512x below the eps/2 run, so it does not bias the ratio.
    g = get_group("su3")
    u = _hot(g, (4, 4, 3, 3), seed=1)
    t, eps = 0.2, 0.05
    ref = wilson_flow(u, t, eps=eps / 16)
    e1 = (wilson_flow(u, t, eps=eps) - ref).abs().max()
    e2 = (wilson_flow(u, t, eps=eps / 2) - ref).abs().max()
    order = math.log2(e1 / e2)
    assert 2.6 < order < 3.4, order


@pytest.mark.parametrize("name,shape", [("su3", (3, 4, 3, 2)), ("su2", (3, 4, 2)), ("u1", (5, 4))])
def test_flow_stays_in_group(name, shape):
    g = get_group(name)
    v = wilson_flow(_hot(g, shape, seed=13), 0.5, eps=0.02)
    eye = _eye_like(v)
    assert (mul(v, dagger(v)) - eye).abs().max() < 1e-12
    if g.N > 1:
        assert (torch.linalg.det(v) - 1).abs().max() < 1e-12


def test_complex64_matches_complex128():
    g = get_group("su3")
    u = _hot(g, (3, 2, 2, 3), seed=14)
    u32 = u.to(torch.complex64)
    # float32 rounding: ~1e-7 per operation, a few hundred terms per observable
    for key, val in _observables(u32).items():
        ref = _observables(u)[key]
        assert val.dtype in (torch.float32, torch.complex64), key
        assert torch.allclose(val.to(ref.dtype), ref, atol=1e-4, rtol=1e-4), key
    v32, rec = wilson_flow(u32, 0.2, eps=0.05, measure=True)
    assert v32.dtype == torch.complex64 and rec.energy.dtype == torch.float32
    assert torch.allclose(v32.to(torch.complex128), wilson_flow(u, 0.2, eps=0.05), atol=1e-4)


def test_measurement_flow_step_is_accurate_enough():
    # the jobs measure the 4d charge with FLOW_STEP; RK3's error in Q against a 5x finer
    # step is ~5e-5 even on rough fields (measured), far below Q's integer spacing
    from gaugeflow.observables.measure import FLOW_STEP, measure_gauge

    g = get_group("su3")
    gen = torch.Generator().manual_seed(8)
    u = torch.cat([g.exp(s * g.random_algebra((1, 4, 2, 4, 2, 4), gen)) for s in (0.5, 3.0)])
    t = 0.5  # the 4d presets' theory.default_flow_time
    q = measure_gauge(u, g, t)["topological_charge"]
    assert torch.equal(q, topological_charge(u, flow_time=t, eps=FLOW_STEP))
    fine = topological_charge(u, flow_time=t, eps=0.01)
    assert (q - fine).abs().max() < 1e-3
    assert (q - topological_charge_clover(u)).abs().max() > 1e-3  # the flow did change the charge
