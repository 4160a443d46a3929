"""Flow interface: layers return ``(output, log|det J|)`` both ways; a model is prior + flow.

Densities of gauge links are taken with respect to the normalised Haar measure (one per
link), so ``log q`` of a model with a Haar prior is just minus the accumulated
log-Jacobian, and ``F_q = E_q[log q + S] >= -log Z`` holds with the exact ``log Z`` of
``gaugeflow.exact``. For group-valued fields ``log|det J|`` is the Jacobian of the map in
local coordinates of the group in which the Haar measure is the Lebesgue measure (angles
for U(1); for SU(N) see :mod:`gaugeflow.flows.sun`).
"""

from __future__ import annotations

from abc import ABCMeta, abstractmethod
from collections.abc import Iterable

import torch
from torch import nn

from gaugeflow.lattice.geometry import site_sum


class FlowLayer(nn.Module, metaclass=ABCMeta):
    """A bijection ``x -> y`` with ``forward(x) = (y, log|det dy/dx|)`` and
    ``inverse(y) = (x, log|det dx/dy|)``, both per configuration (shape ``(batch,)``)."""

    @abstractmethod
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Map x to y; return y and log|det dy/dx|."""

    @abstractmethod
    def inverse(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Map y back to x; return x and log|det dx/dy|."""


class Flow(FlowLayer):
    """Composition of layers, applied in order by ``forward`` and in reverse by ``inverse``."""

    def __init__(self, layers: Iterable[nn.Module]):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logdet = x.new_zeros(x.shape[0], dtype=x.real.dtype)
        for layer in self.layers:
            x, ld = layer(x)
            logdet = logdet + ld
        return x, logdet

    def inverse(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logdet = y.new_zeros(y.shape[0], dtype=y.real.dtype)
        for layer in reversed(self.layers):
            y, ld = layer.inverse(y)
            logdet = logdet + ld
        return y, logdet


class SiteLogDetLayer(FlowLayer):
    """A layer given by ``transform(x, inverse) -> (y, per-site log|det J|)``, shape
    ``(batch, *L)``; forward and inverse sum the sites through the geometry (whole-lattice sums
    on a decomposed lattice)."""

    @abstractmethod
    def transform(self, x: torch.Tensor, inverse: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Map x (or invert it); return the result and the log|det J| of every site."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y, ld = self.transform(x, inverse=False)
        return y, site_sum(ld.flatten(1), (1,))

    def inverse(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, ld = self.transform(y, inverse=True)
        return x, site_sum(ld.flatten(1), (1,))


class FlowModel(nn.Module):
    """``q = f_* prior``: ``sample(n) -> (fields, log_q)`` and ``log_prob(fields)``."""

    def __init__(self, prior: nn.Module, flow: Flow):
        super().__init__()
        self.prior = prior
        self.flow = flow

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.prior.sample(n, generator)
        log_q = self.prior.log_prob(z)
        x, logdet = self.flow(z)
        return x, log_q - logdet

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        z, logdet = self.flow.inverse(x)
        return self.prior.log_prob(z) + logdet

    def forward(self, n: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return self.sample(n, generator)
