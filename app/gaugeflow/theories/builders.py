"""Theory builders ``(shape, **keys) -> Theory``, named by the ``_target_`` of ``conf/theory/<preset>.yaml``.

The preset's other keys (``name``, ``dim``, ``default_*``, ``hmc``) are read by the jobs, not
passed here; the job sets ``Theory.name`` to the preset's ``name``. Errors are ``ValueError``
naming the key as a user sets it (``theory.beta``).
"""

from __future__ import annotations

import math

from gaugeflow.groups import get_group
from gaugeflow.lattice import Lattice, validate_shape
from gaugeflow.theories.gauge import GaugeAction
from gaugeflow.theories.phi4 import Phi4Action, Phi4HoppingAction
from gaugeflow.theories.theory import Theory


def _finite(params: dict) -> None:
    for k, v in params.items():
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError(f"theory.{k} must be finite, got {v}")


def _number(value, key: str) -> float:
    if value is None:
        raise ValueError(f"theory.{key} must be set")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"theory.{key} must be a number, got {value!r}") from None


def gauge_theory(shape, group: str, beta: float, action: str = "wilson", c1: float | None = None) -> Theory:
    """Pure gauge theory of ``group`` (u1, su2, su3) with the Wilson action or a rectangle-improved
    one (``action=symanzik|iwasaki|dbw2`` or an explicit ``c1``), ``S = -(beta/N) sum c_i Re tr W_i``."""
    lattice = Lattice(validate_shape(shape))
    if lattice.ndim < 2:
        raise ValueError(f"lattice.shape={list(lattice.shape)}: a gauge theory needs d >= 2")
    g = get_group(group)
    beta = _number(beta, "beta")
    act = GaugeAction.named(g, beta, action, None if c1 is None else _number(c1, "c1"))
    params = {"beta": beta, "action": str(action), "c0": act.c0, "c1": act.c1}
    _finite(params)
    return Theory("gauge", "gauge", lattice, act, g, params)


def phi4_theory(shape, m2: float | None = None, lam: float | None = None, form: str = "standard",
                kappa: float | None = None, lam_tilde: float | None = None) -> Theory:
    """Real scalar phi^4 in the standard form ``(m2, lam)`` or the hopping form ``(kappa,
    lam_tilde)`` of Albergo et al. 1904.12072 (``form=hopping``)."""
    lattice = Lattice(validate_shape(shape))
    if form == "standard":
        if kappa is not None or lam_tilde is not None:
            raise ValueError("theory.kappa and theory.lam_tilde belong to theory.form=hopping")
        act = Phi4Action(_number(m2, "m2"), _number(lam, "lam"))
        params = {"form": form, "m2": act.m2, "lam": act.lam}
    elif form == "hopping":
        if m2 is not None or lam is not None:
            raise ValueError("theory.m2 and theory.lam belong to theory.form=standard")
        act = Phi4HoppingAction(_number(kappa, "kappa"), _number(lam_tilde, "lam_tilde"))
        params = {"form": form, "kappa": act.kappa, "lam_tilde": act.lam_tilde}
    else:
        raise ValueError(f"theory.form must be 'standard' or 'hopping', got {form!r}")
    _finite(params)
    return Theory("phi4", "scalar", lattice, act, None, params)


#: the builders a checkpoint written before ``_target_`` names by ``theory.kind``
LEGACY_KINDS = {"gauge": "gaugeflow.theories.gauge_theory", "phi4": "gaugeflow.theories.phi4_theory"}
