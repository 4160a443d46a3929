"""Importance weights of flow samples: ESS and free-energy estimates.

With ``log w = log p - log q = -S - log q`` (p unnormalised), ``E_q[w] = Z``.
"""

from __future__ import annotations

import math

import torch


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
