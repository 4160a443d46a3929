"""A theory = action + lattice + field space; built from the ``theory`` config group."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from gaugeflow.groups import Group, get_group
from gaugeflow.lattice import Lattice, validate_shape
from gaugeflow.theories.gauge import GaugeAction, autograd_force
from gaugeflow.theories.phi4 import Phi4Action, Phi4HoppingAction


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


def build_theory(cfg: Mapping[str, Any], shape) -> Theory:
    """Theory from a ``theory`` config node and a lattice shape.

    Raises ``ValueError`` naming the key for inconsistent input (e.g. a shape whose
    length does not match ``theory.dim``).
    """
    shape = validate_shape(shape)
    dim = cfg.get("dim")
    if dim is not None and len(shape) != int(dim):
        raise ValueError(
            f"lattice.shape={list(shape)} has {len(shape)} extents but theory {cfg.get('name')!r} is "
            f"{dim}-dimensional"
        )
    lattice = Lattice(shape)
    kind = cfg.get("kind")
    name = str(cfg.get("name", kind))
    if kind == "gauge":
        if lattice.ndim < 2:
            raise ValueError(f"lattice.shape={list(shape)}: a gauge theory needs d >= 2")
        group = get_group(cfg["group"])
        beta = float(cfg["beta"])
        if not math.isfinite(beta):
            raise ValueError(f"theory.beta must be finite, got {beta}")
        action = GaugeAction.named(group, beta, cfg.get("action", "wilson"), cfg.get("c1"))
        params = {"beta": beta, "action": str(cfg.get("action", "wilson")), "c0": action.c0, "c1": action.c1}
        return Theory(name, "gauge", lattice, action, group, params)
    if kind == "phi4":
        form = cfg.get("form", "standard")
        if form == "standard":
            action = Phi4Action(cfg["m2"], cfg["lam"])
            params = {"form": form, "m2": action.m2, "lam": action.lam}
        elif form == "hopping":
            action = Phi4HoppingAction(cfg["kappa"], cfg["lam_tilde"])
            params = {"form": form, "kappa": action.kappa, "lam_tilde": action.lam_tilde}
        else:
            raise ValueError(f"theory.form must be 'standard' or 'hopping', got {form!r}")
        for k, v in params.items():
            if isinstance(v, float) and not math.isfinite(v):
                raise ValueError(f"theory.{k} must be finite, got {v}")
        return Theory(name, "scalar", lattice, action, None, params)
    raise ValueError(f"theory.kind must be 'gauge' or 'phi4', got {kind!r}")
