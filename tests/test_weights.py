"""Importance-weight diagnostics (gaugeflow.sampling.weights): Pareto k-hat (PSIS) on tails of known
shape, ESS, the forward ESS from samples of p, and the one-line warning."""

import math

import numpy as np
import pytest
import torch
from scipy import stats

from gaugeflow.sampling.weights import (effective_sample_size, forward_effective_sample_size, pareto_khat,
                                        tail_length, weight_diagnostics, weights_warning)


@pytest.mark.parametrize("k", [0.2, 0.5, 0.9, 1.2])
def test_khat_of_a_pareto_tail_of_known_shape(k):
    # w = U^-k has P(w > t) = t^(-1/k): a Pareto tail of shape k (moments of order < 1/k exist)
    rng = np.random.default_rng(int(100 * k))
    log_w = -k * np.log(rng.random(100_000))
    khat = pareto_khat(log_w)
    # the tail has M = 949 draws: the estimator's spread is about (1 + k) / sqrt(M) < 0.08
    assert abs(khat - k) < 0.15, (k, khat)


@pytest.mark.parametrize("k", [-0.4, 0.3, 0.8])
def test_khat_agrees_with_a_maximum_likelihood_fit_of_the_same_tail(k):
    """Zhang & Stephens' posterior mean against scipy's generalized-Pareto MLE on the same exceedances."""
    rng = np.random.default_rng(7)
    n = 40_000
    log_w = np.log(stats.genpareto.rvs(k, size=n, random_state=rng) + 1.0)
    s = np.sort(log_w)
    m = tail_length(n)
    x = np.exp(s[-m:] - s[-1]) - np.exp(s[-m - 1] - s[-1])
    mle, _, _ = stats.genpareto.fit(x, floc=0)
    assert abs(pareto_khat(log_w) - mle) < 0.05, (pareto_khat(log_w), mle)


def test_bounded_and_constant_weights_have_small_khat():
    rng = np.random.default_rng(3)
    assert pareto_khat(np.log(rng.random(20_000))) < -0.8  # uniform weights: a bounded tail, k = -1
    assert pareto_khat(0.01 * rng.normal(size=20_000)) < 0.2  # nearly constant: light tail
    assert pareto_khat(np.zeros(1000)) == -math.inf  # constant: no tail at all
    d = weight_diagnostics(torch.zeros(1000, dtype=torch.float64))
    assert d["ess"] == pytest.approx(1.0) and d["n_eff"] == pytest.approx(1000) and d["warning"] is None


def test_khat_is_shift_invariant_and_takes_torch_or_numpy():
    rng = np.random.default_rng(5)
    log_w = -0.6 * np.log(rng.random(5000))
    k = pareto_khat(log_w)
    assert pareto_khat(log_w + 700.0) == pytest.approx(k, abs=1e-9)  # no overflow: shifted by the maximum
    assert pareto_khat(torch.from_numpy(log_w - 1e4)) == pytest.approx(k, abs=1e-9)
    assert pareto_khat(torch.from_numpy(log_w).float()) == pytest.approx(k, abs=1e-3)


def test_khat_edge_cases():
    assert math.isnan(pareto_khat(np.zeros(10)))  # too few draws for a tail of 5
    assert pareto_khat(np.array([0.0] * 100 + [np.inf])) == math.inf
    # NaN log weights count as zero weight: they never sit in the upper tail
    rng = np.random.default_rng(9)
    log_w = -0.5 * np.log(rng.random(4000))
    with_nan = np.concatenate([log_w, [np.nan] * 50])
    assert pareto_khat(with_nan) == pytest.approx(pareto_khat(np.concatenate([log_w, [-np.inf] * 50])))


def test_warning_says_why_in_one_line():
    rng = np.random.default_rng(11)
    heavy = weight_diagnostics(-1.0 * np.log(rng.random(4000)))  # k = 1: infinite mean
    assert heavy["khat"] > 0.7 and "Pareto k-hat" in heavy["warning"] and "\n" not in heavy["warning"]
    assert "error bars understate the truth" in heavy["warning"]
    few = weight_diagnostics(np.zeros(50))  # perfect weights, but only 50 draws
    assert few["n_eff"] == pytest.approx(50) and "N x ESS = 50.0 < 100" in few["warning"]
    assert "k-hat" not in few["warning"]
    good = weight_diagnostics(0.1 * rng.normal(size=4000))
    assert good["warning"] is None and good["ess"] == pytest.approx(
        effective_sample_size(torch.from_numpy(0.1 * rng.normal(size=4000))).item(), abs=0.02)
    assert weights_warning(math.nan, 500.0) is None  # an undefined k-hat does not warn by itself


def test_forward_ess_from_samples_of_p_matches_the_ess_of_q():
    # p = N(0, 1), q = N(0, s^2): ESS = 1 / E_q[(p/q)^2] = sqrt(2 s^2 - 1) / s^2
    s, n = 1.5, 200_000
    rng = np.random.default_rng(13)
    want = math.sqrt(2 * s * s - 1) / (s * s)

    def log_w(x):  # log p~ - log q with an arbitrary normalisation of p
        return -0.5 * x * x + 3.0 - (-0.5 * (x / s) ** 2 - math.log(s))

    from_p = forward_effective_sample_size(log_w(rng.normal(size=n)))
    from_q = effective_sample_size(torch.from_numpy(log_w(s * rng.normal(size=n)))).item()
    assert from_p == pytest.approx(want, abs=0.01) and from_q == pytest.approx(want, abs=0.01)
    # a flow that misses a mode of p: q's own draws look perfect, samples of p do not
    x_p = np.concatenate([rng.normal(size=n // 2), 8.0 + rng.normal(size=n // 2)])
    lw = -0.5 * x_p**2 + 0.5 * x_p**2  # w = 1 on the mode q covers ...
    lw[n // 2:] = 20.0  # ... and huge where q has (almost) no mass
    assert forward_effective_sample_size(lw) < 0.01
