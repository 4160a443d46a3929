"""Exact finite-volume results for 2d lattice gauge theory on a periodic torus.

Two-dimensional pure gauge theory with the Wilson action is exactly solvable:
plaquettes decouple after gauge fixing and the torus partition function is a sum
over irreducible representations (the character expansion). This module
evaluates those sums to double precision so that users can check their own
Monte Carlo or flow-based runs against exact numbers.

Conventions
-----------
* Lattice: periodic ``L0 x L1`` torus with ``V = L0 * L1`` plaquettes.
* Action: ``S = -(beta/N) sum_P Re tr U_P``, with ``N = 1`` for U(1), i.e.
  ``S = -beta sum_P cos(phi_P)``.
* Haar measure normalised to one, ``int dU = 1``; ``Z = int prod dU exp(-S)``.
* U(1) conventions, including the geometric topological charge
  ``Q = (1/2pi) sum_P arg P`` with ``arg`` in ``[-pi, pi]``, follow
  G. Kanwar et al., "Equivariant flow-based sampling for lattice gauge
  theory", Phys. Rev. Lett. 125 (2020) 121601, arXiv:2003.06413 (eqs. 6-7).
* SU(N) results use the character expansion of the single-plaquette weight and
  gluing of characters on the torus; see J.-M. Drouffe and J.-B. Zuber,
  Phys. Rep. 102 (1983) 1; D. J. Gross and E. Witten, Phys. Rev. D 21 (1980)
  446; B. E. Rusakov, Mod. Phys. Lett. A 5 (1990) 693.

The ``volume`` argument
-----------------------
Every function takes ``volume`` as either the number of plaquettes ``V`` (a
positive integer) or the lattice shape ``(L0, L1)``. Functions that have an
infinite-volume limit also accept ``None`` or ``math.inf`` for it. It is a
required argument on purpose: on small lattices the finite-volume corrections
are large (for U(1) at beta = 7 on 8x8 the topological susceptibility is 14 %
below its infinite-volume value), so the finite-volume value is what a
simulation must be compared with.

Numerics
--------
Bessel functions are used in their exponentially scaled form
(``scipy.special.ive``) and all sums over representations are done in log
space, so volumes of millions of plaquettes neither overflow nor underflow.
Sums over representations are truncated adaptively: the cutoff grows until the
terms at the cutoff are below ``exp(-_CUT)`` of the total, far below double
precision, so large beta needs no tuning.
"""

from __future__ import annotations

import functools
import itertools
import math
import numbers
import re
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
from scipy import integrate, special

__all__ = [
    "u1_log_z",
    "u1_plaquette",
    "u1_wilson_loop",
    "u1_q2",
    "u1_topological_susceptibility",
    "u1_charge_distribution",
    "sun_log_z",
    "sun_plaquette",
    "sun_wilson_loop",
    "log_z",
    "plaquette",
    "wilson_loop",
    "reference_values",
    "reference_values_from_attributes",
]

# Terms smaller than exp(-_CUT) times the leading one are dropped. e^-60 ~ 1e-26
# leaves ten orders of magnitude for the polynomially many dropped terms and
# the polynomial prefactors (dimensions, d b/d beta) before double precision.
_CUT = 60.0
# Most Young diagrams (lambda_1 <= K: binom(K+N-1, N-1) of them) tried before
# giving up; only reachable for huge beta/V or large N, and it bounds memory.
_MAX_DIAGRAMS = 1_000_000
# Number of non-integer Fourier points allowed for P(Q) on very small tori.
_P_MAX_POINTS = 1 << 23


# --------------------------------------------------------------------------
# argument handling
# --------------------------------------------------------------------------


def _as_beta(beta) -> float:
    b = float(beta)
    if not math.isfinite(b) or b < 0:
        raise ValueError(f"beta must be finite and >= 0, got {beta!r}")
    return b


def _as_volume(volume, *, allow_infinite: bool) -> int | None:
    """Number of plaquettes from an int V or a shape (L0, L1); None = infinite."""
    if volume is None or (isinstance(volume, float) and math.isinf(volume) and volume > 0):
        if not allow_infinite:
            raise ValueError("this quantity needs a finite volume (an int V or a shape (L0, L1))")
        return None
    if isinstance(volume, np.ndarray) and volume.ndim == 0:
        volume = volume.item()
    if isinstance(volume, (Sequence, np.ndarray)) and not isinstance(volume, str):
        shape = tuple(volume)
        if len(shape) != 2:
            raise ValueError(f"shape must be (L0, L1) for a 2d torus, got {volume!r}")
        sides = [_as_positive_int(s, "lattice extent") for s in shape]
        return sides[0] * sides[1]
    return _as_positive_int(volume, "volume")


def _as_positive_int(x, what: str) -> int:
    if isinstance(x, bool):
        raise TypeError(f"{what} must be an integer, got {x!r}")
    if isinstance(x, numbers.Integral):
        n = int(x)
    elif isinstance(x, numbers.Real) and float(x).is_integer():
        n = int(x)
    else:
        raise TypeError(f"{what} must be a positive integer, got {x!r}")
    if n < 1:
        raise ValueError(f"{what} must be >= 1, got {x!r}")
    return n


def _as_area(area, volume: int | None) -> int:
    if isinstance(area, bool) or not (
        isinstance(area, numbers.Integral)
        or (isinstance(area, numbers.Real) and float(area).is_integer())
    ):
        raise TypeError(f"area must be an integer number of plaquettes, got {area!r}")
    a = int(area)
    if a < 0 or (volume is not None and a > volume):
        raise ValueError(f"area must satisfy 0 <= area <= V, got area={area!r}, V={volume}")
    return a


def _as_n(N) -> int:
    n = _as_positive_int(N, "N")
    if n < 2:
        raise ValueError(f"SU(N) needs N >= 2, got {N!r}")
    return n


def _xmul(k: float, logx: np.ndarray) -> np.ndarray:
    """k * log(x) with the convention x**0 = 1 also for x = 0 (log x = -inf)."""
    logx = np.asarray(logx, dtype=float)
    if k == 0:
        return np.zeros_like(logx)
    return k * logx


def _logsumexp(a: np.ndarray) -> float:
    a = np.asarray(a, dtype=float)
    m = np.max(a)
    if not np.isfinite(m):
        return float(m)
    return float(m + np.log(np.sum(np.exp(a - m))))


# --------------------------------------------------------------------------
# U(1)
# --------------------------------------------------------------------------


def _u1_log_ratios(beta: float, power: float, cut: float = _CUT) -> np.ndarray:
    """log(I_n(beta)/I_0(beta)) for n = 0..M, M adaptive.

    M is grown until ``power * log r`` two entries before the end is below
    ``-cut``, so that sums of ``r_n**power`` times bounded factors (which may
    involve r_{n+-1}) are converged; I_n is decreasing in n >= 0 for beta > 0.
    """
    power = max(float(power), 1.0)
    m = 32
    while True:
        n = np.arange(m + 1)
        with np.errstate(divide="ignore"):
            logr = np.log(special.ive(n, beta)) - np.log(special.ive(0, beta))
        if power * logr[m - 2] < -cut:
            return logr
        m *= 2


def _u1_symmetric(logr: np.ndarray) -> np.ndarray:
    """log r_|n| for n = -M..M, using I_{-n} = I_n."""
    m = len(logr) - 1
    return logr[np.abs(np.arange(-m, m + 1))]


def u1_log_z(beta: float, volume, *, measure: str = "haar") -> float:
    """log Z of 2d U(1) gauge theory on a periodic torus.

    ``Z = sum_{n in Z} I_n(beta)**V`` for the Haar measure normalised to one:
    after fixing to a maximal tree the V plaquette angles are independent up to
    the global constraint, and only a uniform representation n survives
    because every link borders two oppositely oriented plaquettes.

    Parameters
    ----------
    beta : float
        Coupling in ``S = -beta sum_P cos(phi_P)``.
    volume : int or (int, int)
        Number of plaquettes V or the lattice shape (L0, L1).
    measure : {"haar", "lebesgue"}
        ``"lebesgue"`` returns the normalisation for a density on the 2V link
        angles in ``[0, 2 pi)`` with respect to Lebesgue measure,
        ``log Z_Haar + 2 V log(2 pi)`` (useful for flows defined on angles).
    """
    beta = _as_beta(beta)
    vol = _as_volume(volume, allow_infinite=False)
    logr = _u1_log_ratios(beta, vol)
    lr = _u1_symmetric(logr)
    log_i0 = math.log(special.ive(0, beta)) + beta
    out = vol * log_i0 + _logsumexp(_xmul(vol, lr))
    if measure == "haar":
        return out
    if measure == "lebesgue":
        return out + 2 * vol * math.log(2 * math.pi)
    raise ValueError(f"measure must be 'haar' or 'lebesgue', got {measure!r}")


def u1_plaquette(beta: float, volume) -> float:
    """Plaquette ``<Re U_P> = <cos phi_P>`` of 2d U(1) theory on a torus.

    Finite volume: ``sum_n I_n**(V-1) I_n' / sum_n I_n**V`` with
    ``I_n' = (I_{n-1} + I_{n+1}) / 2``, i.e. ``(1/V) d log Z / d beta``.
    Infinite volume (``volume`` None or inf): ``I_1(beta) / I_0(beta)``.
    """
    beta = _as_beta(beta)
    vol = _as_volume(volume, allow_infinite=True)
    if vol is None:
        return float(special.ive(1, beta) / special.ive(0, beta))
    logr = _u1_log_ratios(beta, vol)
    lr = _u1_symmetric(logr)
    r = np.exp(lr)
    # Derivative of I_n relative to I_0; interior n only so that n +- 1 exist.
    dr = 0.5 * (r[:-2] + r[2:])
    with np.errstate(divide="ignore"):
        num = _logsumexp(_xmul(vol - 1, lr[1:-1]) + np.log(dr))
    den = _logsumexp(_xmul(vol, lr))
    return float(math.exp(num - den))


def u1_wilson_loop(beta: float, area: int, volume) -> float:
    """Contractible Wilson loop ``<Re W>`` enclosing ``area`` plaquettes, U(1).

    Finite volume: ``sum_n I_n**(V-A) I_{n+1}**A / sum_n I_n**V``, which is
    symmetric under ``A -> V - A``. Infinite volume: ``(I_1/I_0)**A`` (exact
    area law in 2d). ``area = 1`` reproduces the plaquette.
    """
    beta = _as_beta(beta)
    vol = _as_volume(volume, allow_infinite=True)
    a = _as_area(area, vol)
    if vol is None:
        return float((special.ive(1, beta) / special.ive(0, beta)) ** a)
    # The numerator can be far below Z (W ~ u^A); it is at least its n = 0 or
    # n = -1 term, so truncate relative to that rather than to the n = 0 term of Z.
    r1 = special.ive(1, beta) / special.ive(0, beta)
    floor = min(a, vol - a) * math.log(r1) if r1 > 0 else 0.0
    logr = _u1_log_ratios(beta, vol, cut=_CUT - floor)
    lr = _u1_symmetric(logr)
    num = _logsumexp(_xmul(vol - a, lr[:-1]) + _xmul(a, lr[1:]))
    den = _logsumexp(_xmul(vol, lr))
    return float(math.exp(num - den))


def _weight(beta: float):
    # exp(beta (cos phi - 1)): the plaquette weight scaled by e^-beta like ive.
    return lambda phi: np.exp(beta * (np.cos(phi) - 1.0))


def _u1_f_derivatives(beta: float, n: int) -> tuple[float, float]:
    """(f'(n), f''(n)) scaled by e^-beta, for integer n >= 0.

    ``f(nu) = int_{-pi}^{pi} dphi/2pi e^{beta cos phi} cos(nu phi)``, so
    ``f'(n) = -(1/pi) int_0^pi phi sin(n phi) e^{beta cos phi}`` and
    ``f''(n) = -(1/pi) int_0^pi phi^2 cos(n phi) e^{beta cos phi}``.
    The oscillatory factor is handled by QUADPACK's QAWO rule.
    """
    w = _weight(beta)
    # The integrands are O(1); the series needs f', f'' to ~1e-16 absolute,
    # which QUADPACK delivers even where a tiny result (large n) makes it
    # report that the relative target was not met, so that report is muted
    # (full_output) rather than turned into a warning.
    opts = dict(epsabs=1e-16, epsrel=1e-13, limit=500, full_output=1)
    if n == 0:
        d1 = 0.0  # f is even in nu
        d2 = -integrate.quad(lambda p: p * p * w(p), 0.0, math.pi, **opts)[0]
    else:
        d1 = -integrate.quad(lambda p: p * w(p), 0.0, math.pi, weight="sin", wvar=n, **opts)[0]
        d2 = -integrate.quad(lambda p: p * p * w(p), 0.0, math.pi, weight="cos", wvar=n, **opts)[0]
    return d1 / math.pi, d2 / math.pi


@functools.lru_cache(maxsize=256)
def _u1_q2(beta: float, vol: int) -> float:
    if vol <= 2:
        # |Q| = |sum_P phi_P| / 2pi < V/2, so Q = 0 almost surely for V <= 2
        # (the series below is exact too but converges only like 1/n^2 at V = 2).
        return 0.0
    # Summand n is bounded by V^2 pi^2 r_n^(V-2) f(0)^V (|f'| <= pi f(0),
    # |f''| <= pi^2 f(0)); the extra cut keeps the truncation relative to
    # <Q^2> ~ V/(4 pi^2 beta) rather than to 1.
    cut = _CUT + math.log(vol * vol * (1.0 + beta)) + 10.0
    logr = _u1_log_ratios(beta, vol - 2, cut=cut)
    f0 = special.ive(0, beta)
    total = 0.0
    for n in range(len(logr)):
        if (vol - 2) * logr[n] < -cut:
            break
        d1, d2 = _u1_f_derivatives(beta, n)
        rn = math.exp(logr[n])
        term = vol * (vol - 1) * rn ** (vol - 2) * (d1 / f0) ** 2 + vol * rn ** (vol - 1) * (d2 / f0)
        total += term if n == 0 else 2.0 * term  # n and -n contribute equally
    lr = _u1_symmetric(_u1_log_ratios(beta, vol))
    zr = float(np.sum(np.exp(_xmul(vol, lr))))
    # The n != 0 terms cancel part of the n = 0 term, so the absolute accuracy
    # is ~1e-16 V <phi^2>/(4 pi^2); an exponentially small <Q^2> (huge beta on
    # a small torus) can come out as round-off of either sign, clipped here.
    return max(float(-total / (4.0 * math.pi**2 * zr)), 0.0)


def u1_q2(beta: float, volume) -> float:
    """``<Q^2>`` of the geometric topological charge, 2d U(1) on a torus.

    With the V plaquette angles in ``(-pi, pi]`` independent up to
    ``sum_P phi_P = 2 pi Q`` (maximal-tree gauge), the theta-dependent
    partition function is ``Z(theta) = sum_n f(n + theta/2pi)**V`` and
    ``<Q^2> = -Z''(0)/Z(0) = -(1/(4 pi^2 Z)) sum_n [V(V-1) f(n)^(V-2) f'(n)^2
    + V f(n)^(V-1) f''(n)]``; f' and f'' are evaluated by numerical quadrature.
    Since ``|Q| < V/2``, ``<Q^2> = 0`` for ``V <= 2``.
    """
    return _u1_q2(_as_beta(beta), _as_volume(volume, allow_infinite=False))


def u1_topological_susceptibility(beta: float, volume) -> float:
    """Topological susceptibility ``chi_t = <Q^2>/V`` (geometric charge), U(1).

    Infinite volume (``volume`` None or inf): ``<phi^2>_beta / (4 pi^2)`` with
    ``<phi^2>_beta = int phi^2 e^{beta cos phi} / int e^{beta cos phi}`` over
    ``(-pi, pi]``, the mean squared angle of a single von Mises plaquette.
    """
    beta = _as_beta(beta)
    vol = _as_volume(volume, allow_infinite=True)
    if vol is None:
        _, d2 = _u1_f_derivatives(beta, 0)
        return float(-d2 / special.ive(0, beta) / (4.0 * math.pi**2))
    return float(_u1_q2(beta, vol) / vol)


def _u1_f_noninteger(beta: float, k: np.ndarray, vol: int) -> np.ndarray:
    """f(k/V) scaled by e^-beta, for integers k >= 0 (in chunks to bound memory)."""
    step = 1 << 16
    return np.concatenate([_u1_f_chunk(beta, k[i : i + step], vol) for i in range(0, len(k), step)])


def _u1_f_chunk(beta: float, k: np.ndarray, vol: int) -> np.ndarray:
    """f(k/V) scaled by e^-beta, for integers k >= 0.

    For ``nu <= 2 beta + 50`` the defining integral is done directly (vector
    adaptive Gauss-Kronrod, ~1e-16 absolute; scipy's ``ive`` at non-integer
    order is only good to ~1e-14, which V = 256 powers would amplify). Beyond
    that ``I_nu(beta)`` is below 1e-50 and DLMF 10.32.4,
    ``(1/pi) int_0^pi e^{b cos t} cos(nu t) dt = I_nu(b)
    + (sin(nu pi)/pi) int_0^inf e^{-b cosh t - nu t} dt``,
    gives the slowly decaying tail from a non-oscillatory integral.
    """
    nu = k / vol
    if beta == 0.0:
        return np.sinc(nu)
    out = np.empty(nu.shape)
    near = nu <= 2.0 * beta + 50.0
    if np.any(near):
        nn = nu[near]
        out[near] = (
            integrate.quad_vec(
                lambda p: np.exp(beta * (np.cos(p) - 1.0)) * np.cos(nn * p),
                0.0,
                math.pi,
                epsabs=0.0,
                epsrel=1e-15,
                norm="max",
            )[0]
            / math.pi
        )
    if not np.all(near):
        kf, nf = k[~near], nu[~near]
        # sin(pi nu) from k mod 2V keeps full precision for large k.
        s = np.sin(np.pi * (kf % (2 * vol)) / vol)
        s[kf % vol == 0] = 0.0
        with np.errstate(over="ignore"):
            tail = integrate.quad_vec(
                lambda t: np.exp(-beta * (1.0 + np.cosh(t)) - nf * t),
                0.0,
                np.inf,
                epsabs=0.0,
                epsrel=1e-14,
                norm="max",
            )[0]
        out[~near] = special.ive(nf, beta) + s / np.pi * tail
    return out


def _u1_p_v3(beta: float) -> tuple[float, float]:
    """Unnormalised (p(0), p(2 pi)) for V = 3: density of phi1+phi2+phi3 at 2 pi Q.

    The Fourier series used for larger V converges only like k^-2 here, so
    integrate the convolution directly.
    """
    w = _weight(beta)
    pi = math.pi
    opts = dict(epsabs=1e-16, epsrel=1e-13, limit=200, full_output=1)

    def p(x):
        # Inner limits keep phi3 = x - phi1 - phi2 in [-pi, pi]; they have a
        # kink at phi1 = 0 for both x = 0 and x = 2 pi, so split there.
        def inner(p1):
            lo, hi = max(-pi, x - p1 - pi), min(pi, x - p1 + pi)
            if hi <= lo:
                return 0.0
            return integrate.quad(lambda p2: w(p2) * w(x - p1 - p2), lo, hi, **opts)[0] * w(p1)

        return sum(integrate.quad(inner, a, b, **opts)[0] for a, b in ((-pi, 0.0), (0.0, pi)))

    return p(0.0), p(2 * pi)


def u1_charge_distribution(beta: float, volume, q):
    """Probability ``P(Q = q)`` of the geometric topological charge, 2d U(1).

    ``P(Q) = (1/Z) int dnu f(nu)^V cos(2 pi nu Q)``. Because the sum of the V
    plaquette angles lies in ``(-V pi, V pi)``, its density is reproduced
    exactly by its Fourier series with period ``2 pi V``, which turns the
    integral into the sum ``(1/(V Z)) sum_k f(k/V)^V cos(2 pi k Q/V)``;
    it is truncated adaptively. ``P(Q) = 0`` for ``|Q| >= V/2``.

    The absolute accuracy is ~1e-15 (V = 256); values far below that are
    round-off of either sign. It is left unclipped so that moments such as
    ``sum Q^2 P(Q)`` stay unbiased (they reproduce ``u1_q2`` to ~1e-11).

    Parameters
    ----------
    q : int or array_like of int
        Charge(s). A scalar gives a float, an array an ndarray of the same shape.
    """
    beta = _as_beta(beta)
    vol = _as_volume(volume, allow_infinite=False)
    q_arr = np.asarray(q)
    if q_arr.dtype.kind not in "iu":
        if q_arr.dtype.kind == "f" and np.all(q_arr == np.round(q_arr)):
            q_arr = q_arr.astype(np.int64)
        else:
            raise TypeError(f"q must be integer(s), got {q!r}")
    # P(-Q) = P(Q): evaluate each |Q| once, which also makes the symmetry exact.
    qs, inverse = np.unique(np.abs(q_arr.astype(np.int64)).ravel(), return_inverse=True)
    inside = 2 * qs < vol
    vals = np.zeros(qs.shape, dtype=float)
    if vol <= 2:
        vals[qs == 0] = 1.0
    elif vol == 3:
        p0, p1 = _u1_p_v3(beta)
        norm = p0 + 2.0 * p1
        vals[qs == 0] = p0 / norm
        vals[qs == 1] = p1 / norm
    else:
        vals[inside] = _u1_charge_fourier(beta, vol, qs[inside])
    out = vals[inverse].reshape(q_arr.shape)
    return float(out) if out.ndim == 0 else out


def _u1_f_bound_tail(beta: float, vol: int, f0: float, nu_a: float) -> float:
    """Rigorous bound on sum_{k >= V nu_a} |f(k/V)/f(0)|^V.

    From DLMF 10.32.4, |f(nu)| <= I_nu(beta) + e^-beta/(pi nu) =: B(nu), which
    decreases in nu; bound each dyadic range [nu_a 2^j, nu_a 2^(j+1)) by its
    number of points times B at its left end.
    """
    nu = nu_a * 2.0 ** np.arange(48)  # beyond, V nu (1/nu)^V is negligible for V >= 4
    # ive returns nan for astronomically large orders, where I_nu is 0.
    iv = np.nan_to_num(special.ive(nu, beta), nan=0.0)
    b = (iv + math.exp(-2.0 * beta) / (math.pi * nu)) / f0
    with np.errstate(divide="ignore"):
        log_terms = np.log(vol * nu) + vol * np.log(b)
    return math.exp(_logsumexp(log_terms))


def _u1_charge_fourier(beta: float, vol: int, qs: np.ndarray) -> np.ndarray:
    f0 = special.ive(0, beta)
    lr = _u1_symmetric(_u1_log_ratios(beta, vol))
    zr = float(np.sum(np.exp(_xmul(vol, lr))))  # Z / f(0)^V
    acc = np.zeros(qs.shape, dtype=float)
    start, block = 0, 1024
    while True:
        k = np.arange(start, start + block, dtype=np.int64)
        t = (_u1_f_noninteger(beta, k, vol) / f0) ** vol
        wt = np.where(k == 0, 1.0, 2.0) * t  # k and -k
        step = max(1, (1 << 22) // max(1, len(qs)))  # bound the (q, k) phase array
        for i in range(0, len(k), step):
            # k Q reduced mod V in integers keeps the phase exact for large k.
            phase = 2.0 * np.pi * ((np.outer(qs, k[i : i + step]) % vol) / vol)
            acc += np.cos(phase) @ wt[i : i + step]
        end = start + block
        # Remaining terms: on 0 <= nu <= 1, f(nu)/f(0) = <cos(nu phi)> decreases
        # (its derivative -<phi sin(nu phi)> <= 0 there), so they are below the
        # last one; beyond nu = 1 use the bound B(nu).
        rest = (vol - end) * t[-1] if end < vol else 0.0
        rest += _u1_f_bound_tail(beta, vol, f0, max(end / vol, 1.0))
        if 2.0 * rest / (vol * zr) < 1e-17:
            break
        if end >= _P_MAX_POINTS:
            raise RuntimeError(f"P(Q) Fourier series did not converge for V={vol}, beta={beta}")
        start, block = end, 2 * block
    return acc / (vol * zr)


# --------------------------------------------------------------------------
# SU(N)
# --------------------------------------------------------------------------


def _young_diagrams(N: int, K: int) -> np.ndarray:
    """All lambda with K >= lambda_1 >= ... >= lambda_{N-1} >= lambda_N = 0."""
    rows = [
        tuple(sorted(c, reverse=True)) + (0,)
        for c in itertools.combinations_with_replacement(range(K + 1), N - 1)
    ]
    return np.array(rows, dtype=np.int64).reshape(-1, N)


def _log_weyl_dim(lam: np.ndarray) -> np.ndarray:
    """log d_lambda, d = prod_{i<j} (lambda_i - lambda_j + j - i)/(j - i)."""
    N = lam.shape[1]
    out = np.zeros(lam.shape[0])
    for i in range(N):
        for j in range(i + 1, N):
            out += np.log((lam[:, i] - lam[:, j] + j - i) / (j - i))
    return out


def _sun_coefficients(N: int, beta: float, lam: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(log F_lambda(beta), d log F_lambda / d beta) for diagrams ``lam``.

    ``F_lambda = sum_q det[I_{lambda_j + q - j + i}(beta/N)]_{i,j}`` (Weyl
    integration + Andreief identity; the q-sum projects U(N) onto SU(N)).
    d/d beta differentiates the determinant column by column with
    ``I_n'(x) = (I_{n-1}(x) + I_{n+1}(x))/2``. Every entry is scaled by
    ``e^{-x}``, so each determinant carries a common ``e^{-beta}``.
    """
    x = beta / N
    # Hadamard bound |det| <= prod_j ||column_j|| with a margin for the
    # cancellation in near-Toeplitz determinants (which shrinks them by up to
    # ~x^(N^2/2) relative to the bound at large x).
    cut = _CUT + 20.0 + N * N * math.log(2.0 + x)
    m = 32
    while True:
        with np.errstate(divide="ignore"):
            logi = np.log(special.ive(np.arange(m), x))
        below = np.nonzero(logi - logi[0] < -cut)[0]
        if below.size:
            m_cut = int(below[0])
            break
        m *= 2
    kmax = int(lam[:, 0].max()) if lam.size else 0
    q_hi = m_cut + N
    q_lo = -(kmax + m_cut + N)
    qs = np.arange(q_lo, q_hi + 1)
    n_tab = kmax + (q_hi - q_lo) + 4 * N + 4
    ive_tab = special.ive(np.arange(n_tab), x)
    with np.errstate(divide="ignore"):
        log_tab = np.log(ive_tab)
    ref = N * log_tab[0]
    jj = np.arange(N)
    ii = np.arange(N)

    n_lam = lam.shape[0]
    D = np.zeros(n_lam)
    dD = np.zeros(n_lam)
    # Chunk over diagrams to bound memory of the (lambda, q) grid.
    chunk = max(1, 2_000_000 // (len(qs) * N))
    for c0 in range(0, n_lam, chunk):
        lc = lam[c0 : c0 + chunk]
        # base[l, q, j] = lambda_j + q - j; column j holds indices base + i.
        base = lc[:, None, :] + qs[None, :, None] - jj[None, None, :]
        lo, hi = base, base + (N - 1)
        mn = np.where((lo <= 0) & (hi >= 0), 0, np.minimum(np.abs(lo), np.abs(hi)))
        mn = np.maximum(mn - 1, 0)  # derivative columns reach one index further in
        bound = log_tab[mn].sum(axis=2)
        li, qi = np.nonzero(bound > ref - cut)
        if li.size == 0:
            continue
        idx = base[li, qi][:, None, :] + ii[None, :, None]  # (P, i, j)
        a = np.abs(idx)
        mat = ive_tab[a]
        dmat = 0.5 * (ive_tab[np.abs(idx - 1)] + ive_tab[np.abs(idx + 1)])
        det = np.linalg.det(mat)
        ddet = np.zeros_like(det)
        for k in range(N):
            mk = mat.copy()
            mk[:, :, k] = dmat[:, :, k]
            ddet += np.linalg.det(mk)
        D[c0 : c0 + chunk] += np.bincount(li, weights=det, minlength=lc.shape[0])
        dD[c0 : c0 + chunk] += np.bincount(li, weights=ddet, minlength=lc.shape[0])
    # F_lambda >= 0 (expansion of exp with non-negative coefficients); only
    # negligible diagrams can round to <= 0, and they get weight zero.
    pos = D > 0
    log_f = np.full(n_lam, -np.inf)
    log_f[pos] = beta + np.log(D[pos])
    dlog_f = np.zeros(n_lam)
    dlog_f[pos] = dD[pos] / (N * D[pos])
    return log_f, dlog_f


class _SUNTable(NamedTuple):
    lam: np.ndarray  # (n, N) diagrams with lambda_N = 0, lambda_1 <= K
    log_d: np.ndarray  # log d_lambda
    log_b: np.ndarray  # log b_lambda, b = F/d
    dlog_b: np.ndarray  # b'_lambda / b_lambda
    keys: np.ndarray  # sorted keys for lookup
    order: np.ndarray  # argsort of keys
    K: int


def _lam_keys(lam: np.ndarray, K: int) -> np.ndarray:
    base = K + 3
    w = base ** np.arange(lam.shape[1], dtype=np.int64)
    return lam @ w


@functools.lru_cache(maxsize=64)
def _sun_table(N: int, beta: float, K: int) -> _SUNTable:
    lam = _young_diagrams(N, K)
    log_f, dlog_f = _sun_coefficients(N, beta, lam)
    log_d = _log_weyl_dim(lam)
    keys = _lam_keys(lam, K)
    order = np.argsort(keys)
    tab = _SUNTable(lam, log_d, log_f - log_d, dlog_f, keys[order], order, K)
    for arr in tab[:-1]:
        arr.setflags(write=False)
    return tab


def _sun_converged(N: int, beta: float, evaluate):
    """Run ``evaluate(table) -> (value, log_terms, boundary_mask)`` with K doubled
    until the terms on the boundary lambda_1 = K are negligible."""
    K = 8
    while True:
        tab = _sun_table(N, beta, K)
        value, log_terms, boundary = evaluate(tab)
        total = _logsumexp(log_terms)
        edge = log_terms[boundary]
        # total = -inf: every term vanishes identically (beta = 0, W = 0).
        if edge.size == 0 or total == -np.inf or np.max(edge) < total - _CUT:
            return value
        K *= 2
        if math.comb(K + N - 1, N - 1) > _MAX_DIAGRAMS:
            raise RuntimeError(
                f"SU({N}) character sum did not converge for beta={beta} within "
                f"{_MAX_DIAGRAMS} Young diagrams"
            )


def _sun_u_inf(N: int, beta: float) -> float:
    lam = np.zeros((2, N), dtype=np.int64)
    lam[1, 0] = 1  # trivial and fundamental
    log_f, _ = _sun_coefficients(N, beta, lam)
    return float(math.exp(log_f[1] - log_f[0]) / N)


def sun_log_z(N: int, beta: float, volume) -> float:
    """log Z of 2d SU(N) gauge theory on a periodic torus (Haar measure = 1).

    ``Z = sum_lambda b_lambda**V`` with ``b_lambda = F_lambda / d_lambda``,
    where ``exp((beta/N) Re tr U) = sum_lambda F_lambda(beta) chi_lambda(U)``,
    ``F_lambda = sum_q det[I_{lambda_j + q - j + i}(beta/N)]`` and d_lambda is
    the Weyl dimension. The sum runs over Young diagrams with lambda_N = 0 and
    is truncated adaptively.
    """
    N, beta = _as_n(N), _as_beta(beta)
    vol = _as_volume(volume, allow_infinite=False)

    def evaluate(tab):
        terms = _xmul(vol, tab.log_b)
        return _logsumexp(terms), terms, tab.lam[:, 0] == tab.K

    return float(_sun_converged(N, beta, evaluate))


def sun_plaquette(N: int, beta: float, volume) -> float:
    """Plaquette ``<(1/N) Re tr U_P>`` of 2d SU(N) theory on a torus.

    Finite volume: ``sum_lambda b^(V-1) b' / sum_lambda b^V`` (= (1/V) d log Z
    / d beta) with ``b' = d b / d beta`` from differentiating the Bessel
    determinants. Infinite volume (``volume`` None or inf):
    ``u_inf = b_f / b_0 = F_f / (N F_0)``; for SU(2) this is
    ``I_2(beta) / I_1(beta)``.
    """
    N, beta = _as_n(N), _as_beta(beta)
    vol = _as_volume(volume, allow_infinite=True)
    if vol is None:
        return _sun_u_inf(N, beta)

    def evaluate(tab):
        terms = _xmul(vol, tab.log_b)
        z = _logsumexp(terms)
        value = float(np.sum(np.exp(terms - z) * tab.dlog_b))
        with np.errstate(divide="ignore"):
            terms_u = terms + np.log(np.abs(tab.dlog_b))
        return value, np.maximum(terms, terms_u), tab.lam[:, 0] == tab.K

    return float(_sun_converged(N, beta, evaluate))


def _pieri_fundamental(s: np.ndarray):
    """Yield (row, r) for each r in s (x) fundamental, normalised to r_N = 0.

    Pieri rule: add one box to a row of s such that the result is a Young
    diagram; a full column created in row N is removed (det U = 1).
    """
    N = s.shape[1]
    for i in range(N):
        ok = np.ones(s.shape[0], dtype=bool) if i == 0 else s[:, i - 1] > s[:, i]
        r = s.copy()
        r[:, i] += 1
        if i == N - 1:
            r -= 1
        yield ok, r


def sun_wilson_loop(N: int, beta: float, area: int, volume) -> float:
    """Fundamental Wilson loop ``<(1/N) Re tr W>`` bounding a disk of ``area``
    plaquettes, 2d SU(N) on a torus.

    Gluing the disk (area A) to the rest of the torus (area V - A, one handle):
    ``(1/N) sum_s sum_{r in s x f} (d_s/d_r) b_s^A b_r^(V-A) / sum_r b_r^V``,
    with ``r in s x f`` given by the Pieri rule. ``area = 1`` reproduces the
    plaquette; infinite volume (``volume`` None or inf) gives ``u_inf**A``.
    Unlike U(1) the result is not symmetric under ``A -> V - A``: the loop must
    bound a disk of ``area`` plaquettes, the complement carrying the handle.
    """
    N, beta = _as_n(N), _as_beta(beta)
    vol = _as_volume(volume, allow_infinite=True)
    a = _as_area(area, vol)
    if vol is None:
        return _sun_u_inf(N, beta) ** a

    def evaluate(tab):
        # s up to K - 1 so that every r in s x f (r_1 <= K) is in the table.
        sel = tab.lam[:, 0] <= tab.K - 1
        s_idx = np.nonzero(sel)[0]
        s = tab.lam[s_idx]
        parts, edge = [], []
        for ok, r in _pieri_fundamental(s):
            pos = np.searchsorted(tab.keys, _lam_keys(r[ok], tab.K))
            r_idx = tab.order[pos]
            si = s_idx[ok]
            parts.append(
                tab.log_d[si]
                - tab.log_d[r_idx]
                + _xmul(a, tab.log_b[si])
                + _xmul(vol - a, tab.log_b[r_idx])
            )
            edge.append(tab.lam[si, 0] == tab.K - 1)
        terms = np.concatenate(parts)
        z = _logsumexp(_xmul(vol, tab.log_b))
        value = math.exp(_logsumexp(terms) - z) / N
        return value, terms, np.concatenate(edge)

    return float(_sun_converged(N, beta, evaluate))


# --------------------------------------------------------------------------
# dispatch
# --------------------------------------------------------------------------

_GROUP_RE = re.compile(r"^(s?u)\(?(\d+)\)?$")


def _parse_group(group: str) -> int:
    """0 for U(1), N for SU(N); accepts 'u1', 'U(1)', 'su3', 'SU(3)', ..."""
    m = _GROUP_RE.match(str(group).strip().lower().replace(" ", "").replace("_", ""))
    if m:
        kind, n = m.group(1), int(m.group(2))
        if kind == "u" and n == 1:
            return 0
        if kind == "su" and n >= 2:
            return n
    raise ValueError(f"unsupported group {group!r}; use 'u1' or 'suN' with N >= 2")


def log_z(group: str, beta: float, volume) -> float:
    """log Z on a torus for ``group`` in {'u1', 'su2', 'su3', 'SU(N)', ...}."""
    n = _parse_group(group)
    return u1_log_z(beta, volume) if n == 0 else sun_log_z(n, beta, volume)


def plaquette(group: str, beta: float, volume) -> float:
    """``<(1/N) Re tr U_P>`` for ``group``; ``volume`` None/inf = infinite volume."""
    n = _parse_group(group)
    return u1_plaquette(beta, volume) if n == 0 else sun_plaquette(n, beta, volume)


def wilson_loop(group: str, beta: float, area: int, volume) -> float:
    """Contractible fundamental Wilson loop ``<(1/N) Re tr W(area)>`` for ``group``."""
    n = _parse_group(group)
    if n == 0:
        return u1_wilson_loop(beta, area, volume)
    return sun_wilson_loop(n, beta, area, volume)


#: attributes of a theory with dynamical fermions (its weight has a determinant): the pure-gauge
#: character expansion does not describe it
_FERMION_ATTRIBUTES = ("fermion", "fermions", "nf", "n_f", "n_flavors", "kappa", "csw", "dirac")
#: names of the exact topology values (the estimate names of ``gaugeflow.sampling.summary.topology``)
_TOPOLOGY = ("topological_charge", "topological_charge_squared", "topological_susceptibility")


def _attr(attrs, key, default=None):
    v = attrs.get(key, default)
    if isinstance(v, bytes):
        v = v.decode("utf-8")
    if isinstance(v, np.ndarray) and v.ndim == 0:
        v = v.item()
    return v


def reference_values_from_attributes(attrs) -> dict[str, float]:
    """Exact finite-volume reference values of the theory a file's attributes describe, else ``{}``.

    ``attrs`` is what :meth:`gaugeflow.theories.Theory.attributes` returns and jobs write into
    their HDF5 files (``theory``, ``kind``, ``shape``, ``group``, ``beta``, ``action``, ``c0``,
    ``c1``, ...; numpy scalars, arrays and bytes as h5py reads them are accepted). Known: 2d pure
    gauge theories with the Wilson action on the whole periodic lattice (``kind`` ``gauge``, or
    absent in older files, a group other than ``none``, a ``shape`` of two extents, ``c1`` 0, or
    no ``c1`` and ``action`` ``wilson``, and no fermion attributes):

    * ``log_z``, ``plaquette``: :func:`log_z`, :func:`plaquette` (every group the character
      expansion reaches; nothing where it fails);
    * for U(1) also the geometric topological charge's ``topological_charge`` (0),
      ``topological_charge_squared`` (:func:`u1_q2`) and ``topological_susceptibility``
      (``<Q^2> / V``).

    This is the one place that decides which exact values a theory has:
    :func:`reference_values` is this function of ``theory.attributes()``, and ``gaugeflow
    analyze`` calls it with the file's attributes, so a job and the analysis of its file print
    the same exact values.
    """
    kind, group = _attr(attrs, "kind"), _attr(attrs, "group")
    if kind not in (None, "gauge") or group is None or str(group).lower() == "none" or "beta" not in attrs:
        return {}
    if any(k in attrs for k in _FERMION_ATTRIBUTES):
        return {}
    try:
        shape = tuple(int(s) for s in np.atleast_1d(_attr(attrs, "shape", ())))
        c1 = _attr(attrs, "c1")
        if c1 is None:
            if str(_attr(attrs, "action", "wilson")) != "wilson":
                return {}
        elif float(c1) != 0.0:
            return {}
        c0 = _attr(attrs, "c0")
        if c0 is not None and float(c0) != 1.0:
            return {}
        beta = float(_attr(attrs, "beta"))
        n = _parse_group(str(group))
    except (TypeError, ValueError):
        return {}
    if len(shape) != 2:
        return {}
    try:
        out = {"log_z": log_z(str(group), beta, shape), "plaquette": plaquette(str(group), beta, shape)}
    except (ValueError, TypeError, OverflowError, RuntimeError):
        return {}  # a coupling or volume outside the exact solution's reach: nothing to compare with
    if n == 0:
        volume = shape[0] * shape[1]
        try:
            q2 = u1_q2(beta, volume)
        except (ValueError, TypeError, OverflowError, RuntimeError):
            return out
        out.update(zip(_TOPOLOGY, (0.0, q2, q2 / volume)))
    return out


def reference_values(theory) -> dict[str, float]:
    """Exact finite-volume values of a :class:`gaugeflow.theories.Theory` where known, else ``{}``:
    :func:`reference_values_from_attributes` of ``theory.attributes()`` (on a domain-decomposed run,
    with the whole lattice's shape)."""
    attrs = dict(theory.attributes())
    attrs["shape"] = list(theory.lattice.global_shape)
    return reference_values_from_attributes(attrs)
