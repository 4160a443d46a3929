"""Lattice gauge-equivariant convolutional networks (L-CNN) as context networks of gauge couplings.

After Favoni, Ipp, Müller & Schuh, "Lattice gauge equivariant convolutional neural networks",
arXiv:2012.12901. The network acts on *adjoint fields*: ``C`` channels of complex ``N x N``
matrices per site, held as ``(batch, *L, C, N, N)`` (lattice axes right after the batch axis, so
that :func:`gaugeflow.lattice.shift` carries the channel and colour axes along), which transform
as ``W(x) -> Omega(x) W(x) Omega(x)^dagger`` under ``U_mu(x) -> Omega(x) U_mu(x) Omega(x+mu)^dagger``.

Layers (each maps adjoint fields to adjoint fields, gauge covariantly):

``LConv``   parallel transport along the lattice axes and channel mixing,
            ``W'_i(x) = sum_j sum_{(mu, k)} w_{i j mu k} U_{x -> x + k mu} W_j(x + k mu) U_{x -> x + k mu}^dagger``
            for ``|k| <= reach`` (``k = 0`` the site itself), with the straight Wilson line
            ``U_{x -> x + k mu}`` and complex weights ``w``.
``LBilin``  bilinear products of channels, ``W'_i = sum_{j, k} a_{ijk} X_j X_k`` with ``X = (W, 1)``
            (the unit matrix appended, so linear terms and a covariant constant are included).
``LAct``    trace nonlinearity ``W_i -> W_i * act(a_i Re tr W_i / N + b_i)`` (a gauge-invariant gate).
``LTrace``  ``Re`` and ``Im`` of ``tr W_i / N``: gauge-invariant scalars ``(batch, 2 C, *L)``.

:class:`LCNN` is plaquettes (and their daggers) -> ``[LConv, LBilin, LAct] x len(channels)`` ->
``LTrace`` -> a :class:`gaugeflow.flows.conv.ConvNet` head, so its outputs are gauge invariant
and translation equivariant, and it replaces the ConvNet on invariant features as the context
network of :class:`gaugeflow.flows.sun.SUNPlaquetteCoupling` and
:class:`gaugeflow.flows.residual.ResidualCoupling` (``model.context=lcnn``).

Frozen links only
-----------------
A coupling's Jacobian is triangular only if its context network reads links that the coupling
does not change. :meth:`LCNN.forward` takes ``frozen``, a bool ``(d, *L)`` mask of those links, and
works throughout with the *masked* links ``U~_mu(x) = U_mu(x)`` where frozen and ``0`` where not
(a missing link). ``0`` transforms covariantly (into ``0``), so every layer stays gauge
equivariant, and a plaquette or a transport through an updated link is exactly zero: the
outputs do not depend on the updated links at all (their gradient there is exactly zero; the
tests check it). The couplings' masks have period 2, so the context is equivariant under
translations by two sites (by one with nothing masked).

Neighbours come only from :func:`gaugeflow.lattice.shift` (a domain-decomposed lattice swaps in
a halo exchange; the transport reach sets the halo depth).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
from torch import nn

from gaugeflow.flows.conv import ConvNet, _activation
from gaugeflow.groups.matrix import dagger
from gaugeflow.lattice import shift

__all__ = ["LCNN", "LAct", "LBilin", "LConv", "LTrace", "lcnn_factory", "masked_links", "plaquette_fields"]

CONTEXTS = ("conv", "lcnn")


def masked_links(links: torch.Tensor, frozen: torch.Tensor | None) -> torch.Tensor:
    """``U~`` of the module docstring: links ``(batch, d, *L, N, N)`` with the non-frozen ones zero."""
    if frozen is None:
        return links
    if frozen.shape != links.shape[1:-2]:
        raise ValueError(f"frozen link mask {tuple(frozen.shape)} does not match links {tuple(links.shape)}")
    return links * frozen[None, ..., None, None].to(links.real.dtype)


def plaquette_fields(ulinks: torch.Tensor) -> torch.Tensor:
    """``P_{rho sigma}(x)`` and their daggers for every plane rho < sigma: ``(batch, *L, 2 n_planes, N, N)``.

    With masked links, a plaquette holding a missing link is zero.
    """
    d = ulinks.shape[1]
    out = []
    for r, s in itertools.combinations(range(d), 2):
        u_r, u_s = ulinks[:, r], ulinks[:, s]
        p = (u_r @ shift(u_s, r, 1)) @ dagger(u_s @ shift(u_r, s, 1))
        out.extend((p, dagger(p)))
    return torch.stack(out, dim=-3)


def _complex_weight(*shape: int, std: float) -> tuple[nn.Parameter, nn.Parameter]:
    # real and imaginary parts as real parameters: optimisers, FSDP and checkpoints see real tensors
    s = std / math.sqrt(2)
    return nn.Parameter(s * torch.randn(*shape)), nn.Parameter(s * torch.randn(*shape))


class LConv(nn.Module):
    """Gauge-equivariant convolution: parallel transport of every channel from ``x + k mu``
    (``0 < |k| <= reach``, every axis mu) and from ``x`` itself, mixed by complex weights
    ``(out, in, 1 + 2 d reach)``."""

    def __init__(self, in_channels: int, out_channels: int, ndim: int, reach: int = 1):
        super().__init__()
        if reach < 0 or in_channels < 1 or out_channels < 1:
            raise ValueError(f"LConv needs channels >= 1 and reach >= 0, got {in_channels}, {out_channels}, {reach}")
        self.in_channels, self.out_channels, self.ndim, self.reach = in_channels, out_channels, ndim, int(reach)
        n_paths = 1 + 2 * ndim * self.reach
        self.weight_re, self.weight_im = _complex_weight(out_channels, in_channels, n_paths,
                                                         std=1 / math.sqrt(in_channels * n_paths))

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, ndim={self.ndim}, reach={self.reach}"

    def transported(self, w: torch.Tensor, ulinks: torch.Tensor) -> torch.Tensor:
        """``(batch, *L, n_paths, C, N, N)``: ``W(x)``, then per axis mu ``T_{+mu}^k W`` and ``T_{-mu}^k W``."""
        out = [w]
        for mu in range(self.ndim):
            u = ulinks[:, mu][..., None, :, :]  # U~_mu(x), broadcast over channels
            u_back = shift(u, mu, -1)  # U~_mu(x - mu)
            fwd, bwd = w, w
            for _ in range(self.reach):
                # (T_+ W)(x) = U~_mu(x) W(x + mu) U~_mu(x)^dagger; (T_- W)(x) = U~_mu(x-mu)^dagger W(x-mu) U~_mu(x-mu)
                fwd = u @ shift(fwd, mu, 1) @ dagger(u)
                bwd = dagger(u_back) @ shift(bwd, mu, -1) @ u_back
                out.extend((fwd, bwd))
        return torch.stack(out, dim=-4)

    def forward(self, w: torch.Tensor, ulinks: torch.Tensor) -> torch.Tensor:
        t = self.transported(w, ulinks)
        weight = torch.complex(self.weight_re, self.weight_im).to(t.dtype)
        return torch.einsum("oct,...tcij->...oij", weight, t)


class LBilin(nn.Module):
    """``W'_i = sum_{j,k} a_{ijk} X_j X_k`` with ``X = (W_1, ..., W_C, 1)`` and complex ``a``."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        c = in_channels + 1
        self.weight_re, self.weight_im = _complex_weight(out_channels, c, c, std=1 / c)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}"

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        eye = torch.eye(w.shape[-1], dtype=w.dtype, device=w.device).expand(*w.shape[:-3], 1, -1, -1)
        x = torch.cat([w, eye], dim=-3)  # (..., C + 1, N, N)
        a = torch.complex(self.weight_re, self.weight_im).to(w.dtype)
        y = torch.einsum("ojk,...kab->...ojab", a, x)  # (..., out, C + 1, N, N): sum_k a_ijk X_k
        return (x[..., None, :, :, :] @ y).sum(-3)


class LAct(nn.Module):
    """Trace nonlinearity ``W_i -> W_i * act(a_i Re tr W_i / N + b_i)``; ``a = 1``, ``b = 0`` at start."""

    def __init__(self, channels: int, activation: str = "leaky_relu"):
        super().__init__()
        self.act = _activation(activation)
        self.scale = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        t = w.diagonal(dim1=-2, dim2=-1).sum(-1).real / w.shape[-1]  # (..., C)
        gate = self.act(self.scale.to(t.dtype) * t + self.bias.to(t.dtype))
        return w * gate[..., None, None].to(w.dtype)


class LTrace(nn.Module):
    """``(batch, *L, C, N, N) -> (batch, 2 C, *L)``: Re and Im of ``tr W_i / N`` (channels first)."""

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        t = w.diagonal(dim1=-2, dim2=-1).sum(-1) / w.shape[-1]  # (batch, *L, C)
        return torch.cat([t.real, t.imag], dim=-1).movedim(-1, 1)


class LCNN(nn.Module):
    """An L-CNN context network: frozen links -> gauge-invariant per-site outputs.

    ``forward(links, frozen=None) -> (batch, out_channels, *L)`` for links ``(batch, d, *L, N, N)``
    and a bool mask ``frozen`` ``(d, *L)`` of the links the network may read (module docstring;
    ``None``: all). Input fields: the plaquettes of every plane and their daggers; then one
    ``LConv -> LBilin -> LAct`` block per entry of ``channels``; then ``LTrace`` and a ConvNet head
    (``hidden``, ``kernel_size``, ``activation``; ``zero_init`` zeroes its last layer).
    """

    takes_links = True  # the couplings hand it links and a frozen-link mask, not scalar features

    def __init__(self, ndim: int, out_channels: int, channels: Sequence[int] = (4, 4), reach: int = 1,
                 hidden: Sequence[int] = (16,), kernel_size: int = 3, activation: str = "leaky_relu",
                 zero_init: bool = False):
        super().__init__()
        channels = tuple(int(c) for c in channels)
        if not channels or min(channels) < 1:
            raise ValueError(f"model.lcnn_channels must be a non-empty list of positive widths, got {list(channels)}")
        self.ndim = int(ndim)
        c = 2 * self.ndim * (self.ndim - 1) // 2
        self.in_channels = c
        self.convs, self.bilins, self.acts = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        for width in channels:
            self.convs.append(LConv(c, width, self.ndim, reach))
            self.bilins.append(LBilin(width, width))
            self.acts.append(LAct(width, activation))
            c = width
        self.trace = LTrace()
        self.head = ConvNet(2 * c, out_channels, hidden, kernel_size, self.ndim, activation=activation,
                            zero_init=zero_init)

    def adjoint(self, links: torch.Tensor, frozen: torch.Tensor | None = None) -> torch.Tensor:
        """The last block's adjoint fields ``(batch, *L, C, N, N)``."""
        u = masked_links(links, frozen)
        w = plaquette_fields(u)
        for conv, bilin, act in zip(self.convs, self.bilins, self.acts):
            w = act(bilin(conv(w, u)))
        return w

    def forward(self, links: torch.Tensor, frozen: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.trace(self.adjoint(links, frozen)))


def lcnn_factory(ndim: int, channels: Sequence[int] = (4, 4), reach: int = 1, hidden: Sequence[int] = (16,),
                 kernel_size: int = 3, activation: str = "leaky_relu", zero_init: bool = False):
    """A ``net_factory(context_channels, out_channels)`` as the couplings take, building an :class:`LCNN`
    (which reads links itself, so ``context_channels`` is ignored)."""
    channels = tuple(int(c) for c in channels)
    hidden = tuple(int(h) for h in hidden)

    def net(_c_in: int, c_out: int) -> LCNN:
        return LCNN(ndim, c_out, channels, reach, hidden, kernel_size, activation, zero_init)

    return net


def check_context(context: str) -> str:
    if context not in CONTEXTS:
        raise ValueError(f"model.context must be one of {list(CONTEXTS)}, got {context!r}")
    return context
