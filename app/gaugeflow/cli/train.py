"""``gaugeflow train``: fit a flow to a theory; HDF5 checkpoints, resumable, metrics in CSV."""

from __future__ import annotations

import csv
import math
import pathlib
import sys
import time

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from gaugeflow.cli.common import (
    CONFIG_DIR,
    UsageError,
    guarded,
    parse_duration,
    require,
    resolve_device,
    resolve_dtype,
    stop_on_sigterm,
)
from gaugeflow.cli.build import model_from_config, theory_from_config
from gaugeflow.cli.progress import progress_bar
from gaugeflow.cli.schema import register
from gaugeflow.io.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from gaugeflow.sampling.weights import effective_sample_size, log_z_estimate
from gaugeflow.train.loop import LOSSES

register()

METRICS = ["step", "loss", "free_energy", "ess", "var_log_w", "plaquette", "lr", "grad_norm",
           "seconds_per_step", "samples_per_second", "peak_memory_mb", "nonfinite_skipped"]


def _eval_seed(seed: int) -> int:
    # the end-of-run evaluation draws from its own stream so it cannot disturb training
    return (seed * 2654435761 + 97) % (2**63 - 1)


def run_train(cfg: DictConfig) -> dict:
    t = cfg.train
    require(t.steps >= 1, f"train.steps must be >= 1, got {t.steps}")
    require(t.batch_size >= 1, f"train.batch_size must be >= 1, got {t.batch_size}")
    require(t.lr > 0, f"train.lr must be > 0, got {t.lr}")
    require(t.loss in LOSSES, f"train.loss must be one of {sorted(LOSSES)}, got {t.loss!r}")
    require(t.schedule in ("cosine", "constant"), f"train.schedule must be cosine or constant, got {t.schedule!r}")
    require(t.stop_after is None or t.stop_after >= 1, f"train.stop_after must be >= 1, got {t.stop_after}")
    require(t.checkpoint_every >= 1, f"train.checkpoint_every must be >= 1, got {t.checkpoint_every}")
    require(t.keep >= 1, f"train.keep must be >= 1, got {t.keep}")
    require(t.grad_clip is None or t.grad_clip > 0, f"train.grad_clip must be > 0, got {t.grad_clip}")
    max_time = parse_duration(t.max_time, "train.max_time")
    dtype = resolve_dtype(t.dtype, "train.dtype")
    device = resolve_device(cfg.device)

    ck = None
    run_dir = pathlib.Path(HydraConfig.get().runtime.output_dir)
    if cfg.resume:
        try:
            ck = load_checkpoint(cfg.resume, "resume")
        except CheckpointError as err:
            raise UsageError(str(err)) from None
        if ck.theory != cfg.theory.name:
            raise UsageError(f"resume={cfg.resume}: checkpoint of theory {ck.theory!r}, not {cfg.theory.name!r}")
        run_dir = ck.path.parent.parent  # continue the same run
    # the initial weights come from torch's global generator: seed it for reproducible runs
    torch.manual_seed(int(cfg.seed))
    theory = theory_from_config(cfg)
    model = model_from_config(cfg, theory, dtype, device)
    opt = torch.optim.Adam(model.parameters(), lr=t.lr)
    sched = (torch.optim.lr_scheduler.CosineAnnealingLR(opt, t.steps) if t.schedule == "cosine"
             else torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0))
    gen = torch.Generator(device=device).manual_seed(int(cfg.seed))
    step = 0
    if ck is not None:
        try:
            model.load_state_dict(ck.model)
            opt.load_state_dict(ck.optim)
            sched.load_state_dict(ck.sched)
            gen.set_state(ck.rng["sampler"])
        except (RuntimeError, KeyError, ValueError) as err:
            raise UsageError(f"resume={ck.path}: does not fit this model ({str(err).splitlines()[0]})") from None
        step = ck.step

    config_yaml = OmegaConf.to_yaml(cfg, resolve=True)
    metrics_path = run_dir / "metrics.csv"
    new_file = not metrics_path.exists()
    loss_fn = LOSSES[t.loss]
    action = theory.action

    def checkpoint() -> pathlib.Path:
        return save_checkpoint(run_dir, step, model=model.state_dict(), optim=opt.state_dict(),
                               sched=sched.state_dict(), rng={"sampler": gen.get_state()},
                               theory=theory.name, config=config_yaml, keep=t.keep)

    reason, skipped, done_here = "completed", 0, 0
    t0 = time.monotonic()
    show = bool(t.progress) and sys.stdout.isatty()
    last = {}
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(metrics_path, "a", newline="") as fh, stop_on_sigterm() as sigterm, \
            progress_bar(show, t.steps - step, "train") as bar:
        writer = csv.DictWriter(fh, fieldnames=METRICS)
        if new_file:
            writer.writeheader()
        while step < t.steps:
            if sigterm():
                reason = "SIGTERM"
                break
            if max_time is not None and time.monotonic() - t0 > max_time:
                reason = "train.max_time"
                break
            if t.stop_after is not None and done_here >= t.stop_after:
                reason = "train.stop_after"
                break
            ts = time.monotonic()
            out = loss_fn(model, action, t.batch_size, gen)
            opt.zero_grad(set_to_none=True)
            norm = torch.tensor(math.nan)
            if torch.isfinite(out.loss):
                out.loss.backward()
                norm = torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip if t.grad_clip else math.inf)
            if torch.isfinite(norm):
                opt.step()
            else:
                # a non-finite loss or gradient: skip the update, keep the schedule on time
                skipped += 1
            sched.step()
            step += 1
            done_here += 1
            dt = time.monotonic() - ts
            if step % t.log_every == 0 or step == t.steps:
                log_w = (-out.action - out.log_q).double()
                row = dict(step=step, loss=out.loss.item(), free_energy=(out.log_q + out.action).mean().item(),
                           ess=effective_sample_size(log_w).item(), var_log_w=log_w.var().item(),
                           plaquette=_mean_plaquette(theory, out.samples),
                           lr=opt.param_groups[0]["lr"], grad_norm=float(norm), seconds_per_step=dt,
                           samples_per_second=t.batch_size / dt, peak_memory_mb=_peak_mb(device),
                           nonfinite_skipped=skipped)
                writer.writerow(row)
                fh.flush()
                last = row
                bar.advance(f"F={row['free_energy']:.4g} ess={row['ess']:.3f}")
            if step % t.checkpoint_every == 0:
                checkpoint()
        path = checkpoint()
    seconds = time.monotonic() - t0
    summary = dict(step=step, stop_reason=reason, seconds=seconds, checkpoint=str(path), **_evaluate(
        model, theory, t.eval_samples, t.batch_size, cfg.seed, device))
    _report(theory, summary, last)
    return summary


def _mean_plaquette(theory, samples) -> float:
    if not theory.is_gauge:
        return math.nan
    from gaugeflow.observables import mean_plaquette

    return mean_plaquette(samples).mean().item()


def _peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@torch.no_grad()
def _evaluate(model, theory, n, batch, seed, device) -> dict:
    if n <= 0:
        return {}
    gen = torch.Generator(device=device).manual_seed(_eval_seed(int(seed)))
    lw = []
    for i in range(0, n, batch):
        x, log_q = model.sample(min(batch, n - i), gen)
        lw.append(-theory.action(x).double() - log_q.double())
    lw = torch.cat(lw)
    log_z, err = log_z_estimate(lw)
    return dict(ess=effective_sample_size(lw).item(), log_z=log_z, log_z_err=err, eval_samples=n)


def _report(theory, summary, last) -> None:
    lines = [f"train {theory.name} shape={list(theory.lattice.shape)}: step {summary['step']} in "
             f"{summary['seconds']:.1f} s" + ("" if summary["stop_reason"] == "completed"
                                               else f" (stopped by {summary['stop_reason']})")]
    if "ess" in summary:
        lines.append(f"  ESS (independent draws, n={summary['eval_samples']})  {summary['ess']:.4f}")
        lines.append(f"  log Z estimate                      {summary['log_z']:.6g} +- {summary['log_z_err']:.2g}")
    if last:
        lines.append(f"  free-energy bound F_q (last batch)  {last['free_energy']:.6g}")
    lines.append(f"  checkpoint                          {summary['checkpoint']}")
    print("\n".join(lines))


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> None:
    guarded(run_train)(cfg)
