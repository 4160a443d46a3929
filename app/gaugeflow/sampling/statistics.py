"""Error analysis of Monte Carlo time series with the Gamma method.

Wolff, "Monte Carlo errors with less errors", hep-lat/0306017, as implemented by
pyerrors (Joswig, Kuberski, Kuhlmann & Neuendorf, arXiv:2209.14371).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np


#: pyerrors' minimum length of a Monte Carlo history
MIN_SAMPLES = 5


@dataclass
class Estimate:
    mean: float
    err: float
    tau_int: float
    tau_int_err: float = 0.0

    def as_dict(self) -> dict[str, float]:
        return asdict(self)

    def __format__(self, spec: str) -> str:
        return f"{self.mean:{spec or '.6g'}} +- {self.err:.2g} (tau_int {self.tau_int:.2f})"


def gamma_method(series, s_tau: float = 2.0, name: str = "mc") -> Estimate:
    """Mean, error and integrated autocorrelation time of a Markov chain series.

    ``tau_int`` follows Wolff's convention (1/2 for uncorrelated data); ``s_tau`` is
    his S parameter for the automatic window choice.
    """
    import pyerrors as pe  # imported on use: it takes seconds to load

    x = np.asarray(series, dtype=np.float64).reshape(-1)
    if x.size == 0:
        return Estimate(math.nan, math.nan, math.nan, math.nan)
    if np.ptp(x) == 0.0:
        return Estimate(float(x.mean()), 0.0, 0.5, 0.0)
    if x.size < MIN_SAMPLES:
        # too short to estimate an autocorrelation: naive error, tau_int unknown
        err = float(x.std(ddof=1) / math.sqrt(x.size)) if x.size > 1 else math.nan
        return Estimate(float(x.mean()), err, math.nan, math.nan)
    obs = pe.Obs([x], [name])
    obs.gamma_method(S=s_tau)
    return Estimate(float(obs.value), float(obs.dvalue), float(obs.e_tauint[name]), float(obs.e_dtauint[name]))
