"""``gaugeflow sample``: draw from a trained flow and write an ensemble.

``sample.method=imh`` (default) runs the flow-based independence Metropolis chain of
Albergo, Kanwar & Shanahan (arXiv:1904.12072): the ensemble is the chain, exact for the
theory whatever the quality of the model. ``sample.method=reweight`` keeps the independent
draws for importance weighting with ``w = exp(log p - log q)``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pathlib
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

import hydra
import numpy as np
import torch
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from gaugeflow.cli.build import parallel_from_config, theory_from_config
from gaugeflow.cli.common import CONFIG_DIR, guarded, require, resolve_device, stop_on_sigterm
from gaugeflow.cli.progress import progress_bar
from gaugeflow.cli.restore import restore_config, restore_model, sha256_file, training_dtype
from gaugeflow.cli.schema import LatticeConf, ModelConf, TheoryConf
from gaugeflow.dist.init import DistConf
from gaugeflow.exact import reference_values
from gaugeflow.io.ensemble import EnsembleWriter
from gaugeflow.sampling.imh import IndependenceMetropolis, gather_chain
from gaugeflow.sampling.statistics import gamma_method
from gaugeflow.sampling.summary import summarize
from gaugeflow.sampling.weights import effective_sample_size, log_z_estimate

METHODS = ("imh", "reweight")


@dataclass
class SampleConf:
    method: str = "imh"  # imh | reweight
    n: int = 4096
    batch_size: int = 256
    progress: bool = True


@dataclass
class SampleJob:
    theory: TheoryConf = field(default_factory=TheoryConf)
    lattice: LatticeConf = field(default_factory=LatticeConf)
    model: ModelConf = field(default_factory=ModelConf)
    sample: SampleConf = field(default_factory=SampleConf)
    checkpoint: Optional[str] = None
    seed: int = 0
    device: str = "cpu"
    out: str = MISSING
    dist: DistConf = field(default_factory=DistConf)


def register() -> None:
    ConfigStore.instance().store(name="sample_schema", node=SampleJob)


register()


def _imh_seed(seed: int) -> int:
    # accept/reject draws come from their own stream: the proposals do not depend on sample.method
    return (seed * 0x9E3779B97F4A7C15 + 0x632BE5AB) % (2**63 - 1)


def run_sample(cfg: DictConfig) -> dict:
    """Run the job described by ``cfg``; returns the summary it wrote to summary.json."""
    s = cfg.sample
    require(bool(cfg.checkpoint), "checkpoint=<checkpoint file or run directory> is required")
    require(s.method in METHODS, f"sample.method must be imh or reweight, got {s.method!r}")
    require(s.n >= 1, f"sample.n must be >= 1, got {s.n}")
    require(s.batch_size >= 1, f"sample.batch_size must be >= 1, got {s.batch_size}")
    if cfg.dist.strategy == "none":
        resolve_device(cfg.device)  # a clear error for an absent cuda/xpu
    where = f"checkpoint={cfg.checkpoint}"
    cfg, ck = restore_config(cfg, cfg.checkpoint, "checkpoint", load=("model",))
    require(cfg.dist.strategy in ("none", "ddp"), f"sample: dist.strategy must be none or ddp, got {cfg.dist.strategy!r}")
    require(not cfg.dist.lattice_grid, "sample: dist.lattice_grid is not supported (whole configurations per rank)")
    par = parallel_from_config(cfg)
    try:
        summary = _sample(cfg, ck, where, par)
        par.barrier()  # no rank tears the process group down while a peer still talks to it
        return summary
    finally:
        par.ctx.shutdown()


def _sample(cfg: DictConfig, ck, where: str, par) -> dict:
    """Every rank draws its share of each batch from its own stream; rank 0 gathers the proposals
    (rank order), runs the chain and writes the file."""
    s = cfg.sample
    device = par.ctx.device
    theory = theory_from_config(cfg)
    model = restore_model(cfg, theory, ck, device, where)
    dtype = training_dtype(ck, where)
    field_dtype = theory.field_dtype(dtype)
    exact = reference_values(theory)

    gen = torch.Generator(device=device).manual_seed(par.seed(int(cfg.seed)))
    chain = IndependenceMetropolis(torch.Generator().manual_seed(_imh_seed(int(cfg.seed)))) \
        if s.method == "imh" else None
    attrs = theory.attributes()
    attrs.update(
        config=OmegaConf.to_yaml(cfg, resolve=True),
        seed=int(cfg.seed),
        sampler=str(s.method),
        checkpoint=str(ck.path.resolve()),
        checkpoint_sha256=sha256_file(ck.path),
        checkpoint_step=int(ck.step),
        model_dtype=str(dtype).removeprefix("torch."),
    )
    field_name = "links" if theory.is_gauge else "phi"
    n, bs = int(s.n), int(s.batch_size)
    log_w_parts: list[torch.Tensor] = []
    series: dict[str, list[np.ndarray]] = {}
    carried: dict[str, torch.Tensor] | None = None
    done, reason = 0, "completed"
    t0 = time.monotonic()
    show = bool(s.progress) and sys.stdout.isatty() and par.is_main
    running = _RunningESS()
    world = par.world if par.active else 1
    writer = EnsembleWriter(cfg.out, field_name, theory.field_shape(1)[1:], field_dtype, attrs) if par.is_main \
        else contextlib.nullcontext()
    with writer, stop_on_sigterm() as sigterm, progress_bar(show, math.ceil(n / bs), "sample") as bar, \
            torch.no_grad():
        while done < n:
            if par.any(sigterm()):
                reason = "SIGTERM"
                break
            mine = min(bs, -(-(n - done) // world))  # this rank's share of the step
            b = min(mine * world, n - done)
            x, log_q = model.sample(mine, gen)
            if par.active:  # the proposals of every rank, in rank order, trimmed to what is left
                x = par.gather_replicas(x)[:b]
                log_q = par.gather_replicas(log_q)[:b]
                if not par.is_main:
                    done += b
                    continue
            # weights and observables in float64 on the configurations as drawn
            x64 = x.to(theory.field_dtype(torch.float64))
            action = theory.action(x64).double()
            log_q = log_q.double()
            log_w = -action - log_q
            log_w_parts.append(log_w.cpu())
            cols = {"log_q": log_q, "log_p": -action, "action": action,
                    **{k: v.double() for k, v in theory.measure(x64).items()}}
            fields = x
            if chain is not None:
                accepted, current = chain.step(log_w)
                # the chain's states: rejected steps repeat the previous configuration with its
                # own log q and log p (the bookkeeping NeuMC got wrong)
                fields = gather_chain(current, done, x, None if carried is None else carried["fields"])
                cols = {k: gather_chain(current, done, v, None if carried is None else carried[k])
                        for k, v in cols.items()}
                carried = {"fields": fields[-1:], **{k: v[-1:] for k, v in cols.items()}}
                cols["accepted"] = accepted
                cols["proposal"] = current
            writer.append(fields, **cols)
            for k, v in cols.items():
                if k not in ("log_q", "log_p", "action", "proposal"):
                    series.setdefault(k, []).append(v.detach().cpu().double().numpy())
            done += b
            if show:
                running.add(log_w)
                bar.advance(f"ess={running.ess:.3f}" + ("" if chain is None else f" acc={chain.acceptance:.2f}"))
        seconds = time.monotonic() - t0
        if not par.is_main:
            return {}
        log_w = torch.cat(log_w_parts) if log_w_parts else torch.empty(0, dtype=torch.float64)
        summary, names = _summarise(series, log_w, chain is not None, exact)
        writer.set_attrs(n_proposals=done, stop_reason=reason, seconds=seconds, ess=summary["ess"],
                         acceptance=_nan(summary["acceptance"]), log_z=_nan(summary["log_z"]),
                         log_z_err=_nan(summary["log_z_err"]))
    summary.update(method=str(s.method), n=done, checkpoint=str(ck.path.resolve()), out=str(writer.path))
    write_summary(summary)
    _report(theory, s.method, summary, names, ck, seconds, reason, writer)
    return summary


class _RunningESS:
    """Kish ESS of all weights so far, updated per batch in log space (for the progress line)."""

    def __init__(self):
        self.lse1 = self.lse2 = torch.tensor(-math.inf, dtype=torch.float64)
        self.n = 0

    def add(self, log_w: torch.Tensor) -> None:
        lw = log_w.detach().double().cpu()
        self.lse1 = torch.logaddexp(self.lse1, torch.logsumexp(lw, 0))
        self.lse2 = torch.logaddexp(self.lse2, torch.logsumexp(2 * lw, 0))
        self.n += lw.numel()

    @property
    def ess(self) -> float:
        return math.exp(2 * self.lse1.item() - self.lse2.item()) / self.n if self.n else math.nan


def _nan(v) -> float:
    return math.nan if v is None else float(v)


def _summarise(series, log_w: torch.Tensor, is_chain: bool, exact: dict) -> tuple[dict, list[str]]:
    cat = {k: np.concatenate(v) for k, v in series.items()}
    n = log_w.numel()
    out: dict = {}
    accepted = cat.pop("accepted", None)
    obs = summarize(cat) if is_chain else summarize(cat, log_w=log_w.numpy())
    for k, est in obs.items():
        out[k] = {"mean": est.mean, "err": est.err, "tau_int": est.tau_int}
        if k in exact:
            out[k]["exact"] = exact[k]
    out["ess"] = effective_sample_size(log_w).item() if n else math.nan
    if accepted is not None and accepted.size:
        acc = gamma_method(accepted.astype(np.float64))
        out["acceptance"], out["acceptance_err"] = acc.mean, acc.err
    else:
        out["acceptance"], out["acceptance_err"] = None, None
    if n:
        out["log_z"], out["log_z_err"] = log_z_estimate(log_w)
        # <log q + S>_q >= -log Z: the reverse-KL bound the training minimised
        out["free_energy_bound"] = float((-log_w).mean())
    else:
        out["log_z"] = out["log_z_err"] = out["free_energy_bound"] = None
    if "log_z" in exact:
        out["log_z_exact"] = exact["log_z"]
    return out, list(obs)


def _json_safe(obj):
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def write_summary(summary: dict, name: str = "summary.json") -> pathlib.Path:
    """Write ``summary`` as strict JSON (NaN -> null) into the run directory, atomically."""
    from hydra.core.hydra_config import HydraConfig

    run_dir = pathlib.Path(HydraConfig.get().runtime.output_dir if HydraConfig.initialized() else ".")
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / name
    tmp = path.with_name(f".{name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(_json_safe(summary), indent=2, allow_nan=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _fmt(est: dict) -> str:
    return f"{est['mean']:.6g} +- {est['err']:.2g}   tau_int {est['tau_int']:.2f}"


def _report(theory, method, summary, names, ck, seconds, reason, writer) -> None:
    params = ", ".join(f"{k}={v}" for k, v in theory.params.items() if k not in ("c0",))
    what = "IMH steps" if method == "imh" else "independent draws (reweighted)"
    lines = [
        f"sample {theory.name} ({params}) shape={list(theory.lattice.shape)}: {summary['n']} {what} from "
        f"{ck.path} (step {ck.step}) in {seconds:.1f} s" + ("" if reason == "completed" else f" (stopped by {reason})"),
        f"  {'ESS (proposals)':<22} {summary['ess']:.4f}",
    ]
    if summary["acceptance"] is not None:
        lines.append(f"  {'acceptance':<22} {summary['acceptance']:.4f} +- {summary['acceptance_err']:.2g}")
    if summary["log_z"] is not None:
        line = f"  {'-log Z':<22} {-summary['log_z']:.6g} +- {summary['log_z_err']:.2g}"
        if "log_z_exact" in summary:
            line += f"   exact {-summary['log_z_exact']:.6g}"
        lines.append(line)
        lines.append(f"  {'F_q = <log q + S>_q':<22} {summary['free_energy_bound']:.6g}   (>= -log Z)")
    for name in names:
        line = f"  {name:<22} {_fmt(summary[name])}"
        if "exact" in summary[name]:
            line += f"   exact {summary[name]['exact']:.6g}"
        lines.append(line)
    lines.append(f"wrote {writer.n} configurations to {writer.path}")
    print("\n".join(lines))


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="sample")
def main(cfg: DictConfig) -> None:
    guarded(run_sample)(cfg)
