"""A theory = action + lattice + field space; the builders of the presets are in :mod:`gaugeflow.theories.builders`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from gaugeflow.groups import Group
from gaugeflow.lattice import Lattice
from gaugeflow.theories.gauge import autograd_force


@dataclass
class Theory:
    """Everything a sampler needs to know about a lattice theory.

    ``kind`` is ``"gauge"`` (complex links ``(batch, d, *L, N, N)``) or
    ``"scalar"`` (real ``(batch, *L)``).
    """

    name: str
    kind: str
    lattice: Lattice
    action: Any
    group: Group | None = None
    params: dict[str, Any] = field(default_factory=dict)
    #: what training differentiates, where it is not ``action`` (e.g. a stochastic estimate of a
    #: fermion determinant's gradient); samplers and evaluations always use ``action``
    train_action: Any = None

    @property
    def training_action(self):
        """The action the trainer's losses call: ``train_action`` if set, else ``action``."""
        return self.action if self.train_action is None else self.train_action

    @property
    def is_gauge(self) -> bool:
        return self.kind == "gauge"

    def field_shape(self, batch: int) -> tuple[int, ...]:
        if self.is_gauge:
            return self.lattice.link_shape(batch, self.group.N)
        return self.lattice.site_shape(batch)

    def field_dtype(self, precision: torch.dtype = torch.float64) -> torch.dtype:
        if self.is_gauge:
            return torch.complex64 if precision == torch.float32 else torch.complex128
        return precision

    def start(
        self, batch: int, how: str = "hot", generator=None, precision=torch.float64, device=None
    ) -> torch.Tensor:
        """Initial configurations: ``cold`` (identity links / zero field) or ``hot`` (Haar / Gaussian).

        The fields live on ``device``; without one, on the generator's device (a chain whose
        generator is on an accelerator starts there), and only without either on torch's
        default device.
        """
        dtype = self.field_dtype(precision)
        if device is None and generator is not None:
            device = generator.device
        if how == "cold":
            if self.is_gauge:
                return self.group.identity((batch, self.lattice.ndim, *self.lattice.shape), dtype=dtype, device=device)
            return torch.zeros(self.field_shape(batch), dtype=dtype, device=device)
        if how == "hot":
            if self.is_gauge:
                return self.group.random((batch, self.lattice.ndim, *self.lattice.shape), generator, dtype, device)
            return torch.randn(self.field_shape(batch), generator=generator, dtype=dtype, device=device)
        raise ValueError(f"hmc.start must be 'hot' or 'cold', got {how!r}")

    def force(self, fields: torch.Tensor, method: str = "analytic") -> torch.Tensor:
        """Minus the gradient of S: ``-dS/dphi`` for scalars; for links the algebra element
        ``F`` with ``dS/d eps = tr(X F)`` along ``U -> exp(eps X) U`` (see :meth:`GaugeAction.force`).
        """
        if method not in ("analytic", "autograd"):
            raise ValueError(f"hmc.force must be 'analytic' or 'autograd', got {method!r}")
        if self.is_gauge:
            if method == "autograd":
                return autograd_force(self.action, fields, self.group)
            return self.action.force(fields)
        if method == "autograd":
            with torch.enable_grad():
                x = fields.detach().requires_grad_(True)
                (g,) = torch.autograd.grad(self.action(x).sum(), x)
            return -g
        return -self.action.grad(fields)

    def measure(
        self, fields: torch.Tensor, flow_time: float = 0.0, flow_step: float | None = None
    ) -> dict[str, torch.Tensor]:
        """Per-configuration standard observables of this theory (see :mod:`gaugeflow.observables.measure`).

        ``flow_time``: Wilson-flow time of the 4d topological charge (the presets'
        ``theory.default_flow_time`` is what jobs pass); ``flow_step``: its step
        (default :data:`gaugeflow.observables.measure.FLOW_STEP`).
        """
        from gaugeflow.observables.measure import FLOW_STEP, measure_gauge, measure_scalar

        if self.is_gauge:
            return measure_gauge(fields, self.group, flow_time, FLOW_STEP if flow_step is None else flow_step)
        return measure_scalar(fields)

    def attributes(self) -> dict[str, Any]:
        """Action parameters for file attributes."""
        out = {"theory": self.name, "kind": self.kind, "shape": list(self.lattice.shape)}
        out["group"] = self.group.name if self.group is not None else "none"
        out.update(self.params)
        return out

    def differences(self, attrs: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
        """``(key, value in attrs, value of this theory)`` for every entry of :meth:`attributes`
        that ``attrs`` (e.g. an ensemble file's attributes) lacks or holds with another value.

        Keys are named as a user sets them: ``theory`` (the preset name), ``lattice.shape``,
        ``theory.<parameter>`` (group, kind, beta, action, c0, c1, m2, lam, kappa, lam_tilde,
        form, and any coupling a theory records). Numbers compare exactly: a file written by
        this theory holds the same float64 values.
        """
        out = []
        for key, mine in self.attributes().items():
            name = {"theory": "theory", "shape": "lattice.shape"}.get(key, f"theory.{key}")
            theirs = attrs.get(key, MISSING_ATTR)
            if not _same_value(theirs, mine):
                out.append((name, theirs, mine))
        return out


class _Missing:
    def __repr__(self) -> str:
        return "<missing>"


#: what :meth:`Theory.differences` reports for a parameter the attributes do not hold
MISSING_ATTR = _Missing()


def _same_value(a: Any, b: Any) -> bool:
    if a is MISSING_ATTR:
        return False
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        a, b = list(a) if isinstance(a, (list, tuple)) else [a], list(b) if isinstance(b, (list, tuple)) else [b]
        return len(a) == len(b) and all(_same_value(x, y) for x, y in zip(a, b))
    if isinstance(a, bytes):
        a = a.decode("utf-8")
    if isinstance(a, str) or isinstance(b, str):
        return str(a) == str(b)
    try:
        return float(a) == float(b)
    except (TypeError, ValueError):
        return a == b
