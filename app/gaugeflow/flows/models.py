"""Flow architectures: one builder per architecture, ``(theory, dtype, **keys) -> FlowModel``.

Each builder is named by the ``_target_`` of its ``conf/model/<name>.yaml`` and takes that
file's keys; its keyword defaults are the architecture's defaults. The published
architectures: checkerboard affine couplings for phi^4 (Albergo et al. 1904.12072),
circular-spline or NCP plaquette couplings for U(1) (Kanwar et al. 2003.06413) and spectral
plaquette couplings for SU(N) (Boyda et al. 2008.05456). docs/extending.md states the contract
a user's builder meets.

A builder may carry ``resolve_keys(theory, keys) -> keys``: the values its null keys take for
``theory``, so that a checkpoint records the architecture in full.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from gaugeflow.flows.base import Flow, FlowModel
from gaugeflow.flows.conv import ConvNet
from gaugeflow.flows.masks import gauge_mask_schedule
from gaugeflow.flows.priors import GaussianPrior, HaarPrior
from gaugeflow.flows.scalar import AffineCoupling, SplineCoupling
from gaugeflow.flows.u1 import CircleTransform, U1PlaquetteCoupling


def gauge_layers(theory, n_layers: int | None) -> int:
    """``n_layers`` of a gauge flow; ``None``: 16 in 2d (two passes over the eight 2d masks), one
    pass over the mask schedule (8 d layers, every link updated) in d > 2."""
    if n_layers is None:
        d = theory.lattice.ndim
        return 16 if d == 2 else 8 * d
    return int(n_layers)


def _check_layers(n_layers: int) -> int:
    if int(n_layers) < 1:
        raise ValueError(f"model.n_layers must be >= 1, got {n_layers}")
    return int(n_layers)


def _nets(theory, hidden, kernel_size, activation, zero_init):
    hidden = tuple(int(h) for h in hidden)

    def net(c_in: int, c_out: int) -> ConvNet:
        return ConvNet(c_in, c_out, hidden, kernel_size, theory.lattice.ndim, activation=activation,
                       zero_init=zero_init)

    return net


def _scalar_only(theory, name: str) -> None:
    if theory.is_gauge:
        raise ValueError(f"model={name} is for scalar theories; {theory.name} is a gauge theory")


def _complex(dtype: torch.dtype) -> torch.dtype:
    return torch.complex64 if dtype == torch.float32 else torch.complex128


def affine(theory, dtype: torch.dtype = torch.float32, *, n_layers: int = 16, hidden: Sequence[int] = (32, 32),
           kernel_size: int = 3, activation: str = "leaky_relu", zero_init: bool = False) -> FlowModel:
    """Checkerboard affine couplings on a Gaussian prior (Albergo, Kanwar & Shanahan 1904.12072)."""
    _scalar_only(theory, "affine")
    net = _nets(theory, hidden, kernel_size, activation, zero_init)
    shape = theory.lattice.shape
    layers = [AffineCoupling(shape, i % 2, net(1, 2)) for i in range(_check_layers(n_layers))]
    return FlowModel(GaussianPrior(shape, dtype=dtype), Flow(layers)).to(dtype)


def spline(theory, dtype: torch.dtype = torch.float32, *, n_layers: int = 16, hidden: Sequence[int] = (32, 32),
           kernel_size: int = 3, activation: str = "leaky_relu", zero_init: bool = False, n_bins: int = 8,
           bound: float = 4.0) -> FlowModel:
    """Checkerboard rational-quadratic spline couplings (Durkan et al. 1906.04032) on a Gaussian prior."""
    _scalar_only(theory, "spline")
    net = _nets(theory, hidden, kernel_size, activation, zero_init)
    shape = theory.lattice.shape
    layers = [SplineCoupling(shape, i % 2, net(1, SplineCoupling.n_params(n_bins)), n_bins, bound)
              for i in range(_check_layers(n_layers))]
    return FlowModel(GaussianPrior(shape, dtype=dtype), Flow(layers)).to(dtype)


def u1_equivariant(theory, dtype: torch.dtype = torch.float32, *, n_layers: int | None = None,
                   hidden: Sequence[int] = (8, 8), kernel_size: int = 3, activation: str = "leaky_relu",
                   zero_init: bool = False, transform: str = "spline", n_bins: int = 8, n_mix: int = 6,
                   rectangles: bool = True) -> FlowModel:
    """Gauge-equivariant U(1) plaquette couplings (Kanwar et al. 2003.06413): the active
    plaquettes' phases move by a circular spline (``transform=spline``) or a mixture of
    non-compact projections (``ncp``), conditioned on frozen plaquettes (and, with
    ``rectangles``, frozen 2x1 loops). ``hidden=[8, 8]``: wider nets train no better per second
    on a CPU (docs/flows.md)."""
    if not theory.is_gauge or theory.group.N != 1:
        raise ValueError(f"model=u1_equivariant needs a U(1) gauge theory, got {theory.name}")
    net = _nets(theory, hidden, kernel_size, activation, zero_init)
    schedule = gauge_mask_schedule(theory.lattice.shape)
    d = theory.lattice.ndim
    ct = CircleTransform(transform, n_bins, n_mix)
    layers = [U1PlaquetteCoupling(schedule[i % len(schedule)], net(U1PlaquetteCoupling.n_context(d, rectangles),
                                                                   ct.n_params), ct, rectangles)
              for i in range(_check_layers(gauge_layers(theory, n_layers)))]
    prior = HaarPrior(theory.group, theory.lattice.shape, dtype=_complex(dtype))
    return FlowModel(prior, Flow(layers)).to(dtype)


def sun_spectral(theory, dtype: torch.dtype = torch.float32, *, n_layers: int | None = None,
                 hidden: Sequence[int] = (32, 32), kernel_size: int = 3, activation: str = "leaky_relu",
                 zero_init: bool = False, n_bins: int = 8, active_loop: str = "plaquette",
                 loops: Sequence[str] = ("plaquette", "rectangle"), loop_mix: float = 0.9, context: str = "conv",
                 lcnn_channels: Sequence[int] = (4, 4), lcnn_reach: int = 1) -> FlowModel:
    """Spectral (conjugation-equivariant) SU(N) plaquette couplings (Boyda et al. 2008.05456):
    splines move the eigenphases of active loops, eigenvectors fixed. ``active_loop=learned``: the
    loop is ``U_mu(x)`` times a learned SU(N) projection of a sum of frozen staples (``loops``,
    weights bounded by ``loop_mix``); ``context=lcnn``: the context networks are L-CNNs of the
    frozen links (``lcnn_channels``, ``lcnn_reach``, then a ConvNet head of ``hidden``); see
    :mod:`gaugeflow.flows.sun` and :mod:`gaugeflow.flows.lcnn`."""
    from gaugeflow.flows.lcnn import check_context, lcnn_factory
    from gaugeflow.flows.sun import SUNPlaquetteCoupling

    if not theory.is_gauge or theory.group.N < 2:
        raise ValueError(f"model=sun_spectral needs an SU(N) gauge theory, got {theory.name}")
    SUNPlaquetteCoupling.check_active_loop(active_loop)
    if check_context(context) == "lcnn":
        net = lcnn_factory(theory.lattice.ndim, lcnn_channels, lcnn_reach, hidden, kernel_size, activation, zero_init)
    else:
        net = _nets(theory, hidden, kernel_size, activation, zero_init)
    schedule = gauge_mask_schedule(theory.lattice.shape)
    layers = [SUNPlaquetteCoupling.build(schedule[i % len(schedule)], theory.group, net, n_bins=n_bins,
                                         active_loop=active_loop, loops=tuple(loops), loop_mix=loop_mix)
              for i in range(_check_layers(gauge_layers(theory, n_layers)))]
    prior = HaarPrior(theory.group, theory.lattice.shape, dtype=_complex(dtype))
    return FlowModel(prior, Flow(layers)).to(dtype)


def _resolve_gauge(theory, keys: dict) -> dict:
    return {**keys, "n_layers": gauge_layers(theory, keys.get("n_layers"))}


u1_equivariant.resolve_keys = _resolve_gauge
sun_spectral.resolve_keys = _resolve_gauge

#: the architectures a checkpoint written before ``_target_`` names by ``model.kind``
LEGACY_KINDS = {name: f"gaugeflow.flows.models.{name}" for name in ("affine", "spline", "u1_equivariant",
                                                                    "sun_spectral")}


def residual(theory, dtype: torch.dtype = torch.float32, *, n_layers: int | None = None,
             hidden: Sequence[int] = (16, 16), kernel_size: int = 3, activation: str = "leaky_relu",
             zero_init: bool = False, loops: Sequence[str] = ("plaquette", "rectangle"), max_step: float = 0.9,
             tol: float | None = None, max_iter: int = 1000, context: str = "conv",
             lcnn_channels: Sequence[int] = (4, 4), lcnn_reach: int = 1) -> FlowModel:
    """Residual (stout-like) gauge flows for U(1) and SU(N) (Abbott et al. 2401.10874, after Lüscher
    0907.5491): ``U -> exp(P(U sum_k c_k S_k)) U`` on the active links of the mask schedule, loops
    through exactly one active link, ``sum_k |c_k| < max_step < 1`` (invertible), exact per-link
    log-det, fixed-point inverse (``tol``, ``max_iter``); see :mod:`gaugeflow.flows.residual`.
    ``context=lcnn``: L-CNN context networks of the frozen links (:mod:`gaugeflow.flows.lcnn`)."""
    from gaugeflow.flows.lcnn import check_context, lcnn_factory
    from gaugeflow.flows.residual import ResidualCoupling

    if not theory.is_gauge:
        raise ValueError(f"model=residual needs a gauge theory, got {theory.name}")
    if check_context(context) == "lcnn":
        net = lcnn_factory(theory.lattice.ndim, lcnn_channels, lcnn_reach, hidden, kernel_size, activation, zero_init)
    else:
        net = _nets(theory, hidden, kernel_size, activation, zero_init)
    schedule = gauge_mask_schedule(theory.lattice.shape)
    layers = [ResidualCoupling(schedule[i % len(schedule)], theory.group, net, loops=tuple(loops),
                               max_step=max_step, tol=tol, max_iter=max_iter)
              for i in range(_check_layers(gauge_layers(theory, n_layers)))]
    prior = HaarPrior(theory.group, theory.lattice.shape, dtype=_complex(dtype))
    return FlowModel(prior, Flow(layers)).to(dtype)


residual.resolve_keys = _resolve_gauge
