"""``gaugeflow score``: a trained flow's log q (and log p = -S) on every configuration of an ensemble.

With an ensemble distributed as p (an HMC or IMH chain), ``E_p[log p~ - log q] = KL(p||q) + log Z``:
the forward KL divergence, the one that needs samples of p (Albergo, Kanwar & Shanahan,
arXiv:1904.12072, train with the reverse one, which does not). With the exact log Z of a 2d
theory this gives the forward KL itself; like the reverse KL it vanishes only for q = p. An
ensemble of independent flow draws (``gaugeflow sample sample.method=reweight``) is reweighted
to p with its own stored weights.

The model runs in ``score.dtype`` (float64 by default, whatever the training dtype). Beside the
estimate go the ESS and the Pareto k-hat of the weights: of the stored weights for independent
flow draws, else the forward ESS ``1 / (<w>_p <1/w>_p)`` of ``w = p~/q`` over the ensemble as
samples of p, which sees the regions of p the flow misses.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import sys
from dataclasses import dataclass, field
from typing import List, Optional

import h5py
import hydra
import numpy as np
import torch
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from gaugeflow.cli.build import theory_from_config
from gaugeflow.cli.common import CONFIG_DIR, UsageError, guarded, require, resolve_device, resolve_dtype
from gaugeflow.cli.progress import progress_bar
from gaugeflow.cli.restore import restore_config, restore_model, sha256_file, training_dtype
from gaugeflow.cli.report import Row, estimate_text, ess_row, khat_row, table, warn
from gaugeflow.cli.sample import target_line, target_record, write_summary
from gaugeflow.cli.schema import LatticeConf, ModelConf, TheoryConf
from gaugeflow.exact import reference_values
from gaugeflow.fermions.fields import JointField
from gaugeflow.flows.joint import JointModel
from gaugeflow.io.ensemble import EnsembleError, read_ensemble
from gaugeflow.io.provenance import provenance
from gaugeflow.sampling.hmc import marginal_action
from gaugeflow.sampling.statistics import gamma_method, replicas
from gaugeflow.sampling.summary import reweighted
from gaugeflow.sampling.weights import KHAT_MAX, MIN_EFFECTIVE, forward_effective_sample_size, pareto_khat, \
    weight_diagnostics


@dataclass
class ScoreConf:
    batch_size: int = 256
    dtype: str = "float64"  # the model's precision (float32: the training precision of a default run)
    progress: bool = True


@dataclass
class ScoreJob:
    theory: TheoryConf = None
    lattice: LatticeConf = field(default_factory=LatticeConf)
    model: ModelConf = None
    score: ScoreConf = field(default_factory=ScoreConf)
    checkpoint: Optional[str] = None
    allow_targets: List[str] = field(default_factory=list)  # _target_ prefixes beyond gaugeflow. and torch.
    ensemble: Optional[str] = None
    device: str = "cpu"
    out: str = MISSING


def register() -> None:
    ConfigStore.instance().store(name="score_schema", node=ScoreJob)


register()


def run_score(cfg: DictConfig) -> dict:
    """Run the job described by ``cfg``; returns the summary it wrote to summary.json."""
    require(bool(cfg.checkpoint), "checkpoint=<checkpoint file or run directory> is required")
    require(bool(cfg.ensemble), "ensemble=<ensemble file> is required")
    require(cfg.score.batch_size >= 1, f"score.batch_size must be >= 1, got {cfg.score.batch_size}")
    dtype = resolve_dtype(str(cfg.score.dtype), "score.dtype")
    device = resolve_device(cfg.device)
    where = f"checkpoint={cfg.checkpoint}"
    cfg, ck = restore_config(cfg, cfg.checkpoint, "checkpoint", load=("model",))
    theory = theory_from_config(cfg)
    ens = read_ensemble(cfg.ensemble, load_fields=False)
    _check_ensemble(ens, theory, f"ensemble={cfg.ensemble}", where)
    model = restore_model(cfg, theory, ck, device, where, dtype=dtype)
    trained = training_dtype(ck, where)

    n, bs = ens.n_cfg, int(cfg.score.batch_size)
    log_q = np.empty(n, dtype=np.float64)
    log_p = np.empty(n, dtype=np.float64)
    show = bool(cfg.score.progress) and sys.stdout.isatty()
    joint = isinstance(model, JointModel)
    with h5py.File(ens.path, "r") as f, progress_bar(show, math.ceil(n / bs), "score") as bar, torch.no_grad():
        ds = f[ens.field_name]
        # a joint model scores (links, pseudofermion) pairs where the file keeps them, else the links
        # with its gauge flow against the links' marginal
        pf = f["pseudofermion"] if joint and "pseudofermion" in f else None
        for i in range(0, n, bs):
            x = torch.from_numpy(np.asarray(ds[i:i + bs])).to(device)
            x64 = x.to(theory.field_dtype(torch.float64))
            # the action in float64 whatever the file holds; log q in score.dtype
            if pf is not None:
                phi = torch.from_numpy(np.asarray(pf[i:i + bs])).to(device)
                log_p[i:i + bs] = (-theory.action.joint_action(JointField(x64, phi.to(x64.dtype)))).double().cpu().numpy()
                fields = JointField(x.to(theory.field_dtype(dtype)), phi.to(theory.field_dtype(dtype)))
                log_q[i:i + bs] = model.log_prob(fields).double().cpu().numpy()
            else:
                # (a theory with pseudofermions: the links' marginal S_G - log det(D^dagger D), dense)
                log_p[i:i + bs] = (-marginal_action(theory, x64)).double().cpu().numpy()
                flow = model.gauge if joint else model
                log_q[i:i + bs] = flow.log_prob(x.to(theory.field_dtype(dtype))).double().cpu().numpy()
            bar.advance()

    diff = log_p - log_q
    stored_w = _stored_weights(ens)
    # a file of several chains (`chain` dataset): the chains are the Gamma method's replicas
    est = gamma_method(replicas(diff, ens.chain, skip_nan=False)) if stored_w is None else reweighted(diff, stored_w)
    exact = reference_values(theory)
    summary = {"log_p_minus_log_q": {"mean": est.mean, "err": est.err, "tau_int": est.tau_int},
               "n": n, "weighted": stored_w is not None, "model_dtype": str(dtype).removeprefix("torch.")}
    summary.update(_weights(diff, stored_w))
    ck_sha = sha256_file(ck.path)
    summary["target_changes"] = target_record(cfg, ck)
    # a joint model's stored log q is the joint density: comparable only where the pairs were scored
    summary["log_q_vs_ensemble"] = _log_q_check(ens, log_q, ck_sha) if not joint or "pseudofermion" in ens.columns \
        else None
    if "log_z" in exact:
        summary["log_z_exact"] = exact["log_z"]
        summary["forward_kl"] = {"mean": est.mean - exact["log_z"], "err": est.err}
    attrs = theory.attributes()
    attrs.update(
        config=OmegaConf.to_yaml(cfg, resolve=True),
        target_changes=json.dumps(summary["target_changes"]),
        ensemble=str(ens.path.resolve()),
        ensemble_sha256=sha256_file(ens.path),
        checkpoint=str(ck.path.resolve()),
        checkpoint_sha256=ck_sha,
        checkpoint_step=int(ck.step),
        model_dtype=str(dtype).removeprefix("torch."),
        training_dtype=str(trained).removeprefix("torch."),
        n_cfg=n,
        log_p_minus_log_q=est.mean,
        log_p_minus_log_q_err=est.err,
        ess=float(summary["ess"]),
        ess_kind=summary["ess_kind"],
        khat=float(summary["khat"]),
    )
    out = _write_scores(cfg.out, log_q, log_p, attrs)
    summary.update(ensemble=str(ens.path.resolve()), checkpoint=str(ck.path.resolve()), out=str(out))
    write_summary(summary)
    _report(theory, summary, ens, ck, out)
    return summary


def _weights(diff: np.ndarray, stored_w: np.ndarray | None) -> dict:
    """ESS, Pareto k-hat and warning of the weights that go with this ensemble.

    Independent flow draws: their stored weights, with which the estimate is reweighted. An
    ensemble distributed as p (a chain): the forward ESS ``1 / (<w>_p <1/w>_p)`` of ``w = p~/q``, and
    the k-hat of ``w`` over these samples of p: a heavy tail (k-hat > 0.7) means the flow misses
    regions of p, so that its own draws (IMH, reweighting) would carry error bars that understate
    the truth; k-hat assumes independent draws, so for a correlated chain it is indicative.
    """
    if stored_w is not None:
        d = weight_diagnostics(stored_w)
        return {"ess": d["ess"], "ess_kind": "stored weights", "n_eff": d["n_eff"], "khat": d["khat"],
                "weights_warning": d["warning"]}
    ess = forward_effective_sample_size(diff)
    n_eff = ess * diff.size if math.isfinite(ess) else 0.0
    khat = pareto_khat(diff)
    reasons = []
    if khat > KHAT_MAX:
        reasons.append(f"Pareto k-hat of p/q over the ensemble {khat:.2f} > {KHAT_MAX:g}")
    if n_eff < MIN_EFFECTIVE:
        reasons.append(f"N x forward ESS = {n_eff:.1f} < {MIN_EFFECTIVE:g}")
    warning = None
    if reasons:
        warning = (f"the flow misses part of p ({'; '.join(reasons)}; PSIS, Vehtari et al. 1507.02646): "
                   "its IMH chains and reweighted estimates would have error bars that understate the truth")
    return {"ess": ess, "ess_kind": "forward", "n_eff": n_eff, "khat": khat, "weights_warning": warning}


def _log_q_check(ens, log_q: np.ndarray, ck_sha: str) -> dict | None:
    """For an ensemble this checkpoint sampled: how far the ensemble's stored ``log_q`` (from the
    sampler) is from the inverse pass here — the precision of the sampler's log q (float32 sampling
    scored in float64), or a flow whose inverse is not the map its log-det describes."""
    if "log_q" not in ens.columns or str(ens.attrs.get("checkpoint_sha256", "")) != ck_sha:
        return None
    stored = np.asarray(ens.columns["log_q"], dtype=np.float64)
    d = np.abs(stored - log_q)
    return {"max_abs": float(d.max()), "rms": float(np.sqrt(np.mean(d**2))),
            "ensemble_model_dtype": str(ens.attrs.get("model_dtype", ""))}


def _check_ensemble(ens, theory, where: str, ck_where: str) -> None:
    """The ensemble must be of the checkpoint's theory, lattice and action parameters."""
    if ens.theory != theory.name:
        raise UsageError(f"{where}: ensemble of theory {ens.theory!r}, not {theory.name!r} of {ck_where}")
    shape = [int(s) for s in np.atleast_1d(ens.attrs["shape"])]
    if shape != list(theory.lattice.shape):
        raise UsageError(f"{where}: lattice shape {shape}, not {list(theory.lattice.shape)} of {ck_where}")
    want = "links" if theory.is_gauge else "phi"
    if ens.field_name != want:
        raise UsageError(f"{where}: holds '{ens.field_name}', the theory of {ck_where} needs '{want}'")
    if ens.n_cfg == 0:
        raise UsageError(f"{where}: ensemble holds no configurations")
    # log p = -S must be the ensemble's own density, or E_p[log p - log q] means nothing
    group = theory.attributes()["group"]
    for k, ours in {"group": group, **theory.params}.items():
        if k not in ens.attrs:
            continue
        theirs = ens.attrs[k]
        if isinstance(ours, (int, float)) and not isinstance(ours, bool):
            try:
                same = math.isclose(float(theirs), float(ours), rel_tol=1e-9, abs_tol=1e-12)
            except (TypeError, ValueError):
                same = False
        else:
            same = str(theirs) == str(ours)
        if not same:
            raise UsageError(f"{where}: {k}={theirs} in the ensemble but {ours} in the theory of {ck_where} "
                             f"(override theory.{k} to score against it)")


def _stored_weights(ens) -> np.ndarray | None:
    """Importance weights of an ensemble of independent flow draws (sampler=reweight), else None."""
    if str(ens.attrs.get("sampler", "")) != "reweight":
        return None
    if "log_p" not in ens.columns or "log_q" not in ens.columns:
        raise EnsembleError(f"{ens.path}: a reweight ensemble needs the datasets 'log_p' and 'log_q'")
    return np.asarray(ens.columns["log_p"], dtype=np.float64) - np.asarray(ens.columns["log_q"], dtype=np.float64)


def _write_scores(path, log_q: np.ndarray, log_p: np.ndarray, attrs: dict) -> pathlib.Path:
    """``log_q`` and ``log_p`` datasets with provenance attributes, written under a temporary name."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with h5py.File(tmp, "w") as f:
            for k, v in {**provenance(), **attrs}.items():
                f.attrs[k] = np.asarray(v, dtype=np.int64) if isinstance(v, list) else v
            f.create_dataset("log_q", data=log_q)
            f.create_dataset("log_p", data=log_p)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _report(theory, summary, ens, ck, out) -> None:
    est = summary["log_p_minus_log_q"]
    weighted = summary["weighted"]
    lines = [
        f"score {theory.name} shape={list(theory.lattice.shape)}: {summary['n']} configurations of {ens.path} "
        f"under {ck.path} (step {ck.step}), model in {summary['model_dtype']}",
        *([target_line(summary["target_changes"])] if summary["target_changes"] else []),
    ]
    how = "reweighted with the ensemble's weights   " if weighted else ""
    rows = [
        Row("E_p[log p~ - log q]", estimate_text(est["mean"], est["err"], None if weighted else est["tau_int"],
                                                 note=how + "(= KL(p||q) + log Z)")),
        ess_row(summary["ess"], summary["n_eff"], summary["n"],
                "stored weights" if summary["ess_kind"] == "stored weights" else "forward"),
        khat_row(summary["khat"]),
    ]
    if "log_z_exact" in summary:
        kl = summary["forward_kl"]
        rows.append(Row("log Z", f"exact {summary['log_z_exact']:.6g}"))
        rows.append(Row("forward KL(p||q)", estimate_text(kl["mean"], kl["err"])))
    check = summary.get("log_q_vs_ensemble")
    if check is not None:
        rows.append(Row("|log q - sampled|", f"max {check['max_abs']:.3g}   rms {check['rms']:.3g}   "
                                             f"(the ensemble's log_q, sampled in {check['ensemble_model_dtype'] or '?'})"))
    lines += table(rows)
    lines.append(f"wrote log_q and log_p of {summary['n']} configurations to {out}")
    print("\n".join(lines))
    sys.stdout.flush()
    warn(summary["weights_warning"], "score")


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="score")
def main(cfg: DictConfig) -> None:
    guarded(run_score)(cfg)
