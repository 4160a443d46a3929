"""Base distributions: Gaussian for scalar fields, Haar for gauge links."""

from __future__ import annotations

import math

import torch
from torch import nn

from gaugeflow.groups import Group, get_group
from gaugeflow.lattice.geometry import global_shape, site_sum


class GaussianPrior(nn.Module):
    """Independent normal ``N(0, sigma^2)`` at every site, fields ``(batch, *shape)``."""

    def __init__(self, shape, sigma: float = 1.0, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.shape = tuple(int(s) for s in shape)
        self.sigma = float(sigma)
        # a buffer so that .to(device/dtype) moves the prior along with the model
        self.register_buffer("_ref", torch.zeros((), dtype=dtype), persistent=False)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        z = torch.randn((n, *self.shape), generator=generator, dtype=self._ref.dtype, device=self._ref.device)
        return self.sigma * z

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        sites = tuple(range(1, z.dim()))
        # the whole lattice's volume: on a decomposed run z holds one block of it
        norm = math.prod(global_shape(z.shape[1:])) * (math.log(self.sigma) + 0.5 * math.log(2 * math.pi))
        return -0.5 * site_sum((z / self.sigma).square(), sites) - norm


class HaarPrior(nn.Module):
    """Haar-random links ``(batch, d, *shape, N, N)``; density 1 w.r.t. the normalised Haar measure."""

    def __init__(self, group: str | Group, shape, dtype: torch.dtype = torch.complex64):
        super().__init__()
        self.group = get_group(group)
        self.shape = tuple(int(s) for s in shape)
        # a real buffer: Module.to(float64) casts it (a complex one would be cast to real)
        real = torch.float64 if dtype == torch.complex128 else torch.float32
        self.register_buffer("_ref", torch.zeros((), dtype=real), persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        return torch.complex128 if self._ref.dtype == torch.float64 else torch.complex64

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.group.random((n, len(self.shape), *self.shape), generator, self.dtype, self._ref.device)

    def log_prob(self, u: torch.Tensor) -> torch.Tensor:
        return u.new_zeros(u.shape[0], dtype=u.real.dtype)
