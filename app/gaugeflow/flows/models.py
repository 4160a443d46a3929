"""Assemble a flow model (prior + coupling layers) for a theory.

Defaults follow the published architectures: checkerboard affine couplings for phi^4
(Albergo et al. 1904.12072), circular-spline plaquette couplings for U(1) (Kanwar et al.
2003.06413) and spectral plaquette couplings for SU(N) (Boyda et al. 2008.05456).
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
from gaugeflow.theories.theory import Theory

KINDS = ("affine", "spline", "u1_equivariant", "sun_spectral")


def default_kind(theory: Theory) -> str:
    if not theory.is_gauge:
        return "affine"
    return "u1_equivariant" if theory.group.N == 1 else "sun_spectral"


def resolve_architecture(theory: Theory, kind: str | None = None, n_layers: int | None = None,
                         hidden: Sequence[int] | None = None) -> tuple[str, int, tuple[int, ...]]:
    """The ``(kind, n_layers, hidden)`` that :func:`build_flow_model` builds for these keys (null
    keys take the defaults for ``theory``). Checkpoints record them resolved, so a run reloads
    with the architecture it trained whatever later defaults become."""
    kind = kind or default_kind(theory)
    if kind not in KINDS:
        raise ValueError(f"model.kind must be one of {list(KINDS)}, got {kind!r}")
    if n_layers is None:
        d = theory.lattice.ndim
        n_layers = 16 if (not theory.is_gauge or d == 2) else 8 * d
    if n_layers < 1:
        raise ValueError(f"model.n_layers must be >= 1, got {n_layers}")
    if hidden is None:
        hidden = (8, 8) if kind == "u1_equivariant" else (32, 32)
    return kind, int(n_layers), tuple(int(h) for h in hidden)


def build_flow_model(
    theory: Theory,
    kind: str | None = None,
    n_layers: int | None = None,
    hidden: Sequence[int] | None = None,
    kernel_size: int = 3,
    activation: str = "leaky_relu",
    transform: str = "spline",
    n_bins: int = 8,
    n_mix: int = 6,
    bound: float = 4.0,
    zero_init: bool = False,
    dtype: torch.dtype = torch.float32,
    rectangles: bool = True,
) -> FlowModel:
    """A :class:`FlowModel` for ``theory``; ``zero_init=True`` starts exactly at the identity map.

    ``n_layers=None`` picks 16 for scalar and 2d gauge theories (two passes over the eight 2d
    gauge masks) and one pass over the mask schedule (8 d layers) for gauge theories in d > 2,
    so that every link is updated. ``hidden=None`` picks the context-net widths: [8, 8] for the
    U(1) couplings (Kanwar et al. 2003.06413; wider nets train no better per second on a CPU,
    docs/flows.md), [32, 32] otherwise.
    """
    kind, n_layers, hidden = resolve_architecture(theory, kind, n_layers, hidden)
    shape = theory.lattice.shape
    d = theory.lattice.ndim

    def net(c_in: int, c_out: int) -> ConvNet:
        return ConvNet(c_in, c_out, hidden, kernel_size, d, activation=activation, zero_init=zero_init)

    if kind in ("affine", "spline"):
        if theory.is_gauge:
            raise ValueError(f"model.kind={kind} is for scalar theories; {theory.name} is a gauge theory")
        layers = []
        for i in range(n_layers):
            if kind == "affine":
                layers.append(AffineCoupling(shape, i % 2, net(1, 2)))
            else:
                layers.append(SplineCoupling(shape, i % 2, net(1, SplineCoupling.n_params(n_bins)), n_bins, bound))
        model = FlowModel(GaussianPrior(shape, dtype=dtype), Flow(layers))
        return model.to(dtype)

    if not theory.is_gauge:
        raise ValueError(f"model.kind={kind} is for gauge theories; {theory.name} is a scalar theory")
    cdtype = torch.complex64 if dtype == torch.float32 else torch.complex128
    schedule = gauge_mask_schedule(shape)
    if kind == "u1_equivariant":
        if theory.group.N != 1:
            raise ValueError(f"model.kind=u1_equivariant needs a U(1) theory, got {theory.group}")
        ct = CircleTransform(transform, n_bins, n_mix)
        layers = [
            U1PlaquetteCoupling(schedule[i % len(schedule)], net(U1PlaquetteCoupling.n_context(d, rectangles),
                                                                 ct.n_params), ct, rectangles)
            for i in range(n_layers)
        ]
    else:
        from gaugeflow.flows.sun import SUNPlaquetteCoupling

        if theory.group.N < 2:
            raise ValueError(f"model.kind=sun_spectral needs an SU(N) theory, got {theory.group}")
        layers = [
            SUNPlaquetteCoupling.build(schedule[i % len(schedule)], theory.group, net, n_bins=n_bins)
            for i in range(n_layers)
        ]
    model = FlowModel(HaarPrior(theory.group, shape, dtype=cdtype), Flow(layers))
    return model.to(dtype)
