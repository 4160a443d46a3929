"""Coupling layers for real scalar fields on a checkerboard (Albergo, Kanshin & Shanahan 1904.12072).

Sites of one parity are transformed elementwise with parameters computed by a periodic
convolutional network from the sites of the other parity, which stay fixed; the
Jacobian is triangular, its log-determinant the sum of elementwise log-derivatives.
"""

from __future__ import annotations

import torch
from torch import nn

from gaugeflow.flows.base import FlowLayer
from gaugeflow.flows.masks import checkerboard_mask
from gaugeflow.flows.splines import unbounded_rational_quadratic_spline
from gaugeflow.lattice.geometry import site_sum


class _CheckerboardCoupling(FlowLayer):
    def __init__(self, shape, parity: int, net: nn.Module):
        super().__init__()
        active = checkerboard_mask(shape, parity)
        self.register_buffer("active", active, persistent=False)
        self.net = net

    def _params(self, x: torch.Tensor) -> torch.Tensor:
        frozen = (~self.active).to(x.dtype)
        return self.net((x * frozen).unsqueeze(1))  # (batch, n_params, *L)

    def _sum(self, v: torch.Tensor) -> torch.Tensor:
        return site_sum((v * self.active.to(v.dtype)).flatten(1), (1,))


class AffineCoupling(_CheckerboardCoupling):
    """RealNVP coupling ``x_a -> x_a e^{s} + t`` (Dinh et al. 1605.08803) with (s, t) = net(frozen sites).

    ``net`` maps ``(batch, 1, *L)`` to ``(batch, 2, *L)``; a zero-initialised last layer
    gives the identity.
    """

    def forward(self, x):
        s, t = self._params(x).unbind(1)
        a = self.active.to(x.dtype)
        y = x + a * (x * torch.expm1(s) + t)
        return y, self._sum(s)

    def inverse(self, y):
        s, t = self._params(y).unbind(1)
        a = self.active.to(y.dtype)
        x = y + a * ((y - t) * torch.exp(-s) - y)
        return x, -self._sum(s)


class SplineCoupling(_CheckerboardCoupling):
    """Rational-quadratic spline coupling (Durkan et al. 1906.04032) on [-bound, bound] with linear tails.

    ``net`` maps ``(batch, 1, *L)`` to ``(batch, 3 n_bins - 1, *L)``.
    """

    def __init__(self, shape, parity: int, net: nn.Module, n_bins: int = 8, bound: float = 4.0):
        super().__init__(shape, parity, net)
        self.n_bins, self.bound = int(n_bins), float(bound)

    @staticmethod
    def n_params(n_bins: int) -> int:
        return 3 * n_bins - 1

    def _transform(self, x, inverse):
        p = self._params(x).movedim(1, -1)
        k = self.n_bins
        y, logj = unbounded_rational_quadratic_spline(
            x, p[..., :k], p[..., k:2 * k], p[..., 2 * k:], inverse=inverse, bound=self.bound
        )
        a = self.active
        return torch.where(a, y, x), self._sum(logj)

    def forward(self, x):
        return self._transform(x, False)

    def inverse(self, y):
        return self._transform(y, True)
