"""PNG figures of Monte Carlo histories and training curves.

Each function takes plain arrays and an output path and writes the file atomically
(a temporary name in the same directory, then ``os.replace``), so a killed job never
leaves a truncated image under the final name. matplotlib is imported on first use
with the Agg backend: batch nodes have no display and the other jobs need no plotting.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Mapping, Sequence

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | os.PathLike) -> pathlib.Path:
    plt = _pyplot()
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return path


def history(values, path, name: str, mean: float | None = None, err: float | None = None,
            offset: int = 0, exact: float | None = None) -> pathlib.Path:
    """The series against Monte Carlo time, with the estimate and its error as a band."""
    plt = _pyplot()
    y = np.asarray(values, dtype=np.float64).reshape(-1)
    t = np.arange(offset, offset + y.size)
    fig, ax = plt.subplots(figsize=(7, 3.2))
    ax.plot(t, y, lw=0.7, color="C0")
    if mean is not None and np.isfinite(mean):
        ax.axhline(mean, color="C3", lw=1.0, label=f"{mean:.6g}" + (f" ± {err:.2g}" if err is not None
                                                                     and np.isfinite(err) else ""))
        if err is not None and np.isfinite(err) and err > 0:
            ax.axhspan(mean - err, mean + err, color="C3", alpha=0.2)
    if exact is not None:
        ax.axhline(exact, color="k", ls="--", lw=1.0, label=f"exact {exact:.6g}")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best", fontsize=8)
    ax.set_xlabel("Monte Carlo time (configuration)")
    ax.set_ylabel(name)
    ax.set_title(f"{name}: history")
    return _save(fig, path)


def histogram(values, path, name: str, weights=None, exact: float | None = None) -> pathlib.Path:
    """Distribution of the series; with importance ``weights`` both the draws and the reweighted one."""
    plt = _pyplot()
    y = np.asarray(values, dtype=np.float64).reshape(-1)
    y_ok = np.isfinite(y)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    # an integer-valued observable (acceptance, geometric charge) gets one bin per integer
    finite = y[y_ok]
    if finite.size and np.array_equal(finite, np.round(finite)) and np.ptp(finite) <= 60:
        bins = np.arange(finite.min(), finite.max() + 2) - 0.5
    else:
        # numpy's rule on the draws, shared by the weighted histogram (which cannot choose its own);
        # capped since a long tail can ask for thousands of bins
        bins = np.histogram_bin_edges(finite, bins="auto") if finite.size else 10
        if np.size(bins) > 201:
            bins = 100
    if weights is None:
        ax.hist(y[y_ok], bins=bins, density=True, color="C0", alpha=0.8)
    else:
        w = np.asarray(weights, dtype=np.float64).reshape(-1)[y_ok]
        ax.hist(y[y_ok], bins=bins, density=True, color="C0", alpha=0.5, label="draws (q)")
        ax.hist(y[y_ok], bins=bins, density=True, weights=w, histtype="step", color="C3", lw=1.5,
                label="reweighted (p)")
    if exact is not None:
        ax.axvline(exact, color="k", ls="--", lw=1.0, label=f"exact mean {exact:.6g}")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best", fontsize=8)
    ax.set_xlabel(name)
    ax.set_ylabel("density")
    ax.set_title(f"{name}: histogram")
    return _save(fig, path)


def autocorrelation(rho, path, name: str, drho=None, window: int | None = None,
                    tau_int: float | None = None) -> pathlib.Path:
    """Normalised autocorrelation function rho(t) with the Gamma-method window W and tau_int."""
    plt = _pyplot()
    r = np.asarray(rho, dtype=np.float64).reshape(-1)
    # show the decay and a little beyond the window, not the noise of the whole history
    n_show = min(r.size, max(20, 3 * (window or 0) + 1))
    t = np.arange(n_show)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    if drho is not None:
        ax.errorbar(t, r[:n_show], yerr=np.asarray(drho, dtype=np.float64)[:n_show], fmt="o", ms=3, lw=0.8,
                    color="C0", label=r"$\rho(t)$")
    else:
        ax.plot(t, r[:n_show], "o", ms=3, color="C0", label=r"$\rho(t)$")
    ax.axhline(0.0, color="k", lw=0.6)
    if window is not None:
        label = f"window W = {window}" + (f", tau_int = {tau_int:.3g}" if tau_int is not None
                                          and np.isfinite(tau_int) else "")
        ax.axvline(window, color="C3", ls="--", lw=1.0, label=label)
    ax.legend(loc="best", fontsize=8)
    ax.set_xlabel("t (configurations)")
    ax.set_ylabel(r"$\rho(t)$")
    ax.set_title(f"{name}: autocorrelation")
    return _save(fig, path)


def curves(step, series: Mapping[str, Sequence[float]], path, title: str, ylabel: str | None = None,
           logy: bool = False) -> pathlib.Path:
    """One or more training metrics against the optimizer step (non-finite points left out)."""
    plt = _pyplot()
    x = np.asarray(step, dtype=np.float64).reshape(-1)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for i, (label, values) in enumerate(series.items()):
        y = np.asarray(values, dtype=np.float64).reshape(-1)
        ok = np.isfinite(x) & np.isfinite(y) & ((y > 0) if logy else True)
        # dashes keep a curve visible where another lies on top of it (loss = free energy for reverse KL)
        ax.plot(x[ok], y[ok], lw=1.0, color=f"C{i}", ls=("-", "--", ":", "-.")[i % 4], label=label,
                marker="." if ok.sum() < 50 else None)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    if ylabel:
        ax.set_ylabel(ylabel)
    if len(series) > 1:
        ax.legend(loc="best", fontsize=8)
    ax.set_title(title)
    return _save(fig, path)


def correlator(corr_mean, corr_err, meff_mean, meff_err, path, name: str = "pion") -> pathlib.Path:
    """A time-slice correlator (log scale, with errors) and its effective mass, side by side.

    ``corr_*``: the (folded) correlator at t = 0, 1, ...; ``meff_*``: the effective mass at
    t = 0, 1, ... (NaN points, where it is undefined, left out)."""
    plt = _pyplot()
    c, dc = np.asarray(corr_mean, dtype=np.float64), np.asarray(corr_err, dtype=np.float64)
    m, dm = np.asarray(meff_mean, dtype=np.float64), np.asarray(meff_err, dtype=np.float64)
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(9, 3.5))
    t = np.arange(c.size)
    ok = np.isfinite(c) & (c > 0)
    ax0.errorbar(t[ok], c[ok], yerr=np.where(np.isfinite(dc), dc, 0.0)[ok], fmt="o", ms=4, lw=0.8, color="C0")
    if ok.any():
        ax0.set_yscale("log")
    ax0.set_xlabel("t")
    ax0.set_ylabel("C(t)")
    ax0.set_title(f"{name} correlator (folded)")
    tm = np.arange(m.size)
    ok = np.isfinite(m)
    ax1.errorbar(tm[ok], m[ok], yerr=np.where(np.isfinite(dm), dm, 0.0)[ok], fmt="o", ms=4, lw=0.8, color="C3")
    ax1.set_xlabel("t")
    ax1.set_ylabel(r"$m_{\rm eff}(t)$")
    ax1.set_title(f"{name} effective mass (cosh form)")
    from matplotlib.ticker import MaxNLocator

    for ax in (ax0, ax1):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if tm.size:
        ax1.set_xlim(-0.5, tm.size - 0.5)
    return _save(fig, path)
