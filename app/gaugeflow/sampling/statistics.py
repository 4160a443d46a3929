"""Error analysis of Monte Carlo time series with the Gamma method.

Wolff, "Monte Carlo errors with less errors", hep-lat/0306017, as implemented by
pyerrors (Joswig, Kuberski, Kuhlmann & Neuendorf, arXiv:2209.14371).

Several independent chains of one ensemble are *replicas* (Wolff §3.3; pyerrors names them
``<ensemble>|r<c>``): one mean over all of them, one autocorrelation function averaged over
them, no correlation assumed between them. :func:`gamma_method` takes a series or a list of
replicas; :func:`replicas` splits a per-configuration column of an ensemble file by its
``chain`` dataset and drops the rows that were not measured (NaN).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

#: pyerrors' minimum length of a Monte Carlo history (of every replica)
MIN_SAMPLES = 5


@dataclass
class Estimate:
    mean: float
    err: float
    tau_int: float
    tau_int_err: float = 0.0
    #: independent chains (replicas) the estimate combines
    replicas: int = 1

    def as_dict(self) -> dict[str, float]:
        return asdict(self)

    def __format__(self, spec: str) -> str:
        return f"{self.mean:{spec or '.6g'}} +- {self.err:.2g} (tau_int {self.tau_int:.2f})"


def is_replicas(series) -> bool:
    """Whether ``series`` is a list (or tuple) of one-dimensional series, one per chain."""
    return isinstance(series, (list, tuple)) and len(series) > 0 and all(np.ndim(s) == 1 for s in series)


def _as_replicas(series) -> list[np.ndarray]:
    if is_replicas(series):
        return [np.asarray(s, dtype=np.float64) for s in series]
    return [np.asarray(series, dtype=np.float64).reshape(-1)]


def replicas(values, chain=None, skip_nan: bool = True) -> list[np.ndarray]:
    """Per-chain series of a per-configuration column: ``values[chain == c]`` for each chain id
    ``c`` in increasing order, in the order of the rows (Monte Carlo time); without ``chain``
    (a file of one chain) the whole column. ``skip_nan`` drops NaN rows (configurations on
    which the quantity was not measured, e.g. between ``hmc.measure_every`` measurements) and
    then chains left with no value.
    """
    x = np.asarray(values, dtype=np.float64).reshape(-1)
    if chain is None:
        parts = [x]
    else:
        ids = np.asarray(chain).reshape(-1)
        if ids.shape != x.shape:
            raise ValueError(f"chain ids and values differ in length: {ids.size} and {x.size}")
        parts = [x[ids == c] for c in np.unique(ids)]
    if skip_nan:
        parts = [p[~np.isnan(p)] for p in parts]
        parts = [p for p in parts if p.size]
    return parts or [np.empty(0)]


def gamma_method(series, s_tau: float = 2.0, name: str = "mc") -> Estimate:
    """Mean, error and integrated autocorrelation time of a Markov chain series.

    ``series``: one chain's series (any array, flattened), or a list of one-dimensional
    series, one per independent chain of the same ensemble, analysed as replicas (pyerrors
    names ``<name>|r0``, ``<name>|r1``, ...): the mean is over all values, the
    autocorrelation function is the replicas' average, and ``tau_int`` is in units of one
    chain's steps. A list of one series is that series.

    ``tau_int`` follows Wolff's convention (1/2 for uncorrelated data); ``s_tau`` is
    his S parameter for the automatic window choice.
    """
    reps = [r for r in _as_replicas(series) if r.size]
    n_rep = max(1, len(reps))
    if not reps:
        return Estimate(math.nan, math.nan, math.nan, math.nan, n_rep)
    x = np.concatenate(reps) if len(reps) > 1 else reps[0]
    if np.ptp(x) == 0.0:
        return Estimate(float(x.mean()), 0.0, 0.5, 0.0, n_rep)
    if min(r.size for r in reps) < MIN_SAMPLES:
        # too short to estimate an autocorrelation: naive error, tau_int unknown
        err = float(x.std(ddof=1) / math.sqrt(x.size)) if x.size > 1 else math.nan
        return Estimate(float(x.mean()), err, math.nan, math.nan, n_rep)
    import pyerrors as pe  # imported on use: it takes seconds to load

    names = [name] if len(reps) == 1 else [f"{name}|r{c}" for c in range(len(reps))]
    obs = pe.Obs(reps, names)
    obs.gamma_method(S=s_tau)
    return Estimate(float(obs.value), float(obs.dvalue), float(obs.e_tauint[name]), float(obs.e_dtauint[name]),
                    n_rep)
