"""The one formatter of the end-of-job tables of ``gaugeflow hmc``, ``sample``, ``score`` and ``analyze``.

A table is a list of :class:`Row` (a label and the text beside it); :func:`table` turns it into
the printed lines, every label left-aligned in one column of :data:`MIN_WIDTH` characters or
the longest label's width. Rows of estimates come from :func:`estimate_rows` (or
:func:`estimate_row` for one): the same name, label, number format, exact value and note in
every job, so ``gaugeflow hmc`` or ``gaugeflow sample`` and ``gaugeflow analyze`` of the file
it wrote print the same row for the same quantity::

      plaquette                  0.74963 +- 0.038   tau_int 2.05   exact 0.699252
      <exp(-dH)>                 1.05065 +- 0.052   tau_int 0.86   (must be 1 within errors)

The helpers :func:`ess_row`, :func:`khat_row` and :func:`log_z_row` give the rows about
importance weights in the same way.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

#: narrowest label column (wider where a label is longer)
MIN_WIDTH = 22
#: how an estimate's name is shown where it is not the name itself
LABELS = {"accepted": "acceptance", "exp_minus_delta_h": "<exp(-dH)>"}
#: estimates kept out of the tables (extensive and rarely of interest; they are in the files)
HIDDEN = ("action",)
#: estimates that lead a table, in this order; the others follow by name (``topological_charge``,
#: ``topological_charge_squared``, ``topological_susceptibility`` stay together), the order in which
#: ``gaugeflow analyze`` reads them from a file
LEADING = ("accepted", "acceptance", "exp_minus_delta_h")
#: what the k-hat row says beside the value
KHAT_NOTE = "(> 0.7: weights unreliable)"


class Row(NamedTuple):
    label: str
    text: str


def label(name: str) -> str:
    """The label of estimate ``name`` (``accepted`` -> ``acceptance``, ``exp_minus_delta_h`` -> ``<exp(-dH)>``)."""
    return LABELS.get(name, name)


def _get(est: Any, key: str) -> float:
    v = est.get(key, math.nan) if isinstance(est, Mapping) else getattr(est, key, math.nan)
    return math.nan if v is None else float(v)


def estimate_text(mean: float, err: float, tau_int: float | None = None, exact: float | None = None,
                  note: str | None = None) -> str:
    """``mean +- err   tau_int t   exact x   (note)``; the parts that are None are left out."""
    text = f"{_nan(mean):.6g} +- {_nan(err):.2g}"
    if tau_int is not None:
        text += f"   tau_int {_nan(tau_int):.2f}"
    if exact is not None:
        text += f"   exact {float(exact):.6g}"
    if note:
        text += f"   {note}"
    return text


def _nan(v) -> float:
    return math.nan if v is None else float(v)


def susceptibility_note(ndim: int | None, flow_time: float | None = None) -> str:
    """What the topological susceptibility row says it is: ``<Q^2>/V`` and, in 4d, the charge's flow time."""
    if ndim == 4:
        where = "clover charge" if flow_time is None or (isinstance(flow_time, float) and math.isnan(flow_time)) \
            else f"clover charge at flow time t={float(flow_time):g}"
        return f"(= <Q^2>/V, {where})"
    return "(= <Q^2>/V)"


def note(name: str, ndim: int | None = None, flow_time: float | None = None) -> str | None:
    """The note printed after estimate ``name``, or None."""
    if name == "exp_minus_delta_h":
        return "(must be 1 within errors)"
    if name == "topological_susceptibility":
        return susceptibility_note(ndim, flow_time)
    return None


def estimate_row(name: str, est: Any, exact: Mapping[str, float] | None = None, *, ndim: int | None = None,
                 flow_time: float | None = None) -> Row:
    """The row of estimate ``name``: ``est`` has ``mean``, ``err``, ``tau_int`` (a mapping or an
    :class:`~gaugeflow.sampling.statistics.Estimate`); ``exact[name]``, where there is one, goes beside it."""
    ref = None if exact is None else exact.get(name)
    return Row(label(name), estimate_text(_get(est, "mean"), _get(est, "err"), _get(est, "tau_int"), ref,
                                          note(name, ndim, flow_time)))


def estimate_rows(estimates: Mapping[str, Any], exact: Mapping[str, float] | None = None, *,
                  ndim: int | None = None, flow_time: float | None = None, hide: Iterable[str] = HIDDEN) -> list[Row]:
    """A row per estimate, except those named in ``hide``: those of :data:`LEADING` first, then the
    others by name (the same order in every job, whatever order they were measured in). ``exact``: exact values by
    estimate name (:func:`gaugeflow.exact.reference_values` and ``..._from_attributes``); ``ndim``
    and ``flow_time`` (the lattice's dimension and the charge's flow time) go into the note of
    the topological susceptibility."""
    hide = set(hide)
    names = sorted((n for n in estimates if n not in hide),
                   key=lambda n: (LEADING.index(n) if n in LEADING else len(LEADING), n))
    return [estimate_row(name, estimates[name], exact, ndim=ndim, flow_time=flow_time) for name in names]


def ess_row(ess: float, n_eff: float, n: int, what: str = "proposals") -> Row:
    """``ESS (what)   ess   (n_eff effective of n)``: Kish ESS per draw and the effective number of draws."""
    return Row(f"ESS ({what})", f"{_nan(ess):.4f}   ({_nan(n_eff):.1f} effective of {n})")


def khat_row(khat) -> Row:
    """``Pareto k-hat   k   (> 0.7: weights unreliable)``."""
    return Row("Pareto k-hat", f"{format_khat(khat)}   {KHAT_NOTE}")


def log_z_row(log_z: float, err: float, exact: float | None = None) -> Row:
    """``log Z   estimate +- err   exact x``: log Z with respect to the normalised Haar measure."""
    return Row("log Z", estimate_text(log_z, err, None, exact))


def table(rows: Iterable[Row], width: int | None = None) -> list[str]:
    """The printed lines of ``rows``: two spaces, the label padded to ``width`` (default: the
    longest label, at least :data:`MIN_WIDTH`), a space, the text."""
    rows = [Row(*r) for r in rows]
    if width is None:
        width = max([MIN_WIDTH, *(len(r.label) for r in rows)])
    return [f"  {r.label:<{width}} {r.text}" for r in rows]


def format_khat(khat) -> str:
    """k-hat for a report line: its value, or what an infinite or undefined one means."""
    if khat is None or (isinstance(khat, float) and math.isnan(khat)):
        return "n/a (too few draws)"
    if khat == -math.inf:
        return "-inf (no tail: the largest weights are equal)"
    return f"{khat:.3f}"


def warn(message: str | None, where: str) -> None:
    """One line on stderr (nothing for None)."""
    if message:
        print(f"warning: {where}: {message}", file=sys.stderr)
