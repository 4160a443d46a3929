"""Tests of gaugeflow.exact against the tables of shared/reference/EXACT.md
(sections 1 and 2) and against internal identities of the exact solutions."""

from __future__ import annotations

import math
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import mpmath
import numpy as np
import pytest
from scipy import special

from gaugeflow import exact

INF = math.inf


def ref(text: str) -> tuple[float, float]:
    """Table value and tolerance implied by its printed digits.

    One unit in the last printed digit (the tables are good to their last
    digit whether rounded or truncated), but never tighter than 1e-12 relative:
    the 15-digit entries are compared at 1e-12 as their own accuracy claim
    ("15+ digits", mpmath) and our double-precision sums support.
    """
    value = float(text)
    ulp = 10.0 ** Decimal(text).as_tuple().exponent
    return value, max(ulp, 1e-12 * abs(value))


def check(got: float, text: str) -> None:
    want, tol = ref(text)
    assert abs(got - want) <= tol, f"got {got!r}, table {text} (tol {tol:.1e})"


# ---------------------------------------------------------------------------
# Section 1: 2d U(1)
# ---------------------------------------------------------------------------

# 1a. beta: (L = inf, L = 8, L = 16)
U1_PLAQUETTE = {
    1: ("0.446389965896535", "0.446389965896535", "0.446389965896535"),
    2: ("0.697774657964008", "0.697774658010838", "0.697774657964008"),
    3: ("0.809985293956505", "0.809985547411845", "0.809985293956505"),
    4: ("0.863522611024551", "0.863530042512331", "0.863522611024551"),
    5: ("0.893383137044085", "0.893421249755099", "0.893383137044100"),
    6: ("0.912359304352915", "0.912454914876674", "0.912359304355077"),
    7: ("0.925532210794152", "0.925700364350799", "0.925532210854266"),
}

# 1b. beta: (chi_t L=inf, L=8, L=16, <Q^2> L=8, L=16)
U1_TOPOLOGY = {
    1: ("0.0406362361050721", "0.0406362361050721", "0.0406362361050721", "2.600719111", "10.40287644"),
    2: ("0.0193640456279775", "0.0193640454800509", "0.0193640456279775", "1.239298911", "4.957195681"),
    3: ("0.0110607996865330", "0.0110600470049099", "0.0110607996865330", "0.7078430083", "2.831564720"),
    4: ("0.00755421305540949", "0.00753149889880433", "0.00755421305540944", "0.4820159295", "1.933878542"),
    5: ("0.00575580726390738", "0.00563621063034258", "0.00575580726371742", "0.3607174803", "1.473486660"),
    6: ("0.00466680255967704", "0.00436251320825035", "0.00466680253220137", "0.2792008453", "1.194701448"),
    7: ("0.00393130607388721", "0.00339235675787055", "0.00393130530415617", "0.2171108325", "1.006414158"),
}

# 1c. beta: (log Z L=8, L=16), normalised Haar measure
U1_LOG_Z = {
    1: ("15.0985189444594", "60.3940757778377"),
    2: ("52.7355866551082", "210.942346619637"),
    3: ("101.459690572996", "405.838751184236"),
    4: ("155.198425834166", "620.793035651958"),
    5: ("211.501103008326", "845.998534610569"),
    6: ("269.329476924860", "1077.29539201958"),
    7: ("328.173575949038", "1312.63818626619"),
}

# 1d. L = 16, beta: <Re W(l x l)> for l = 1..8
U1_WILSON_L16 = {
    5: ("0.89338314", "0.63701697", "0.3625265", "0.16466603", "0.059695799", "0.017272652", "0.0039888692", "0.00073521826"),
    6: ("0.9123593", "0.69288893", "0.4380192", "0.23049127", "0.1009596", "0.036810576", "0.011171965", "0.0028224185"),
    7: ("0.92553221", "0.73378048", "0.49833781", "0.28991095", "0.1444736", "0.061673081", "0.022552126", "0.0070644783"),
}

# 1e. (L, beta): P(0..4)
U1_CHARGE = {
    (8, 2): ("0.35899107", "0.23921852", "0.071115814", "0.0095594419", "0.0005930258"),
    (8, 4): ("0.57442106", "0.20347985", "0.0092517777", "5.779e-05", "5.5e-08"),
    (8, 6): ("0.72628806", "0.13594155", "0.00091418064", "2.39e-07", "2.8e-12"),
    (16, 6): ("0.36504095", "0.24015679", "0.068410994", "0.0084479132", "0.00045313448"),
}

L_COLUMNS = (INF, 8, 16)


def _vol(L):
    return None if L == INF else (L, L)


@pytest.mark.parametrize("beta", sorted(U1_PLAQUETTE))
@pytest.mark.parametrize("col", range(3), ids=["Linf", "L8", "L16"])
def test_u1_plaquette_table(beta, col):
    check(exact.u1_plaquette(beta, _vol(L_COLUMNS[col])), U1_PLAQUETTE[beta][col])


@pytest.mark.parametrize("beta", sorted(U1_TOPOLOGY))
@pytest.mark.parametrize("col", range(3), ids=["Linf", "L8", "L16"])
def test_u1_chi_t_table(beta, col):
    check(exact.u1_topological_susceptibility(beta, _vol(L_COLUMNS[col])), U1_TOPOLOGY[beta][col])


@pytest.mark.parametrize("beta", sorted(U1_TOPOLOGY))
@pytest.mark.parametrize("L", [8, 16])
def test_u1_q2_table(beta, L):
    check(exact.u1_q2(beta, (L, L)), U1_TOPOLOGY[beta][3 if L == 8 else 4])


@pytest.mark.parametrize("beta", sorted(U1_LOG_Z))
@pytest.mark.parametrize("L", [8, 16])
def test_u1_log_z_table(beta, L):
    check(exact.u1_log_z(beta, (L, L)), U1_LOG_Z[beta][0 if L == 8 else 1])


@pytest.mark.parametrize("beta", sorted(U1_WILSON_L16))
def test_u1_wilson_loop_table(beta):
    for ell, text in enumerate(U1_WILSON_L16[beta], start=1):
        check(exact.u1_wilson_loop(beta, ell * ell, (16, 16)), text)


@pytest.mark.parametrize("L,beta", sorted(U1_CHARGE))
def test_u1_charge_distribution_table(L, beta):
    q = np.arange(-4, 5)
    p = exact.u1_charge_distribution(beta, (L, L), q)
    np.testing.assert_array_equal(p, p[::-1])  # P(-Q) = P(Q)
    for Q, text in enumerate(U1_CHARGE[(L, beta)]):
        check(p[4 + Q], text)


# --- U(1) identities -------------------------------------------------------


@pytest.mark.parametrize("L,beta", sorted(U1_CHARGE))
def test_u1_charge_sum_rules(L, beta):
    V = L * L
    q = np.arange(-(V // 2), V // 2 + 1)
    p = exact.u1_charge_distribution(beta, V, q)
    assert np.all(p >= -1e-14)  # round-off where P(Q) is ~0
    # Both sums are exact identities; the P(Q) are good to ~1e-15 absolute
    # each, which the V+1 terms (weighted by up to (V/2)^2) inflate.
    assert abs(p.sum() - 1.0) < 1e-12
    assert np.sum(q**2 * p) == pytest.approx(exact.u1_q2(beta, V), rel=1e-10)


def test_u1_charge_small_volumes():
    # V <= 2: |Q| < V/2 forces Q = 0.
    for V in (1, 2):
        assert exact.u1_charge_distribution(1.5, V, [0, 1]).tolist() == [1.0, 0.0]
        assert exact.u1_q2(1.5, V) == 0.0
    # beta = 0: sums of uniform angles, Irwin-Hall densities at the integers.
    np.testing.assert_allclose(exact.u1_charge_distribution(0.0, 3, [-1, 0, 1]), [1 / 8, 3 / 4, 1 / 8], rtol=1e-12)
    np.testing.assert_allclose(exact.u1_charge_distribution(0.0, 4, [-1, 0, 1]), [1 / 6, 2 / 3, 1 / 6], rtol=1e-12)
    assert exact.u1_q2(0.0, 16) == pytest.approx(16 / 12, rel=1e-14)
    # V = 3 (direct convolution) and V = 5 (Fourier series) against <Q^2>.
    for V in (3, 5):
        q = np.arange(-(V // 2), V // 2 + 1)
        p = exact.u1_charge_distribution(1.0, V, q)
        assert p.sum() == pytest.approx(1.0, abs=1e-13)
        assert np.sum(q**2 * p) == pytest.approx(exact.u1_q2(1.0, V), rel=1e-11)
    assert exact.u1_charge_distribution(2.0, 64, 40) == 0.0  # |Q| >= V/2
    assert isinstance(exact.u1_charge_distribution(2.0, 64, 1), float)


@pytest.mark.parametrize("beta,V", [(0.5, 4), (3.0, 64), (7.0, 256)])
def test_u1_plaquette_is_dlogz(beta, V):
    # <Re P> = (1/V) d log Z / d beta; 5-point stencil, O(h^4) ~ 1e-13 error.
    h = 1e-3
    lz = [exact.u1_log_z(beta + k * h, V) for k in (-2, -1, 1, 2)]
    deriv = (lz[0] - 8 * lz[1] + 8 * lz[2] - lz[3]) / (12 * h * V)
    assert deriv == pytest.approx(exact.u1_plaquette(beta, V), rel=1e-9)


@pytest.mark.parametrize("beta,V", [(1.0, 1), (2.0, 9), (5.0, 64), (7.0, 256)])
def test_u1_wilson_loop_identities(beta, V):
    assert exact.u1_wilson_loop(beta, 1, V) == pytest.approx(exact.u1_plaquette(beta, V), rel=1e-14)
    assert exact.u1_wilson_loop(beta, 0, V) == pytest.approx(1.0, rel=1e-14)
    assert exact.u1_wilson_loop(beta, V, V) == pytest.approx(1.0, rel=1e-14)
    if V == 1:  # on a 1x1 torus the abelian plaquette U0 U1 U0* U1* is 1
        assert exact.u1_plaquette(beta, V) == pytest.approx(1.0, rel=1e-14)
    for a in range(V + 1):  # A -> V - A symmetry of the U(1) torus formula
        assert exact.u1_wilson_loop(beta, a, V) == pytest.approx(exact.u1_wilson_loop(beta, V - a, V), rel=1e-12)


def test_u1_large_volume_limits():
    u = special.iv(1, 4.0) / special.iv(0, 4.0)
    assert exact.u1_plaquette(4.0, math.inf) == pytest.approx(u, rel=1e-15)
    assert exact.u1_plaquette(4.0, 10**6) == pytest.approx(u, rel=1e-14)
    assert exact.u1_wilson_loop(4.0, 9, 10**4) == pytest.approx(u**9, rel=1e-13)
    assert exact.u1_topological_susceptibility(4.0, (64, 64)) == pytest.approx(
        exact.u1_topological_susceptibility(4.0, None), rel=1e-12
    )
    # No overflow although I_0(7)^(10^6) ~ 10^(2 million); log Z/V -> log I_0.
    lz = exact.u1_log_z(7.0, 10**6)
    assert lz / 10**6 == pytest.approx(math.log(special.iv(0, 7.0)), rel=1e-13)


@pytest.mark.parametrize("beta,V", [(300.0, 2), (100.0, 1), (60.0, 16)])
def test_u1_large_beta_against_mpmath(beta, V):
    """Adaptive truncation: at large beta many representations contribute."""
    mpmath.mp.dps = 30
    nmax = int(6 * math.sqrt(beta) + 30)
    i_n = [mpmath.besseli(n, beta) for n in range(nmax + 2)]
    z = i_n[0] ** V + 2 * sum(i_n[n] ** V for n in range(1, nmax + 1))
    num = i_n[0] ** (V - 1) * i_n[1] + 2 * sum(
        i_n[n] ** (V - 1) * (i_n[n - 1] + i_n[n + 1]) / 2 for n in range(1, nmax + 1)
    )
    assert exact.u1_log_z(beta, V) == pytest.approx(float(mpmath.log(z)), rel=1e-14)
    assert exact.u1_plaquette(beta, V) == pytest.approx(float(num / z), rel=1e-14)


def test_u1_lebesgue_measure():
    assert exact.u1_log_z(2.0, (8, 8), measure="lebesgue") == pytest.approx(
        exact.u1_log_z(2.0, 64) + 128 * math.log(2 * math.pi), rel=1e-15
    )
    with pytest.raises(ValueError):
        exact.u1_log_z(2.0, 64, measure="flat")


# ---------------------------------------------------------------------------
# Section 2: 2d SU(N)
# ---------------------------------------------------------------------------

SAME = "= u_inf"
# 2a. (N, beta): (u_inf, Weyl-quadrature check, L=4, L=8, L=16)
SUN_TABLE = {
    (2, 1): ("0.240193723870090", "0.24019372387009", "0.240193723983393", SAME, SAME),
    (2, 2): ("0.433127426722312", "0.43312742672231", "0.433128003020837", SAME, SAME),
    (2, 4): ("0.658047267359360", "0.65804726735936", "0.658185074567073", "0.658047267359620", SAME),
    (2, 8): ("0.819249410355621", "0.81924941035562", "0.820306823397674", "0.819249486197285", SAME),
    (3, 1): ("0.0601265548335648", "0.06012655483356", SAME, SAME, SAME),
    (3, 2): ("0.128627785322083", "0.12862778532208", "0.128627785322090", SAME, SAME),
    (3, 4): ("0.279619149409304", "0.27961914940930", "0.279619150169801", SAME, SAME),
    (3, 6): ("0.422531739649983", "0.42253173964998", "0.422532056631069", SAME, SAME),
}

# (N, beta): log Z for L = 4, 8, 16
SUN_LOG_Z = {
    (2, 2): ("7.426153110828", "29.704606306954", "118.818425227817"),
    (3, 6): ("19.774243529880", "79.096965862203", "316.387863448812"),
}


@pytest.mark.parametrize("N,beta", sorted(SUN_TABLE))
def test_sun_plaquette_table(N, beta):
    u_inf, weyl, *torus = SUN_TABLE[(N, beta)]
    u = exact.sun_plaquette(N, beta, None)
    check(u, u_inf)
    check(u, weyl)
    for L, text in zip((4, 8, 16), torus):
        got = exact.sun_plaquette(N, beta, (L, L))
        if text == SAME:
            # EXACT.md: these corrections are < 1e-15 (down to 1e-19), i.e.
            # the torus sum must equal u_inf up to double-precision round-off.
            assert got == pytest.approx(u, rel=5e-15, abs=0), (L, got, u)
        else:
            check(got, text)


@pytest.mark.parametrize("N,beta", sorted(SUN_LOG_Z))
def test_sun_log_z_table(N, beta):
    for L, text in zip((4, 8, 16), SUN_LOG_Z[(N, beta)]):
        check(exact.sun_log_z(N, beta, (L, L)), text)


def test_sun_finite_volume_sizes_quoted_in_text():
    """EXACT.md section 2 quotes torus - u_inf at L = 8 to two digits."""
    for N, beta, quoted in [(2, 4, 2.6e-13), (2, 6, 1.4e-9), (2, 8, 7.6e-8), (3, 12, 1.1e-12)]:
        diff = exact.sun_plaquette(N, beta, 64) - exact.sun_plaquette(N, beta, None)
        assert diff == pytest.approx(quoted, rel=0.05)


# --- SU(N) identities ------------------------------------------------------


@pytest.mark.parametrize("beta", [0.3, 1.0, 4.0, 8.0, 30.0])
def test_su2_closed_forms(beta):
    # u_inf = I_2/I_1 and Z = sum_{d>=1} (2 I_d/beta)^V, independently of the
    # determinant formula; the explicit sum over d is far past convergence.
    assert exact.sun_plaquette(2, beta, None) == pytest.approx(special.iv(2, beta) / special.iv(1, beta), rel=1e-13)
    d = np.arange(1, 2000)
    with np.errstate(divide="ignore"):
        log_b = np.log(special.ive(d, beta)) + beta + math.log(2 / beta)
    for V in (1, 4, 64):
        want = float(special.logsumexp(V * log_b))
        assert exact.sun_log_z(2, beta, V) == pytest.approx(want, rel=1e-13, abs=1e-14)


def test_su2_large_beta_truncation():
    # Small torus at large beta: d up to ~60 contributes, far past a fixed small cutoff.
    beta, V = 200.0, 4
    d = np.arange(1, 500)  # I_500(200)^4 / I_1(200)^4 < 1e-200, and ive(d) > 0
    with np.errstate(divide="ignore"):
        log_b = np.log(special.ive(d, beta)) + beta + math.log(2 / beta)
    assert exact.sun_log_z(2, beta, V) == pytest.approx(float(special.logsumexp(V * log_b)), rel=1e-14)
    w = np.exp(V * log_b - special.logsumexp(V * log_b))
    # b_d'/b_d = I_d'/I_d - 1/beta for b_d = 2 I_d(beta)/beta.
    ive = special.ive
    dlog_b = 0.5 * (ive(d - 1, beta) + ive(d + 1, beta)) / ive(d, beta) - 1 / beta
    assert exact.sun_plaquette(2, beta, V) == pytest.approx(float(np.sum(w * dlog_b)), rel=1e-12)


def _weyl_u_inf(N: int, beta: float, n: int) -> float:
    """<(1/N) Re tr U> for weight exp((beta/N) Re tr U) by Weyl integration.

    Trapezoid rule on an n^(N-1) grid of eigenphases (theta_N = -sum theta_i,
    density |Vandermonde|^2); spectrally accurate for periodic analytic integrands.
    """
    axes = np.meshgrid(*([2 * np.pi * np.arange(n) / n] * (N - 1)), indexing="ij")
    theta = np.stack(list(axes) + [-sum(axes)], axis=-1)
    z = np.exp(1j * theta)
    vand = np.ones(theta.shape[:-1])
    for i in range(N):
        for j in range(i + 1, N):
            vand *= np.abs(z[..., i] - z[..., j]) ** 2
    retr = np.cos(theta).sum(axis=-1)
    w = vand * np.exp(beta / N * (retr - N))
    return float(np.sum(w * retr) / (N * np.sum(w)))


@pytest.mark.parametrize("N,beta", [(2, 8.0), (3, 6.0), (3, 12.0), (4, 4.0), (5, 5.0)])
def test_sun_u_inf_against_weyl_integration(N, beta):
    n = {2: 64, 3: 64, 4: 32, 5: 20}[N]
    assert exact.sun_plaquette(N, beta, None) == pytest.approx(_weyl_u_inf(N, beta, n), rel=1e-12)


@pytest.mark.parametrize("N,beta,V", [(2, 4.0, 16), (3, 6.0, 16), (3, 20.0, 4), (4, 8.0, 9), (5, 5.0, 16), (3, 0.5, 1)])
def test_sun_derivative_matches_wilson_loop_and_log_z(N, beta, V):
    """b' from the differentiated determinants vs the Pieri-rule Wilson loop
    at A = 1 (EXACT.md: equal to 20 digits) and vs d log Z / d beta."""
    p = exact.sun_plaquette(N, beta, V)
    assert exact.sun_wilson_loop(N, beta, 1, V) == pytest.approx(p, rel=1e-13)
    h = 1e-3 * max(beta, 1.0)
    lz = [exact.sun_log_z(N, beta + k * h, V) for k in (-2, -1, 1, 2)]
    deriv = (lz[0] - 8 * lz[1] + 8 * lz[2] - lz[3]) / (12 * h * V)
    assert deriv == pytest.approx(p, rel=1e-8)
    assert exact.sun_wilson_loop(N, beta, 0, V) == pytest.approx(1.0, rel=1e-14)


@pytest.mark.parametrize("N,beta", [(2, 4.0), (3, 6.0)])
def test_sun_large_volume_limits(N, beta):
    u = exact.sun_plaquette(N, beta, math.inf)
    assert exact.sun_plaquette(N, beta, 4096) == pytest.approx(u, rel=1e-14)
    for a in (1, 4, 9):
        assert exact.sun_wilson_loop(N, beta, a, (64, 64)) == pytest.approx(u**a, rel=1e-13)
        assert exact.sun_wilson_loop(N, beta, a, None) == pytest.approx(u**a, rel=1e-15)
    assert exact.sun_log_z(N, beta, 10**6) / 10**6 == pytest.approx(
        exact.sun_log_z(N, beta, 4096) / 4096, rel=1e-13
    )


def test_sun_wilson_loop_finite_volume_differs():
    # On a 4x4 torus the area-4 loop is not u_inf^4 (and not symmetric in A <-> V - A).
    u = exact.sun_plaquette(2, 8.0, None)
    w4 = exact.sun_wilson_loop(2, 8.0, 4, 16)
    assert abs(w4 - u**4) > 1e-4
    assert 0 < w4 < 1


def test_beta_zero():
    assert exact.sun_log_z(3, 0.0, 16) == 0.0
    assert exact.sun_plaquette(3, 0.0, 16) == 0.0
    assert exact.sun_wilson_loop(2, 0.0, 1, 16) == 0.0
    assert exact.u1_log_z(0.0, 16) == 0.0
    assert exact.u1_plaquette(0.0, 16) == 0.0
    assert exact.u1_topological_susceptibility(0.0, None) == pytest.approx(1 / 12, rel=1e-14)


# ---------------------------------------------------------------------------
# API
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "group,n", [("u1", 0), ("U(1)", 0), ("su2", 2), ("SU(2)", 2), ("su(3)", 3), ("SU3", 3), ("su4", 4)]
)
def test_dispatch(group, n):
    vol = (4, 4)
    if n == 0:
        assert exact.plaquette(group, 2.0, vol) == exact.u1_plaquette(2.0, 16)
        assert exact.log_z(group, 2.0, vol) == exact.u1_log_z(2.0, 16)
        assert exact.wilson_loop(group, 2.0, 4, None) == exact.u1_wilson_loop(2.0, 4, None)
    else:
        assert exact.plaquette(group, 2.0, vol) == exact.sun_plaquette(n, 2.0, 16)
        assert exact.log_z(group, 2.0, vol) == exact.sun_log_z(n, 2.0, 16)
        assert exact.wilson_loop(group, 2.0, 4, None) == exact.sun_wilson_loop(n, 2.0, 4, None)


@pytest.mark.parametrize("group", ["u2", "su1", "so3", "su", ""])
def test_dispatch_rejects(group):
    with pytest.raises(ValueError):
        exact.plaquette(group, 1.0, 16)


def test_volume_argument():
    assert exact.u1_plaquette(3.0, (4, 8)) == exact.u1_plaquette(3.0, 32)
    assert exact.u1_plaquette(3.0, float("inf")) == exact.u1_plaquette(3.0, None)
    with pytest.raises(ValueError):
        exact.u1_log_z(1.0, None)  # log Z has no infinite-volume value
    with pytest.raises(ValueError):
        exact.sun_log_z(2, 1.0, math.inf)
    with pytest.raises(ValueError):
        exact.u1_q2(1.0, None)
    with pytest.raises(ValueError):
        exact.u1_plaquette(1.0, (4, 4, 4))
    with pytest.raises(ValueError):
        exact.u1_plaquette(1.0, 0)
    with pytest.raises(TypeError):
        exact.u1_plaquette(1.0, 2.5)
    with pytest.raises(ValueError):
        exact.u1_plaquette(-1.0, 16)
    with pytest.raises(ValueError):
        exact.u1_wilson_loop(1.0, 17, 16)
    with pytest.raises(ValueError):
        exact.sun_plaquette(1, 1.0, 16)
    with pytest.raises(TypeError):
        exact.u1_charge_distribution(1.0, 16, 0.5)


def test_module_does_not_import_torch():
    path = Path(exact.__file__)
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('exact_standalone', {str(path)!r})\n"
        "mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ---------------------------------------------------------------------------
# reference values: one path, keyed on the attributes a file records
# ---------------------------------------------------------------------------


def _preset_theory(*overrides):
    from hydra import compose, initialize_config_dir

    import gaugeflow.cli.hmc  # noqa: F401  (registers the hmc job's schema)
    from gaugeflow.cli.build import theory_from_config
    from gaugeflow.cli.common import CONFIG_DIR

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return theory_from_config(compose("hmc", overrides=["out=x.h5", *overrides]))


@pytest.mark.parametrize("overrides,group,keys", [
    (["theory=u1_2d", "theory.beta=2.0", "lattice.shape=[4,6]"], "u1",
     {"log_z", "plaquette", "topological_charge", "topological_charge_squared", "topological_susceptibility"}),
    (["theory=su2_2d", "lattice.shape=[4,4]"], "su2", {"log_z", "plaquette"}),
    (["theory=su3_2d", "lattice.shape=[4,4]"], "su3", {"log_z", "plaquette"}),
    (["theory=phi4_2d", "lattice.shape=[4,4]"], None, set()),
    (["theory=phi4_2d_hopping", "lattice.shape=[4,4]"], None, set()),
    (["theory=su3_2d", "theory.action=iwasaki", "lattice.shape=[4,4]"], None, set()),
    (["theory=u1_4d", "lattice.shape=[2,2,2,2]"], None, set()),
])
def test_reference_values_are_those_of_the_theorys_attributes(tmp_path, overrides, group, keys):
    import torch

    from gaugeflow.io.ensemble import EnsembleWriter, read_ensemble

    theory = _preset_theory(*overrides)
    ref = exact.reference_values(theory)
    assert set(ref) == keys
    assert exact.reference_values_from_attributes(theory.attributes()) == ref  # exactly, not approximately
    # the attributes as a file holds them (numpy scalars and arrays through h5py): what analyze sees
    path = tmp_path / "e.h5"
    with EnsembleWriter(path, "links" if theory.is_gauge else "phi", theory.field_shape(1)[1:],
                        theory.field_dtype(torch.float64), theory.attributes()):
        pass
    assert exact.reference_values_from_attributes(read_ensemble(path, load_fields=False).attrs) == ref
    if group is not None:
        beta, shape = theory.params["beta"], tuple(theory.lattice.shape)
        assert ref["plaquette"] == exact.plaquette(group, beta, shape)
        assert ref["log_z"] == exact.log_z(group, beta, shape)
    if group == "u1":
        q2 = exact.u1_q2(2.0, 24)
        assert ref["topological_charge"] == 0.0 and ref["topological_charge_squared"] == q2
        assert ref["topological_susceptibility"] == q2 / 24


def test_reference_values_from_attributes_needs_a_pure_2d_wilson_gauge_theory():
    base = {"theory": "u1_2d", "_target_": "gaugeflow.theories.gauge_theory", "shape": [4, 4], "group": "U(1)", "beta": 1.0, "action": "wilson",
            "c0": 1.0, "c1": 0.0}
    full = exact.reference_values_from_attributes(base)
    assert full["plaquette"] == exact.u1_plaquette(1.0, 16) and full["log_z"] == exact.u1_log_z(1.0, 16)
    # an older file: no kind, no c0/c1 but the Wilson action's name
    old = {k: v for k, v in base.items() if k not in ("kind", "c0", "c1")}
    assert exact.reference_values_from_attributes(old) == full
    for change in ({"c1": -0.331, "action": "iwasaki"}, {"c1": None, "action": "symanzik"}, {"shape": [4, 4, 4]},
                   {"kind": "scalar"}, {"group": "none"}, {"kappa": 0.25}, {"nf": 2}, {"beta": "x"},
                   {"group": "so3"}):
        attrs = {k: v for k, v in {**base, **change}.items() if v is not None}
        assert exact.reference_values_from_attributes(attrs) == {}, change
    assert exact.reference_values_from_attributes({k: v for k, v in base.items() if k != "beta"}) == {}
    assert exact.reference_values_from_attributes({}) == {}
