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
from gaugeflow.monitor import build_logger
from gaugeflow.cli.schema import register
from gaugeflow.io.checkpoint import (
    CheckpointError,
    checkpoint_path,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from gaugeflow.sampling.weights import effective_sample_size, log_z_estimate
from gaugeflow.train.losses import LossOutput

register()

METRICS = ["step", "loss", "free_energy", "ess", "var_log_w", "plaquette", "lr", "grad_norm",
           "seconds_per_step", "samples_per_second", "peak_memory_mb", "nonfinite_skipped"]


def _eval_seed(seed: int) -> int:
    # the end-of-run evaluation draws from its own stream so it cannot disturb training
    return (seed * 2654435761 + 97) % (2**63 - 1)


def instantiate_node(node, key: str, **kwargs):
    """Build the object a config group describes (``_target_`` + keys; null keys and ``name`` dropped).

    Errors name the group key and keep only the underlying message.
    """
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    spec = {k: v for k, v in OmegaConf.to_container(node, resolve=True).items() if v is not None and k != "name"}
    try:
        return instantiate(spec, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        msg = str(cause).splitlines()[0] if cause is not None and str(cause) else str(err).splitlines()[0]
        if isinstance(cause, ImportError):
            msg = f"{key}._target_={spec.get('_target_')!r} cannot be imported"
        elif isinstance(cause, TypeError):
            msg = f"{key}={node.get('name', spec.get('_target_'))}: {msg}"
        raise UsageError(msg) from None


def _check(cfg: DictConfig) -> None:
    t = cfg.train
    require(t.steps >= 1, f"train.steps must be >= 1, got {t.steps}")
    require(t.batch_size >= 1, f"train.batch_size must be >= 1, got {t.batch_size}")
    mb = t.micro_batch_size
    require(mb is None or (mb >= 1 and t.batch_size % mb == 0),
            f"train.micro_batch_size must divide train.batch_size={t.batch_size}, got {mb}")
    require(t.lr > 0, f"train.lr must be > 0, got {t.lr}")
    require(t.stop_after is None or t.stop_after >= 1, f"train.stop_after must be >= 1, got {t.stop_after}")
    require(t.checkpoint_every >= 1, f"train.checkpoint_every must be >= 1, got {t.checkpoint_every}")
    require(t.log_every >= 1, f"train.log_every must be >= 1, got {t.log_every}")
    require(t.keep >= 1, f"train.keep must be >= 1, got {t.keep}")
    require(t.max_nonfinite >= 1, f"train.max_nonfinite must be >= 1, got {t.max_nonfinite}")
    require(t.grad_clip is None or t.grad_clip > 0, f"train.grad_clip must be > 0, got {t.grad_clip}")


class Diverged(RuntimeError):
    """Too many consecutive non-finite steps: the run stops, its last good checkpoint intact."""


def run_train(cfg: DictConfig) -> dict:
    _check(cfg)
    t = cfg.train
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
    loss_fn = instantiate_node(cfg.loss, "loss")
    try:
        loss_fn.bind(theory, device, dtype)
    except ValueError as err:
        raise UsageError(str(err).splitlines()[0]) from None
    opt = instantiate_node(cfg.optim, "optim", params=model.parameters(), lr=t.lr)
    sched = instantiate_node(cfg.sched, "sched", optimizer=opt, total_steps=t.steps)
    gen = torch.Generator(device=device).manual_seed(int(cfg.seed))
    step = 0
    if ck is not None:
        try:
            model.load_state_dict(ck.model)
            opt.load_state_dict(ck.optim)
            sched.load_state_dict(ck.sched)
            gen.set_state(ck.rng["sampler"])
        except (RuntimeError, KeyError, ValueError, TypeError) as err:
            raise UsageError(f"resume={ck.path}: does not fit this model ({str(err).splitlines()[0]})") from None
        step = ck.step

    config_yaml = OmegaConf.to_yaml(cfg, resolve=True)
    metrics_path = run_dir / "metrics.csv"
    new_file = not metrics_path.exists()
    action = theory.action
    micro = t.micro_batch_size or t.batch_size

    def checkpoint() -> pathlib.Path:
        return save_checkpoint(run_dir, step, model=model.state_dict(), optim=opt.state_dict(),
                               sched=sched.state_dict(), rng={"sampler": gen.get_state()},
                               theory=theory.name, config=config_yaml, keep=t.keep)

    reason, skipped, in_a_row, done_here = "completed", 0, 0, 0
    path = None
    t0 = time.monotonic()
    show = bool(t.progress) and sys.stdout.isatty()
    last = {}
    run_dir.mkdir(parents=True, exist_ok=True)
    logger = build_logger(cfg.logger, run_dir, OmegaConf.to_container(cfg, resolve=True), job_type="train")
    with logger, open(metrics_path, "a", newline="") as fh, stop_on_sigterm() as sigterm, \
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
            out, norm = _accumulated_step(model, opt, loss_fn, action, t.batch_size, micro, gen, t.grad_clip)
            if torch.isfinite(norm):
                opt.step()
                in_a_row = 0
            else:
                # a non-finite loss or gradient: skip the update, keep the schedule on time
                skipped += 1
                in_a_row += 1
            sched.step(out.loss.item())
            step += 1
            done_here += 1
            dt = time.monotonic() - ts
            if in_a_row >= t.max_nonfinite:
                last_good = list_checkpoints(run_dir)
                raise Diverged(f"training stopped at step {step}: {in_a_row} consecutive steps with a non-finite "
                               f"loss or gradient (train.max_nonfinite); last good checkpoint: "
                               f"{last_good[-1] if last_good else 'none'}")
            if step % t.log_every == 0 or step == t.steps:
                row = _metrics(step, out, loss_fn, model, theory, gen.device, int(cfg.seed), t.batch_size)
                row.update(lr=opt.param_groups[0]["lr"], grad_norm=float(norm), seconds_per_step=dt,
                           samples_per_second=t.batch_size / dt, peak_memory_mb=_peak_mb(device),
                           nonfinite_skipped=skipped)
                writer.writerow(row)
                fh.flush()
                logger.log_metrics(row, step)
                last = row
                bar.advance(f"F={row['free_energy']:.4g} ess={row['ess']:.3f}")
            if step % t.checkpoint_every == 0:
                path = checkpoint()
        if path is None or list_checkpoints(run_dir)[-1] != checkpoint_path(run_dir, step):
            path = checkpoint()
        fh.flush()
        seconds = time.monotonic() - t0
        summary = dict(step=step, stop_reason=reason, seconds=seconds, checkpoint=str(path), **_evaluate(
            model, theory, t.eval_samples, t.batch_size, cfg.seed, device))
        if logger.active:
            logger.log_summary(summary)
            logger.log_images(_training_plots(run_dir))
    _report(theory, summary, last)
    return summary


def _training_plots(run_dir: pathlib.Path) -> dict[str, pathlib.Path]:
    """Loss, ESS and lr against step as PNGs in <run dir>/plots (for the logger)."""
    from gaugeflow.cli.analyze import plot_training, read_metrics

    written: list[pathlib.Path] = []
    try:
        plot_training(read_metrics(run_dir), run_dir / "plots", written)
    except UsageError:  # no metrics row yet (a run stopped before its first log step)
        return {}
    return {pathlib.Path(p).stem: p for p in written}


def _accumulated_step(model, opt, loss_fn, action, batch: int, micro: int, gen, clip):
    """Gradients of the batch loss accumulated over ``batch / micro`` chunks; returns (merged output, norm).

    Each chunk's mean loss is weighted by ``micro / batch``, so the sum is the batch mean.
    A non-finite chunk loss ends the step early with a NaN norm (the update is skipped).
    """
    opt.zero_grad(set_to_none=True)
    outs = []
    for _ in range(batch // micro):
        out = loss_fn(model, action, micro, gen)
        outs.append(out)
        if not torch.isfinite(out.loss):
            break
        # a single chunk is not rescaled, so the default path stays bitwise what it was
        (out.loss if micro == batch else out.loss * (micro / batch)).backward()
    merged = LossOutput(
        loss=torch.stack([o.loss.detach() for o in outs]).mean(),
        log_q=torch.cat([o.log_q for o in outs]),
        action=torch.cat([o.action for o in outs]),
        samples=torch.cat([o.samples for o in outs]) if outs[0].samples is not None else None,
    )
    if not torch.isfinite(merged.loss):
        return merged, torch.tensor(math.nan)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip if clip else math.inf)
    return merged, norm


def _metrics(step, out, loss_fn, model, theory, device, seed, batch) -> dict:
    """The logged row: free-energy bound, ESS and plaquette come from draws of q.

    For a loss that does not sample q (forward KL) a fresh batch is drawn, from a stream
    keyed by (seed, step) so that logging never changes the training.
    """
    log_q, s, samples = out.log_q, out.action, out.samples
    if not loss_fn.samples_from_model:
        g = torch.Generator(device=device).manual_seed(_eval_seed(seed * 1_000_003 + step))
        with torch.no_grad():
            samples, log_q = model.sample(min(batch, 256), g)
            s = theory.action(samples)
    log_w = (-s - log_q).double()
    return dict(step=step, loss=out.loss.item(), free_energy=(log_q + s).double().mean().item(),
                ess=effective_sample_size(log_w).item(), var_log_w=log_w.var().item(),
                plaquette=_mean_plaquette(theory, samples))


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
    try:
        guarded(run_train)(cfg)
    except Diverged as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
