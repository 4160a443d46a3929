"""``gaugeflow analyze``: estimates with errors and plots for an ensemble file and/or a training run.

A Markov chain (HMC, a flow independence-Metropolis chain) is analysed with the Gamma
method, the chains of a file with a ``chain`` dataset as replicas, each cut by ``n_therm``, and
NaN rows (configurations on which a quantity was not measured) skipped; independent flow draws (``log_q`` and ``log_p`` but no ``accepted``) are
reweighted to the target with ``log w = log p - log q``. The run directory receives
``summary.json`` and ``plots/*.png``.

Reweighted draws also get the Kish ESS and the Pareto k-hat of their weights (PSIS, Vehtari et
al. 1507.02646), and a warning when the error bars understate the truth; an independence
Metropolis chain gets those its sampler recorded for its proposals. A topological charge gives
``<Q^2>`` and ``chi_t = <Q^2> / V`` as well.

Ensembles with dynamical fermions (``gaugeflow hmc theory=schwinger_2d``, ``qcd_4d_nf2``): the
chiral condensate is an observable like the others; the pion correlator (a dataset
``(n_cfg, T)``) is folded and gives the cosh effective mass per time slice
(:mod:`gaugeflow.sampling.correlators`), printed after the table, written to summary.json
(``pion_correlator``, ``pion_effective_mass``) and plotted (``plots/pion_correlator.png``); the
CG cost the sampler recorded (``cg_iterations``, ``solve_seconds``) is printed per trajectory.
A file without ``action`` (pseudofermion HMC without ``hmc.measure_logdet``) is analysed
without it, with a note.
"""

from __future__ import annotations

import csv
import json
import math
import os
import pathlib
import sys
from dataclasses import dataclass, field
from typing import Any, Optional

import hydra
import numpy as np
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from gaugeflow.cli.common import CONFIG_DIR, UsageError, guarded, require
from gaugeflow.cli.report import HIDDEN, Row, estimate_row, estimate_rows, ess_row, khat_row, log_z_row, table, warn
from gaugeflow.cli.schema import TheoryConf
from gaugeflow.exact import reference_values_from_attributes
from gaugeflow.io.ensemble import CHAIN, TRAJECTORY, EnsembleError, read_ensemble
from gaugeflow.sampling.correlators import as_lists, correlator_analysis
from gaugeflow.sampling.statistics import MIN_SAMPLES, Estimate, gamma_method, replicas
from gaugeflow.sampling.summary import TOPOLOGY, summarize, topology

#: per-configuration datasets that are not observables: the densities, the IMH proposal index,
#: and what is reported derived (acceptance, <exp(-dH)>)
NOT_OBSERVABLES = ("log_q", "log_p", "accepted", "delta_h", "proposal", CHAIN, TRAJECTORY)
#: estimates kept out of the printed tables of `hmc` and `analyze` (extensive, or the sampler's
#: cost, printed on a line of its own); they are in summary.json and the files
HIDDEN_ROWS = (*HIDDEN, "gauge_action", "pseudofermion_action", "fermion_logdet", "cg_iterations", "solve_seconds")
#: per-configuration time-slice correlators (datasets ``(n_cfg, T)``) and their names in summaries
CORRELATORS = {"pion_correlator": "pion"}
#: action parameters shown in the report, in this order, where the file has them
PARAMS = ("beta", "action", "c1", "form", "m2", "lam", "kappa", "lam_tilde", "csw", "fermions")
#: sampler attributes of independent flow draws (`gaugeflow sample sample.method=reweight`);
#: every other sampler is a Markov chain
REWEIGHT_SAMPLERS = ("reweight", "flow_reweight")


@dataclass
class AnalyzeJob:
    ensemble: Optional[str] = None
    run: Optional[str] = None
    # `theory=<preset>` is a group override in Hydra (conf/theory exists), so the preset is
    # composed here; only its name is compared with the ensemble's `theory` attribute
    theory: Optional[TheoryConf] = None
    model: Optional[TheoryConf] = None  # the flow a theory preset names (composed with it, unused here)
    n_therm: int = 0
    s_tau: float = 2.0
    plots: bool = True


def register() -> None:
    ConfigStore.instance().store(name="analyze_schema", node=AnalyzeJob)


register()


@dataclass
class EnsembleAnalysis:
    path: pathlib.Path
    attrs: dict[str, Any]
    n_cfg: int
    n_therm: int  # configurations dropped at the start of each chain
    method: str  # gamma_method | reweighted
    #: per observable, the values analysed (chain after chain, NaN rows dropped for a chain)
    series: dict[str, np.ndarray]
    estimates: dict[str, Estimate]
    log_w: np.ndarray | None = None
    reweighting: dict[str, Any] = field(default_factory=dict)
    exact: dict[str, float] = field(default_factory=dict)
    #: an IMH chain: ESS and k-hat of its proposals' weights, as the sampler recorded them
    proposals: dict[str, Any] = field(default_factory=dict)
    #: independent chains of the file (its ``chain`` dataset; 1 without one), analysed as replicas
    chains: int = 1
    #: configurations analysed (all chains, after n_therm)
    n_used: int = 0
    #: a chain: per observable, one series per chain (the Gamma method's replicas)
    replicas: dict[str, list[np.ndarray]] = field(default_factory=dict)
    #: per correlator dataset: {"correlator": [Estimate per t], "effective_mass": [Estimate per t]}
    correlators: dict[str, dict[str, list[Estimate]]] = field(default_factory=dict)
    #: what the reader could not do and why (one line each, printed as notes)
    notes: list[str] = field(default_factory=list)


@dataclass
class TrainingRun:
    path: pathlib.Path  # metrics.csv
    columns: dict[str, np.ndarray]
    n_rows: int  # distinct steps

    def last(self) -> dict[str, float]:
        return {k: (int(v[-1]) if k == "step" else float(v[-1])) for k, v in self.columns.items()}


def run_analyze(cfg: DictConfig, out_dir: str | os.PathLike | None = None) -> dict:
    """Analyse ``cfg.ensemble`` and/or ``cfg.run`` into ``out_dir`` (default: the Hydra run dir).

    Returns ``{"summary": <summary.json content>, "summary_path": str, "plots": [str, ...]}``.
    """
    require(bool(cfg.ensemble) or bool(cfg.run),
            "nothing to analyze: give ensemble=<file> and/or run=<training run dir>")
    require(cfg.n_therm >= 0, f"n_therm must be >= 0, got {cfg.n_therm}")
    require(math.isfinite(cfg.s_tau) and cfg.s_tau >= 0, f"s_tau must be >= 0, got {cfg.s_tau}")
    if out_dir is None:
        from hydra.core.hydra_config import HydraConfig

        out_dir = HydraConfig.get().runtime.output_dir
    out = pathlib.Path(out_dir)
    want_theory = cfg.theory.name if cfg.get("theory") is not None else None

    # every input is read and checked before anything is written
    ens = _analyze_ensemble(cfg.ensemble, want_theory, int(cfg.n_therm), float(cfg.s_tau)) if cfg.ensemble else None
    training = read_metrics(cfg.run) if cfg.run else None
    summary = _summary(ens, training, float(cfg.s_tau))

    written: list[pathlib.Path] = []
    try:
        if cfg.plots:
            if ens is not None:
                _plot_ensemble(ens, out / "plots", float(cfg.s_tau), written)
            if training is not None:
                plot_training(training, out / "plots", written)
        summary_path = write_json(out / "summary.json", summary)
    except BaseException:
        # a half-finished set of plots would pass for a complete analysis
        for p in written:
            p.unlink(missing_ok=True)
        raise
    _report(ens, training, summary_path, written, float(cfg.s_tau))
    return {"summary": summary, "summary_path": str(summary_path), "plots": [str(p) for p in written]}


# ---------------------------------------------------------------------------- ensemble


def _analyze_ensemble(path: str, want_theory: str | None, n_therm: int, s_tau: float) -> EnsembleAnalysis:
    ens = read_ensemble(path, load_fields=False)
    if want_theory is not None and ens.theory != want_theory:
        raise UsageError(f"ensemble={path}: ensemble of theory {ens.theory!r}, not {want_theory!r}")
    if ens.n_cfg == 0:
        raise EnsembleError(f"{ens.path}: ensemble holds no configurations")
    n_cfg, n_chains, shortest = ens.n_cfg, ens.n_chains, min(ens.chain_lengths())
    if n_chains == 1:
        require(n_therm < n_cfg, f"n_therm={n_therm} leaves none of the {n_cfg} configurations of {path}")
    else:
        require(n_therm < shortest, f"n_therm={n_therm} (per chain) leaves none of the {shortest} configurations "
                                    f"of the shortest of the {n_chains} chains of {path}")
    ens = ens.drop_therm(n_therm)  # the first n_therm configurations of each chain
    cols = {k: v for k, v in ens.columns.items() if v.dtype.kind in "biuf" and v.ndim == 1}
    notes = []
    if "action" not in cols and "gauge_action" in cols:
        notes.append(f"{ens.path} has no 'action' (pseudofermion HMC without its log-determinant; "
                     "hmc.measure_logdet=true records it): the action is not analysed")
    sampler = str(ens.attrs.get("sampler", ""))
    has_weights = "log_q" in cols and "log_p" in cols
    chain = "accepted" in cols or sampler not in ("", *REWEIGHT_SAMPLERS)
    if not chain and not has_weights:
        if sampler in REWEIGHT_SAMPLERS:
            raise EnsembleError(f"{ens.path}: sampler {sampler!r} but no 'log_q' and 'log_p' datasets")
        chain = True  # nothing to reweight with; the Gamma method is right for independent draws too

    series: dict[str, np.ndarray] = {}
    if "accepted" in cols:
        series["acceptance"] = cols["accepted"].astype(np.float64)
    if "delta_h" in cols:
        # <exp(-dH)> = 1 is the HMC check that `gaugeflow hmc` prints too
        series["exp_minus_delta_h"] = np.exp(-cols["delta_h"].astype(np.float64))
    for k, v in cols.items():
        if k not in NOT_OBSERVABLES:
            series[k] = v.astype(np.float64)

    log_w = None
    reweighting: dict[str, float] = {}
    if not chain:
        import torch

        from gaugeflow.sampling.weights import log_z_estimate, weight_diagnostics

        log_w = cols["log_p"].astype(np.float64) - cols["log_q"].astype(np.float64)
        bad = np.isnan(log_w) | (log_w == np.inf)
        if bad.any():
            raise EnsembleError(f"{ens.path}: {int(bad.sum())} log weights log_p - log_q are NaN or +inf")
        log_z, log_z_err = log_z_estimate(torch.from_numpy(log_w))
        diag = weight_diagnostics(log_w)
        reweighting = {"ess": diag["ess"], "n_eff": diag["n_eff"], "khat": diag["khat"], "log_z": log_z,
                       "log_z_err": log_z_err, "warning": diag["warning"]}
    reps: dict[str, list[np.ndarray]] = {}
    if chain:
        # the chains as replicas, NaN rows (not measured there) skipped: the Gamma method runs on
        # each chain's measured subsequence, so tau_int is in units of measured configurations
        reps = {k: replicas(v, ens.chain) for k, v in series.items()}
        series = {k: np.concatenate(r) for k, r in reps.items()}
        estimates = summarize(reps, None, s_tau)
        if "topological_charge" in reps:
            q2 = gamma_method([np.square(r) for r in reps["topological_charge"]], s_tau)
            vol = _volume(ens.attrs)
            estimates[TOPOLOGY[0]] = q2
            estimates[TOPOLOGY[1]] = Estimate(q2.mean / vol, q2.err / vol, q2.tau_int, q2.tau_int_err, q2.replicas)
    else:
        estimates = summarize(series, log_w, s_tau)
        if "topological_charge" in series:
            estimates.update(topology(series["topological_charge"], _volume(ens.attrs), log_w, s_tau))
    correlators = {}
    for key in CORRELATORS:
        c = ens.columns.get(key)
        if c is None or c.ndim != 2:
            continue
        if not chain:
            notes.append(f"{key}: reweighted correlators are not analysed")
            continue
        correlators[key] = correlator_analysis(_row_replicas(c, ens.chain), s_tau)
    return EnsembleAnalysis(ens.path, ens.attrs, n_cfg, n_therm, "gamma_method" if chain else "reweighted",
                            series, estimates, log_w, reweighting, reference_values_from_attributes(ens.attrs),
                            _proposals(ens.attrs) if chain else {}, n_chains, ens.n_cfg, reps, correlators, notes)


def _row_replicas(values: np.ndarray, chain: np.ndarray | None) -> list[np.ndarray]:
    """Per chain, the rows ``(n_c, T)`` of a 2-d per-configuration dataset, rows with a NaN (not
    measured there) dropped."""
    x = np.asarray(values, dtype=np.float64)
    parts = [x] if chain is None else [x[chain == c] for c in np.unique(chain)]
    parts = [p[~np.isnan(p).any(axis=1)] for p in parts]
    return [p for p in parts if len(p)]


def correlator_rows(correlators: dict[str, dict[str, list[Estimate]]]) -> list[Row]:
    """Rows of the effective masses, in time order (``gaugeflow hmc`` and ``analyze`` print the same)."""
    rows = []
    for key, res in correlators.items():
        name = CORRELATORS.get(key, key)
        for t, est in enumerate(res["effective_mass"]):
            row = estimate_row(f"{name} m_eff(t={t})", est)
            rows.append(Row(row.label, row.text + ("   (cosh form, folded correlator)" if t == 0 else "")))
    return rows


def correlator_summary(correlators: dict[str, dict[str, list[Estimate]]]) -> dict[str, Any]:
    """summary.json entries: ``<key>`` (the folded correlator) and ``<name>_effective_mass``, each
    ``{"t": [...], "mean": [...], "err": [...], "tau_int": [...]}``."""
    out = {}
    for key, res in correlators.items():
        out[key] = {**as_lists(res["correlator"]), "folded": True}
        out[f"{CORRELATORS.get(key, key)}_effective_mass"] = {**as_lists(res["effective_mass"]), "form": "cosh"}
    return out


def solver_row(cg_iterations, solve_seconds, seconds: float | None = None) -> Row:
    """``CG per trajectory   <iterations> iterations, <s> s solving (of <t> s)``."""
    text = f"{float(np.mean(cg_iterations)):.1f} iterations, {float(np.mean(solve_seconds)):.3g} s solving"
    if seconds is not None:
        text += f" (of {seconds:.3g} s)"
    return Row("CG per trajectory", text)


def _volume(attrs: dict[str, Any]) -> int:
    """Global number of lattice sites, from the ``shape`` attribute."""
    return math.prod(int(s) for s in np.atleast_1d(attrs.get("shape", [])))


def _proposals(attrs: dict[str, Any]) -> dict[str, Any]:
    """ESS and Pareto k-hat of the proposals of a flow chain (IMH or a plug-in chain), where its
    sampler recorded them.

    The chain is exact whatever the flow, but a heavy tail of the proposals' weights (k-hat > 0.7)
    makes it stick for long stretches on rare states, and its Gamma-method errors understate the
    truth for the same reason a reweighted estimate's do."""
    if str(attrs.get("sampler", "")) in REWEIGHT_SAMPLERS or "ess" not in attrs or "n_proposals" not in attrs:
        return {}
    from gaugeflow.sampling.weights import weights_warning

    ess = float(attrs["ess"])
    n = int(attrs.get("n_proposals", attrs.get("n_cfg", 0)))
    khat = float(attrs.get("khat", math.nan))
    n_eff = ess * n if math.isfinite(ess) else 0.0
    return {"ess": ess, "n_eff": n_eff, "khat": khat, "n_proposals": n, "warning": weights_warning(khat, n_eff)}


def _autocorrelation(x: np.ndarray | list[np.ndarray], s_tau: float):
    """rho(t), its error, the Gamma-method window and tau_int of a series or of the replicas of
    several chains (their averaged autocorrelation function); None when undefined."""
    reps = list(x) if isinstance(x, list) else [x]
    flat = np.concatenate(reps)
    if min(r.size for r in reps) < MIN_SAMPLES or not np.all(np.isfinite(flat)) or np.ptp(flat) == 0.0:
        return None
    import pyerrors as pe

    obs = pe.Obs(reps, ["mc"] if len(reps) == 1 else [f"mc|r{c}" for c in range(len(reps))])
    obs.gamma_method(S=s_tau)
    return obs.e_rho["mc"], obs.e_drho["mc"], int(obs.e_windowsize["mc"]), float(obs.e_tauint["mc"])


# ---------------------------------------------------------------------------- training run


def read_metrics(run: str | os.PathLike) -> TrainingRun:
    """Columns of a training run's metrics.csv (a run directory or the file itself).

    Unknown columns are kept, missing ones are simply absent, empty or unparsable cells are
    NaN. A line cut short (the job was killed while writing it) is dropped. A resumed run
    repeats the steps after its last checkpoint; the later rows win.
    """
    p = pathlib.Path(run)
    if not p.exists():
        raise UsageError(f"run={run}: no such training run directory")
    path = p / "metrics.csv" if p.is_dir() else p
    if not path.is_file():
        raise UsageError(f"run={run}: no metrics.csv (not a gaugeflow train run directory)")
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            names = [n for n in (reader.fieldnames or []) if n]
            raw = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise UsageError(f"run={run}: unreadable metrics.csv ({str(err).splitlines()[0]})") from None
    if "step" not in names:
        raise UsageError(f"{path}: not a training metrics file (no 'step' column)")
    by_step: dict[float, dict[str, float]] = {}
    for row in raw:
        if any(row.get(n) is None for n in names):
            continue  # fewer cells than the header: cut short
        values = {n: _number(row[n]) for n in names}
        if math.isfinite(values["step"]):
            by_step[values["step"]] = values
    if not by_step:
        raise UsageError(f"{path}: no metrics rows yet")
    steps = sorted(by_step)
    columns = {n: np.array([by_step[s][n] for s in steps], dtype=np.float64) for n in names}
    return TrainingRun(path, columns, len(steps))


def _number(text) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        return math.nan


# ---------------------------------------------------------------------------- output


def _summary(ens: EnsembleAnalysis | None, training: TrainingRun | None, s_tau: float) -> dict:
    from gaugeflow import __version__

    out: dict[str, Any] = {}
    meta: dict[str, Any] = {"gaugeflow_version": __version__, "s_tau": s_tau}
    if ens is not None:
        for name, est in ens.estimates.items():
            out[name] = {"mean": est.mean, "err": est.err, "tau_int": est.tau_int}
        out.update(correlator_summary(ens.correlators))
        meta.update(ensemble=str(ens.path.resolve()), theory=str(ens.attrs.get("theory")),
                    shape=[int(s) for s in np.atleast_1d(ens.attrs.get("shape", []))],
                    sampler=str(ens.attrs.get("sampler", "")), method=ens.method, n_cfg=ens.n_cfg,
                    n_therm=ens.n_therm, n_used=ens.n_used, chains=ens.chains)
        if ens.reweighting:
            out["_reweighting"] = dict(ens.reweighting)
        if ens.proposals:
            out["_proposals"] = dict(ens.proposals)
        if ens.exact:
            out["_exact"] = dict(ens.exact)
    if training is not None:
        meta.update(run=str(training.path.resolve()), n_rows=training.n_rows)
        out["_training"] = training.last()
    out["_meta"] = meta
    return _finite_or_none(out)


def _finite_or_none(obj):
    # JSON has no NaN: an undefined number (tau_int of a too-short series) becomes null
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite_or_none(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_json(path: pathlib.Path, data: dict) -> pathlib.Path:
    """Write ``data`` as JSON atomically (temporary name in the same directory, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=2, allow_nan=False)
            fh.write("\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _plot_ensemble(ens: EnsembleAnalysis, plot_dir: pathlib.Path, s_tau: float, written: list) -> None:
    from gaugeflow import plots

    weights = None
    if ens.log_w is not None:
        weights = np.exp(ens.log_w - ens.log_w.max())
        written.append(plots.histogram(ens.log_w, plot_dir / "log_w_histogram.png", "log w = log p - log q"))
    for name, x in ens.series.items():
        if x.size == 0:
            continue  # never measured
        est = ens.estimates[name]
        written.append(plots.history(x, plot_dir / f"{name}_history.png", name, est.mean, est.err,
                                     offset=ens.n_therm, exact=ens.exact.get(name)))
        written.append(plots.histogram(x, plot_dir / f"{name}_histogram.png", name, weights,
                                       exact=ens.exact.get(name)))
        # of the draws themselves: for a chain its autocorrelation, for independent draws a check
        acf = _autocorrelation(ens.replicas.get(name, x), s_tau)
        if acf is not None:
            rho, drho, window, tau = acf
            written.append(plots.autocorrelation(rho, plot_dir / f"{name}_autocorrelation.png", name, drho,
                                                 window, tau))
    for key, res in ens.correlators.items():
        if not res["correlator"]:
            continue
        c, m = as_lists(res["correlator"]), as_lists(res["effective_mass"])
        written.append(plots.correlator(c["mean"], c["err"], m["mean"], m["err"], plot_dir / f"{key}.png",
                                        CORRELATORS.get(key, key)))


def plot_training(training: TrainingRun, plot_dir: pathlib.Path, written: list) -> None:
    """Loss / free-energy bound, ESS and lr against step (the train job also sends these to wandb)."""
    from gaugeflow import plots

    cols = training.columns

    def present(*names):
        return {n: cols[n] for n in names if n in cols and np.isfinite(cols[n]).any()}

    step = cols["step"]
    if loss := present("loss", "free_energy"):
        written.append(plots.curves(step, loss, plot_dir / "training_loss.png", "loss and free-energy bound F_q"))
    if ess := present("ess"):
        written.append(plots.curves(step, ess, plot_dir / "training_ess.png", "ESS (batch)", "ESS / n"))
    if lr := present("lr"):
        written.append(plots.curves(step, lr, plot_dir / "training_lr.png", "learning rate", "lr", logy=True))


def _report(ens, training, summary_path, written, s_tau) -> None:
    lines, warnings = [], []
    if ens is not None:
        a = ens.attrs
        params = ", ".join(f"{k}={a[k]}" for k in PARAMS if k in a)
        method = f"Gamma method (S={s_tau:g})" if ens.method == "gamma_method" else "reweighted independent draws"
        used = (f"{ens.n_used} configurations after n_therm={ens.n_therm}" if ens.chains == 1 else
                f"{ens.n_used} configurations of {ens.chains} chains after n_therm={ens.n_therm} per chain")
        if ens.chains > 1 and ens.method == "gamma_method":
            method += ", chains as replicas"
        lines.append(f"analyze {ens.path}: {a.get('theory')} ({params}) shape={_shape(a)}, {used}, {method}")
        # the rows the job that wrote the file printed: same names, same exact values, same column width
        flow_time = a.get("flow_time")
        rows = estimate_rows(ens.estimates, ens.exact, ndim=len(_shape(a)),
                             flow_time=None if flow_time is None else float(flow_time), hide=HIDDEN_ROWS)
        rows += correlator_rows(ens.correlators)
        if "cg_iterations" in ens.series and ens.series["cg_iterations"].size:
            rows.append(solver_row(ens.series["cg_iterations"], ens.series["solve_seconds"]))
        if ens.reweighting:
            r = ens.reweighting
            rows += [ess_row(r["ess"], r["n_eff"], ens.log_w.size), khat_row(r["khat"]),
                     log_z_row(r["log_z"], r["log_z_err"], ens.exact.get("log_z"))]
            warnings.append(r["warning"])
        if ens.proposals:
            p = ens.proposals
            rows += [ess_row(p["ess"], p["n_eff"], p["n_proposals"]), khat_row(p["khat"])]
            warnings.append(p["warning"])
        lines += table(rows)
    if training is not None:
        last = training.last()
        shown = ", ".join(f"{k} {last[k]:.6g}" for k in ("loss", "free_energy", "ess", "lr") if k in last)
        lines.append(f"training {training.path}: {training.n_rows} rows, last step {last['step']}: {shown}")
    lines.append(f"wrote {summary_path}" + (f" and {len(written)} plots in {summary_path.parent / 'plots'}"
                                             if written else ""))
    print("\n".join(lines))
    sys.stdout.flush()
    for message in warnings:
        warn(message, "analyze")
    for message in ([] if ens is None else ens.notes):
        print(f"note: analyze: {message}", file=sys.stderr)


def _shape(attrs) -> list[int]:
    return [int(s) for s in np.atleast_1d(attrs.get("shape", []))]


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="analyze")
def main(cfg: DictConfig) -> None:
    guarded(run_analyze)(cfg)
