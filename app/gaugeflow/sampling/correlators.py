"""Time-slice correlators of Markov chains: the folded correlator and its effective mass, with
Gamma-method errors (the chains as replicas, :func:`gaugeflow.sampling.statistics.gamma_method`).

A correlator measured on configuration ``i`` is a row ``C_i(t)``, ``t = 0 ... T-1``. The pion
correlator of Wilson fermions is periodic in time whatever the fermions' boundary (it is a
product of a propagator and its conjugate, so the sign of an antiperiodic boundary cancels):
``<C(t)> = <C(T - t)>``, ``<C(t)> ~ A cosh(m (T/2 - t))``. So each row is folded,
``C_f(t) = (C(t) + C(T - t)) / 2`` for ``0 < t < T/2`` (``C_f(0) = C(0)``, ``C_f(T/2) = C(T/2)``),
and the effective mass is the cosh form: ``m_eff(t)`` solves

    C_f(t) / C_f(t+1) = cosh(m (T/2 - t)) / cosh(m (T/2 - t - 1)),   t = 0 ... T//2 - 1,

which tends to ``log C(t)/C(t+1)`` for ``T >> t``. It is a function of the mean correlator;
its error comes from the Gamma method applied to the linearised fluctuations
``dm/dC(t) C_i(t) + dm/dC(t+1) C_i(t+1)`` (what pyerrors' derived observables do), so it accounts
for the autocorrelation and the correlation between time slices. Where the mean ratio is not
above 1 (noise at large t) there is no solution: NaN.
"""

from __future__ import annotations

import math

import numpy as np

from gaugeflow.sampling.statistics import Estimate, gamma_method


def fold(c: np.ndarray) -> np.ndarray:
    """``(n, T) -> (n, T//2 + 1)``: ``C_f(t) = (C(t) + C(T - t)) / 2`` (``C(0)`` and, for even
    ``T``, ``C(T/2)`` as they are)."""
    c = np.asarray(c, dtype=np.float64)
    t_len = c.shape[-1]
    half = t_len // 2
    out = c[..., : half + 1].copy()
    for t in range(1, half + 1):
        if t_len - t != t:
            out[..., t] = 0.5 * (c[..., t] + c[..., t_len - t])
    return out


def _log_cosh(x: float) -> float:
    x = abs(x)
    return x + math.log1p(math.exp(-2.0 * x)) - math.log(2.0)


def cosh_mass(ratio: float, t: int, t_len: int) -> tuple[float, float]:
    """``(m, dm/d log ratio)`` of the cosh form at time ``t`` of a period ``t_len``; NaN where
    ``ratio`` has no solution (not above 1, or not finite)."""
    if not (math.isfinite(ratio) and ratio > 1.0):
        return math.nan, math.nan
    a = 0.5 * t_len - t
    b = a - 1.0
    log_r = math.log(ratio)

    def f(m: float) -> float:
        return _log_cosh(m * a) - _log_cosh(m * b) - log_r

    lo, hi = 0.0, max(1.0, 2.0 * log_r)
    while f(hi) < 0.0:
        hi *= 2.0
        if hi > 1e6:
            return math.nan, math.nan
    for _ in range(200):  # bisection: f is increasing in m for a > |b|
        mid = 0.5 * (lo + hi)
        if f(mid) < 0.0:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-15 * max(1.0, hi):
            break
    m = 0.5 * (lo + hi)
    slope = a * math.tanh(m * a) - b * math.tanh(m * b)  # d log(cosh(m a)/cosh(m b)) / dm
    return m, (1.0 / slope if slope > 0 else math.nan)


def correlator_analysis(reps: list[np.ndarray], s_tau: float = 2.0) -> dict[str, list[Estimate]]:
    """Estimates of the folded correlator and its cosh effective mass.

    ``reps``: one ``(n_c, T)`` array per chain (rows not measured already dropped). Returns
    ``{"correlator": [Estimate of C_f(t), t = 0 ... T//2], "effective_mass": [Estimate of
    m_eff(t), t = 0 ... T//2 - 1]}``; empty lists when nothing was measured.
    """
    reps = [np.asarray(r, dtype=np.float64) for r in reps if np.size(r)]
    if not reps:
        return {"correlator": [], "effective_mass": []}
    t_len = reps[0].shape[-1]
    folded = [fold(r) for r in reps]
    corr = [gamma_method([f[:, t] for f in folded], s_tau) for t in range(folded[0].shape[1])]
    meff = []
    for t in range(t_len // 2):
        c0, c1 = corr[t].mean, corr[t + 1].mean
        m, dm = cosh_mass(c0 / c1 if c1 != 0 else math.nan, t, t_len)
        if not math.isfinite(m) or not math.isfinite(dm) or c0 <= 0 or c1 <= 0:
            meff.append(Estimate(math.nan, math.nan, math.nan, math.nan, len(reps)))
            continue
        # m = m(log C(t) - log C(t+1)): dm/dC(t) = dm / C(t), dm/dC(t+1) = -dm / C(t+1)
        proj = [dm * (f[:, t] / c0 - f[:, t + 1] / c1) for f in folded]
        est = gamma_method(proj, s_tau)
        meff.append(Estimate(m, est.err, est.tau_int, est.tau_int_err, est.replicas))
    return {"correlator": corr, "effective_mass": meff}


def as_lists(estimates: list[Estimate]) -> dict[str, list[float]]:
    """``{"t": [...], "mean": [...], "err": [...], "tau_int": [...]}`` of per-time-slice estimates."""
    return {"t": list(range(len(estimates))), "mean": [e.mean for e in estimates],
            "err": [e.err for e in estimates], "tau_int": [e.tau_int for e in estimates]}
