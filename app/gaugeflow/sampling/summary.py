"""Observable estimates from an ensemble's per-configuration series.

A Markov chain (HMC, independence Metropolis) is analysed with the Gamma method
(Wolff hep-lat/0306017, via pyerrors); independent flow draws with importance weights
``w = exp(log p - log q)`` give the ratio estimator ``<O> = <O w>_q / <w>_q``, whose error
pyerrors propagates (linearised) from the two correlated means.

:func:`topology` derives ``<Q^2>`` and the topological susceptibility ``chi_t = <Q^2> / V`` from
the per-configuration charge, with the same estimators.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from gaugeflow.sampling.statistics import MIN_SAMPLES, Estimate, gamma_method


def reweighted(series, log_w, s_tau: float = 2.0, name: str = "mc") -> Estimate:
    """``<O>_p`` from draws of q with log weights ``log_w`` (any additive constant)."""
    import pyerrors as pe

    o = np.asarray(series, dtype=np.float64).reshape(-1)
    lw = np.asarray(log_w, dtype=np.float64).reshape(-1)
    if o.shape != lw.shape:
        raise ValueError(f"series and log weights differ in length: {o.size} and {lw.size}")
    if o.size == 0:
        return Estimate(math.nan, math.nan, math.nan, math.nan)
    w = np.exp(lw - lw.max())
    mean = float((w * o).sum() / w.sum())
    if o.size < MIN_SAMPLES or np.ptp(o) == 0.0:
        err = 0.0 if np.ptp(o) == 0.0 else math.nan
        return Estimate(mean, err, math.nan if err != 0.0 else 0.5, math.nan)
    num = pe.Obs([w * o], [name])
    den = pe.Obs([w], [name])
    ratio = num / den
    ratio.gamma_method(S=s_tau)
    return Estimate(float(ratio.value), float(ratio.dvalue), float(ratio.e_tauint[name]),
                    float(ratio.e_dtauint[name]))


def summarize(series: Mapping[str, object], log_w=None, s_tau: float = 2.0) -> dict[str, Estimate]:
    """Estimate of every series: Gamma method on a chain, or reweighted when ``log_w`` is given."""
    if log_w is None:
        return {k: gamma_method(v, s_tau) for k, v in series.items()}
    return {k: reweighted(v, log_w, s_tau) for k, v in series.items()}


#: names of the derived topology estimates (summary.json keys of sample and analyze)
TOPOLOGY = ("topological_charge_squared", "topological_susceptibility")


def topology(charge, volume: int, log_w=None, s_tau: float = 2.0) -> dict[str, Estimate]:
    """``<Q^2>`` and ``chi_t = <Q^2> / V`` (``V`` the global number of sites) from the series of
    topological charges ``charge``: Gamma method on a chain, reweighted when ``log_w`` is given.

    ``<Q>`` vanishes by symmetry, so ``<Q^2>`` is the susceptibility's numerator (a nonzero
    measured ``<Q>`` is a sign of a chain that does not tunnel, not something to subtract).
    ``chi_t`` is a constant multiple of ``<Q^2>``: same relative error, same ``tau_int``.
    """
    if volume <= 0:
        raise ValueError(f"volume must be positive, got {volume}")
    q2 = np.square(np.asarray(charge, dtype=np.float64).reshape(-1))
    est = gamma_method(q2, s_tau) if log_w is None else reweighted(q2, log_w, s_tau)
    chi = Estimate(est.mean / volume, est.err / volume, est.tau_int, est.tau_int_err)
    return {TOPOLOGY[0]: est, TOPOLOGY[1]: chi}
