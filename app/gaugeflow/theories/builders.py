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


def wilson_nf2_theory(shape, group: str, beta: float, kappa: float, fermions: str = "exact",
                      csw: float | None = None, boundary: str = "antiperiodic", nf: int = 2, action: str = "wilson",
                      c1: float | None = None, even_odd: bool = False, hasenbusch=None,
                      mixed_precision: bool = False, logdet: str = "dense", logdet_noise: int = 1) -> Theory:
    """Gauge theory with Nf = 2 degenerate Wilson(-clover) fermions (:mod:`gaugeflow.theories.fermionic`):
    the Schwinger model (U(1), 2d) and 2-flavour QCD (SU(3), 4d). ``fermions``: ``exact`` (dense
    determinant, small lattices) or ``pseudofermion``; ``csw``: clover coefficient (4d only);
    ``boundary``: the fermions' time (last axis) boundary, ``antiperiodic`` or ``periodic``.

    Pseudofermion variants (:mod:`gaugeflow.fermions.monomials`; ``fermions=pseudofermion`` only):
    ``even_odd`` (pseudofermions on the even sites, even extents), ``hasenbusch`` (mass
    preconditioning kappas ``kappa_1 < ... < kappa_n < kappa``, one pseudofermion per factor) and
    ``mixed_precision`` (complex64 inner CG, float64 residuals). They change the algorithm, not the
    distribution of the links, and are not recorded in ``Theory.params``.

    ``logdet``: how training takes ``log det(D^dagger D)`` for marginal flows: ``dense`` (the exact
    value and its autograd gradient) or ``stochastic`` (its gradient from ``logdet_noise`` Gaussian
    vectors and one CG solve each, :class:`~gaugeflow.theories.fermionic.StochasticMarginalAction`);
    a training choice, not part of the target either."""
    from gaugeflow.fermions import BOUNDARIES, MAX_DENSE_UNKNOWNS, WilsonFermions
    from gaugeflow.fermions.monomials import check_hasenbusch
    from gaugeflow.theories.fermionic import (
        FERMIONS,
        LOGDET,
        Nf2ExactAction,
        PseudofermionAction,
        StochasticMarginalAction,
        dense_unknowns,
    )

    theory = gauge_theory(shape, group, beta, action, c1)
    d = theory.lattice.ndim
    kappa = _number(kappa, "kappa")
    if not (math.isfinite(kappa) and kappa > 0):
        raise ValueError(f"theory.kappa must be a positive finite number, got {kappa}")
    csw = 0.0 if csw is None else _number(csw, "csw")
    if csw != 0.0 and d != 4:
        raise ValueError(f"theory.csw={csw}: the clover term is for 4d theories (this one is {d}d)")
    if not math.isfinite(csw):
        raise ValueError(f"theory.csw must be finite, got {csw}")
    if int(nf) != 2:
        raise ValueError(f"theory.nf={nf}: only Nf = 2 (det D^dagger D) is implemented; other Nf need RHMC")
    if fermions not in FERMIONS:
        raise ValueError(f"theory.fermions must be one of {list(FERMIONS)}, got {fermions!r}")
    if boundary not in BOUNDARIES:
        raise ValueError(f"theory.boundary must be one of {list(BOUNDARIES)}, got {boundary!r}")
    if d not in (2, 4):
        raise ValueError(f"lattice.shape={list(theory.lattice.shape)}: Wilson fermions are built for d = 2 and 4")
    for key, flag in (("even_odd", even_odd), ("mixed_precision", mixed_precision)):
        if not isinstance(flag, bool):
            raise ValueError(f"theory.{key} must be true or false, got {flag!r}")  # noqa: TRY004 (a config value)
    hasenbusch = check_hasenbusch(kappa, [] if hasenbusch is None else hasenbusch, "theory.hasenbusch")
    if fermions != "pseudofermion":
        given = [k for k, v in (("even_odd", even_odd), ("hasenbusch", hasenbusch),
                                ("mixed_precision", mixed_precision)) if v]
        if given:
            raise ValueError(f"theory.{given[0]} is a pseudofermion option: it needs theory.fermions=pseudofermion "
                             f"(this is theory.fermions={fermions})")
    if even_odd:
        odd = [(mu, n) for mu, n in enumerate(theory.lattice.global_shape) if n % 2]
        if odd:
            raise ValueError(f"theory.even_odd=true needs even extents: lattice.shape={list(theory.lattice.global_shape)} "
                             f"has the odd extent {odd[0][1]} in direction {odd[0][0]}")
    wf = WilsonFermions(kappa, csw, boundary)
    if fermions == "exact":
        n = dense_unknowns(theory.lattice.global_shape, theory.group.N)
        if n > MAX_DENSE_UNKNOWNS:
            raise ValueError(f"lattice.shape={list(theory.lattice.global_shape)}: theory.fermions=exact needs a dense "
                             f"{n}x{n} Dirac matrix per configuration, above {MAX_DENSE_UNKNOWNS}; use "
                             "theory.fermions=pseudofermion")
        act = Nf2ExactAction(theory.action, wf)
    else:
        act = PseudofermionAction(theory.action, wf, even_odd=even_odd, hasenbusch=hasenbusch,
                                  mixed_precision=mixed_precision)
    if logdet not in LOGDET:
        raise ValueError(f"theory.logdet must be one of {list(LOGDET)}, got {logdet!r}")
    if isinstance(logdet_noise, bool) or not isinstance(logdet_noise, int) or logdet_noise < 1:
        raise ValueError(f"theory.logdet_noise must be an integer >= 1, got {logdet_noise!r}")
    theory.action = act
    if logdet == "stochastic":
        theory.train_action = StochasticMarginalAction(act, logdet_noise)
    theory.params.update(kappa=kappa, nf=int(nf), fermions=str(fermions), csw=csw, boundary=str(boundary))
    return theory


#: the builders a checkpoint written before ``_target_`` names by ``theory.kind``
LEGACY_KINDS = {"gauge": "gaugeflow.theories.gauge_theory", "phi4": "gaugeflow.theories.phi4_theory"}
