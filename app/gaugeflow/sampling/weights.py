"""Importance weights of flow samples: ESS, free-energy estimates and the Pareto k-hat diagnostic.

With ``log w = log p - log q = -S - log q`` (p unnormalised), ``E_q[w] = Z``.

A reweighted estimate (and an independence Metropolis chain) is only as good as its weights: when
the distribution of ``w`` under q has a heavy right tail, the sample mean of ``w`` converges slowly,
the central limit theorem may not hold, and the stated errors understate the truth — while the
Kish ESS of the draws at hand can look fine. :func:`pareto_khat` estimates the shape ``k`` of that
tail as Pareto-smoothed importance sampling does (Vehtari, Simpson, Gelman, Yao & Gabry, "Pareto
smoothed importance sampling", arXiv:1507.02646): ``k < 0.5`` finite variance, ``0.5 <= k < 0.7``
still usable, ``k >= 0.7`` unreliable (the estimator's error is then dominated by draws not yet
seen). :func:`weight_diagnostics` bundles ESS, k-hat and a one-line warning for every job to print.
"""

from __future__ import annotations

import math

import numpy as np
import torch

#: k-hat above which importance-sampling estimates are unreliable (Vehtari et al. 1507.02646)
KHAT_MAX = 0.7
#: fewer effective draws than this and error bars are not to be trusted either
MIN_EFFECTIVE = 100.0


def effective_sample_size(log_w: torch.Tensor) -> torch.Tensor:
    """Normalised ESS ``(sum w)^2 / (n sum w^2)`` in (0, 1] (Kish), computed stably in log space."""
    log_w = log_w.detach().double()
    lse1 = torch.logsumexp(log_w, 0)
    lse2 = torch.logsumexp(2 * log_w, 0)
    return torch.exp(2 * lse1 - lse2) / log_w.numel()


def log_z_estimate(log_w: torch.Tensor) -> tuple[float, float]:
    """``log Z`` from ``log mean w`` with its delta-method error ``sqrt(var w / n) / mean w``."""
    log_w = log_w.detach().double()
    n = log_w.numel()
    shift = log_w.max()
    w = torch.exp(log_w - shift)
    mean = w.mean()
    err = (w.std(unbiased=True) / math.sqrt(n) / mean).item() if n > 1 else math.nan
    return (torch.log(mean) + shift).item(), err


def forward_effective_sample_size(log_w) -> float:
    """ESS per draw of q estimated from draws of **p** (an HMC or IMH chain): ``1 / (<w>_p <1/w>_p)``.

    With ``w = p~/q``: ``<w>_p <1/w>_p = E_q[w^2] / E_q[w]^2``, the inverse of the Kish ESS of q's
    own draws, but seen from samples of p, so that regions of p the flow misses (mode collapse) show
    up, which q's own draws never visit (Nicoli et al., arXiv:2302.14082). Computed in log space.
    """
    lw = _as_float64(log_w)
    lw = lw[~np.isnan(lw)]
    n = lw.size
    if n == 0 or not np.all(np.isfinite(lw)):
        return 0.0 if n else math.nan
    def log_mean_exp(a: np.ndarray) -> float:
        top = a.max()
        return float(top + np.log(np.exp(a - top).mean()))

    return math.exp(-log_mean_exp(lw) - log_mean_exp(-lw))


def _as_float64(log_w) -> np.ndarray:
    if torch.is_tensor(log_w):
        log_w = log_w.detach().to("cpu", torch.float64).numpy()
    return np.asarray(log_w, dtype=np.float64).reshape(-1)


def tail_length(n: int) -> int:
    """Draws in the fitted tail: ``ceil(min(0.2 n, 3 sqrt(n)))`` (Vehtari et al., independent draws)."""
    return math.ceil(min(0.2 * n, 3.0 * math.sqrt(n)))


def _gpd_fit(x: np.ndarray) -> tuple[float, float]:
    """Shape ``k`` and scale ``sigma`` of a generalized Pareto distribution fitted to the ascending
    exceedances ``x > 0``: the profile-likelihood posterior mean of Zhang & Stephens, "A new and
    efficient estimation method for the generalized Pareto distribution", Technometrics 51 (2009)
    316, with the weakly informative prior on ``k`` (weight 10 towards 0.5) of Vehtari et al.
    (1507.02646, as in their `loo` package and ArviZ's ``psislw``).

    ``b = -k/sigma`` is integrated over a grid of ``m = 30 + sqrt(n)`` points placed by the
    quantiles of its prior; for each ``b`` the profile maximum of ``k`` is
    ``k(b) = mean(log(1 - b x))`` and the profile log-likelihood ``n (log(-b/k) - k - 1)``.
    """
    n = x.size
    prior_bs, prior_k = 3.0, 10.0
    m = 30 + int(math.sqrt(n))
    b = 1.0 - np.sqrt(m / (np.arange(1, m + 1, dtype=np.float64) - 0.5))
    b /= prior_bs * x[int(n / 4 + 0.5) - 1]
    b += 1.0 / x[-1]
    k = np.log1p(-b[:, None] * x[None, :]).mean(axis=1)
    log_lik = n * (np.log(-b / k) - k - 1.0)
    # normalised weights exp(l_j) / sum_i exp(l_i), without overflow
    with np.errstate(over="ignore"):  # an overflow means a negligible weight: 1 / inf = 0
        weights = 1.0 / np.exp(log_lik[None, :] - log_lik[:, None]).sum(axis=1)
    keep = weights >= 10 * np.finfo(np.float64).eps
    b, weights = b[keep], weights[keep]
    weights /= weights.sum()
    b_post = float((b * weights).sum())
    k_post = float(np.log1p(-b_post * x).mean())
    sigma = -k_post / b_post
    k_post = (n * k_post + prior_k * 0.5) / (n + prior_k)
    return k_post, sigma


def pareto_khat(log_w) -> float:
    """Pareto k-hat of importance weights ``w = exp(log_w)`` (any additive constant; torch or numpy).

    PSIS (Vehtari, Simpson, Gelman, Yao & Gabry, arXiv:1507.02646): a generalized Pareto
    distribution is fitted (:func:`_gpd_fit`, Zhang & Stephens 2009) to the exceedances of the
    largest ``M = ceil(min(0.2 n, 3 sqrt(n)))`` weights over the next largest; its shape ``k``
    estimates the tail index of ``w``: ``w`` has finite moments of order ``< 1/k``. Thresholds:
    ``k < 0.5`` finite variance; ``k > 0.7`` the estimates are unreliable whatever the ESS says.

    Returns ``-inf`` when the largest weights are all equal (no tail: bounded, e.g. constant
    weights of a perfect flow), ``+inf`` when a weight is ``+inf``, and NaN when there are too
    few draws for a fit (fewer than 5 in the tail, i.e. ``n < 25``). NaN log weights count as
    zero weight.
    """
    lw = _as_float64(log_w)
    lw = np.where(np.isnan(lw), -np.inf, lw)
    if np.any(lw == np.inf):
        return math.inf
    n = lw.size
    m = tail_length(n)
    if m < 5 or m >= n:
        return math.nan
    lw = np.sort(lw)
    top = lw[-1]
    if not np.isfinite(top):
        return math.nan  # every weight is zero
    cutoff = lw[-m - 1]
    tail = lw[-m:]
    tail = tail[tail > cutoff]
    if tail.size == 0:
        return -math.inf
    if tail.size < 5:
        return math.nan
    # exceedances exp(lw) - exp(cutoff), scaled by exp(-top) (the shape does not depend on the scale)
    x = np.exp(tail - top) - np.exp(cutoff - top)
    x = x[x > 0]
    if x.size < 5:
        return math.nan
    k, _ = _gpd_fit(np.sort(x))
    return float(k) if math.isfinite(k) else math.inf


def weight_diagnostics(log_w, max_khat: float = KHAT_MAX, min_effective: float = MIN_EFFECTIVE) -> dict:
    """ESS, Pareto k-hat and a one-line warning for importance weights ``exp(log_w)``.

    Returns ``{"n", "ess", "n_eff", "khat", "warning"}``: ``ess`` the Kish ESS per draw, ``n_eff =
    n * ess``, ``khat`` from :func:`pareto_khat`, ``warning`` None or one line (no newline) saying
    why the error bars of estimates with these weights understate the truth: ``khat > max_khat``
    or ``n_eff < min_effective``.

    >>> d = weight_diagnostics(torch.zeros(1000, dtype=torch.float64))
    >>> round(d["ess"], 12), round(d["n_eff"], 9), d["khat"], d["warning"]
    (1.0, 1000.0, -inf, None)
    """
    lw = _as_float64(log_w)
    n = int(lw.size)
    if n == 0:
        return {"n": 0, "ess": math.nan, "n_eff": 0.0, "khat": math.nan, "warning": None}
    finite = lw[np.isfinite(lw)]
    if np.any(lw == np.inf):
        ess = 0.0
    elif finite.size == 0:
        ess = math.nan
    else:
        ess = float(effective_sample_size(torch.from_numpy(np.where(np.isnan(lw), -np.inf, lw))))
    n_eff = ess * n if math.isfinite(ess) else 0.0
    khat = pareto_khat(lw)
    return {"n": n, "ess": ess, "n_eff": n_eff, "khat": khat,
            "warning": weights_warning(khat, n_eff, max_khat, min_effective)}


def weights_warning(khat: float, n_eff: float, max_khat: float = KHAT_MAX,
                    min_effective: float = MIN_EFFECTIVE) -> str | None:
    """The one-line warning of :func:`weight_diagnostics` for a k-hat and a number of effective
    draws ``n_eff = N x ESS`` (None when neither criterion is met; a NaN k-hat does not warn)."""
    reasons = []
    if khat > max_khat:
        reasons.append(f"Pareto k-hat {khat:.2f} > {max_khat:g}")
    if n_eff < min_effective:
        reasons.append(f"N x ESS = {n_eff:.1f} < {min_effective:g} effective draws")
    if not reasons:
        return None
    return (f"importance weights unreliable ({'; '.join(reasons)}; PSIS, Vehtari et al. 1507.02646): "
            "the error bars understate the truth")


__all__ = ["KHAT_MAX", "MIN_EFFECTIVE", "effective_sample_size", "forward_effective_sample_size",
           "log_z_estimate", "pareto_khat", "tail_length", "weight_diagnostics", "weights_warning"]
