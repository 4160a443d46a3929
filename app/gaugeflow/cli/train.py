"""``gaugeflow train``: fit a flow to a theory; HDF5 checkpoints, resumable, metrics in CSV."""

from __future__ import annotations

import contextlib
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
from gaugeflow.cli.build import model_from_config, parallel_from_config, theory_from_config
from gaugeflow.cli.progress import progress_bar
from gaugeflow.cli.restore import restore_config
from gaugeflow.exact import reference_values
from gaugeflow.dist.parallel import Parallel
from gaugeflow.monitor import build_logger
from gaugeflow.cli.schema import register
from gaugeflow.dist.fsdp import clip_grad_norm
from gaugeflow.io.checkpoint import CheckpointError, checkpoint_path, save_checkpoint
from gaugeflow.io.sharded import load_sharded, save_sharded, sharded_path
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


#: what ``resume=`` takes from the checkpoint's config (command-line overrides apply on top)
RESUMED = ("theory", "model", "lattice", "train", "loss", "optim", "sched")
#: budgets of one invocation, never inherited from the run being resumed
PER_INVOCATION = ("stop_after", "max_time", "progress")


def run_train(cfg: DictConfig) -> dict:
    ck = None
    if cfg.resume:
        # the run continues as it was configured; explicit keys on the command line apply on top
        given = {k: cfg.train[k] for k in PER_INVOCATION}
        cfg, ck = restore_config(cfg, cfg.resume, "resume", sections=RESUMED)
        for k, v in given.items():
            cfg.train[k] = v
    _check(cfg)
    t = cfg.train
    max_time = parse_duration(t.max_time, "train.max_time")
    dtype = resolve_dtype(t.dtype, "train.dtype")
    if cfg.dist.strategy == "none":
        resolve_device(cfg.device)  # a clear error for an absent cuda/xpu before anything starts
    par = parallel_from_config(cfg)
    try:
        summary = _train(cfg, ck, par, max_time, dtype)
        par.barrier()  # no rank tears the process group down while a peer still talks to it
        return summary
    finally:
        par.ctx.shutdown()


def _train(cfg: DictConfig, ck, par: Parallel, max_time: float | None, dtype: torch.dtype) -> dict:
    t = cfg.train
    device = par.ctx.device
    run_dir = pathlib.Path(HydraConfig.get().runtime.output_dir)
    if ck is not None:
        run_dir = ck.path.parent.parent  # continue the same run
    # every rank writes into rank 0's run directory (their Hydra clocks may differ)
    run_dir = pathlib.Path(par.broadcast_object(str(run_dir)))
    try:
        batch = par.local_batch(t.batch_size)
    except ValueError as err:
        raise UsageError(str(err)) from None
    micro = t.micro_batch_size or batch
    require(batch % micro == 0, f"train.micro_batch_size={micro} must divide the per-replica batch {batch}")
    require(par.decomp is None or cfg.loss.name != "forward_kl",
            "loss=forward_kl does not support dist.lattice_grid (the ensemble is not decomposed)")

    with par.physics():
        # the initial weights come from torch's global generator: seed it for reproducible runs
        torch.manual_seed(int(cfg.seed))
        theory = theory_from_config(cfg, par.local_shape)
        model = model_from_config(cfg, theory, dtype, device)
        try:
            model = par.prepare(model, bool(cfg.dist.activation_checkpointing),
                                _param_dtype(cfg.dist.param_dtype), bool(cfg.dist.reshard_after_forward))
        except ValueError as err:
            raise UsageError(str(err).splitlines()[0]) from None
        loss_fn = instantiate_node(cfg.loss, "loss")
        try:
            loss_fn.bind(theory, device, dtype)
        except ValueError as err:
            raise UsageError(str(err).splitlines()[0]) from None
        opt = instantiate_node(cfg.optim, "optim", params=model.parameters(), lr=t.lr)
        sched = instantiate_node(cfg.sched, "sched", optimizer=opt, total_steps=t.steps)
        gen = torch.Generator(device=device).manual_seed(par.seed(cfg.seed))
        step = 0
        if ck is not None and (ck.path.is_dir() or par.strategy == "fsdp"):
            # a sharded checkpoint, or a sharded model: each rank reads the parts it holds now
            try:
                sc = load_sharded(ck.path, model, opt, key="resume")
                sched.load_state_dict(sc.sched)
            except CheckpointError as err:
                raise UsageError(str(err).splitlines()[0]) from None
            except (RuntimeError, KeyError, ValueError, TypeError) as err:
                raise UsageError(f"resume={ck.path}: does not fit this run ({str(err).splitlines()[0]})") from None
            step = sc.step
            _restore_rng(gen, sc.rng or {}, par, int(cfg.seed), step, own=True)
        elif ck is not None:
            try:
                model.load_state_dict(ck.model)
                opt.load_state_dict(ck.optim)
                sched.load_state_dict(ck.sched)
            except (RuntimeError, KeyError, ValueError, TypeError) as err:
                raise UsageError(f"resume={ck.path}: does not fit this model ({str(err).splitlines()[0]})") from None
            step = ck.step
            _restore_rng(gen, ck.rng, par, int(cfg.seed), step)
        try:
            sched.resolve(budget=max_time is not None, resumed=ck is not None)
        except ValueError as err:
            raise UsageError(str(err)) from None
        return _loop(cfg, par, theory, model, loss_fn, opt, sched, gen, step, run_dir, batch, micro, max_time)


def _param_dtype(name) -> torch.dtype | None:
    table = {None: None, "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32,
             "float64": torch.float64}
    if name not in table:
        raise UsageError(f"dist.param_dtype must be null, bfloat16, float16, float32 or float64, got {name!r}")
    return table[name]


def _restore_rng(gen: torch.Generator, rng: dict, par: Parallel, seed: int, step: int, own: bool = False) -> None:
    """This rank's sampling stream from a checkpoint (``own``: ``rng`` holds this rank's states
    only, as in sharded checkpoints); a rank the checkpoint lacks (more ranks than when it was
    written) starts a fresh stream keyed by (seed, rank, step)."""
    key = "sampler" if (own or par.rank == 0) else f"sampler_rank{par.rank}"
    if key in rng:
        gen.set_state(rng[key])
    else:
        gen.manual_seed(par.seed(seed * 1_000_003 + step))


def _loop(cfg, par, theory, model, loss_fn, opt, sched, gen, step, run_dir, batch, micro, max_time) -> dict:
    t = cfg.train
    device = par.ctx.device
    config_yaml = OmegaConf.to_yaml(cfg, resolve=True)
    metrics_path = run_dir / "metrics.csv"
    action = theory.action
    last_ck = step if cfg.resume else None

    sharded = par.strategy == "fsdp"

    def ck_path(at: int) -> pathlib.Path:
        return sharded_path(run_dir, at) if sharded else checkpoint_path(run_dir, at)

    def checkpoint() -> pathlib.Path:
        if sharded:  # every rank writes its own shard; rank 0 completes the directory
            with par.ctx.guard("sharded checkpoint"):
                return save_sharded(run_dir, step, model, opt, sched_state=sched.state_dict(),
                                    rng_states_this_rank={"sampler": gen.get_state()}, theory=theory.name,
                                    config=config_yaml, keep=t.keep)
        states = par.gather_objects(gen.get_state())  # collective: every rank takes part
        path = checkpoint_path(run_dir, step)
        if par.is_main:
            rng = {"sampler": states[0], **{f"sampler_rank{r}": st for r, st in enumerate(states) if r}}
            path = save_checkpoint(run_dir, step, model=model.state_dict(), optim=opt.state_dict(),
                                   sched=sched.state_dict(), rng=rng, theory=theory.name, config=config_yaml,
                                   keep=t.keep)
        par.barrier()  # the file is complete before any rank goes on (or exits)
        return path

    reason, skipped, in_a_row, done_here = "completed", 0, 0, 0
    t0 = time.monotonic()
    show = bool(t.progress) and sys.stdout.isatty() and par.is_main
    last = {}
    if par.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    new_file = not metrics_path.exists()
    logger = build_logger(cfg.logger, run_dir, OmegaConf.to_container(cfg, resolve=True), rank=par.rank,
                          job_type="train")
    with contextlib.ExitStack() as stack:
        stack.enter_context(logger)
        fh = stack.enter_context(open(metrics_path, "a", newline="")) if par.is_main else None
        sigterm = stack.enter_context(stop_on_sigterm())
        bar = stack.enter_context(progress_bar(show, t.steps - step, "train"))
        writer = csv.DictWriter(fh, fieldnames=METRICS) if fh is not None else None
        if writer is not None and new_file:
            writer.writeheader()
        while step < t.steps:
            if par.any(sigterm()):
                reason = "SIGTERM"
                break
            if par.any(max_time is not None and time.monotonic() - t0 > max_time):
                reason = "train.max_time"
                break
            if t.stop_after is not None and done_here >= t.stop_after:
                reason = "train.stop_after"
                break
            ts = time.monotonic()
            out, norm = _accumulated_step(model, opt, loss_fn, action, batch, micro, gen, t.grad_clip, par)
            if torch.isfinite(norm):
                opt.step()
                in_a_row = 0
            else:
                # a non-finite loss or gradient: skip the update, keep the schedule on time
                skipped += 1
                in_a_row += 1
            step += 1
            done_here += 1
            if sched.resolved == "time" and max_time is not None and done_here >= 3:
                # plan for the steps that fit in what is left of the budget at the rate so far
                # (logging and checkpoints included), by rank 0's clock: replicas must share the lr
                spent = time.monotonic() - t0
                fit = par.broadcast_object(step + int(max(0.0, max_time - spent) * done_here / spent))
                sched.plan(min(t.steps, fit))
            sched.step(out.loss.item())
            dt = time.monotonic() - ts
            if in_a_row >= t.max_nonfinite:
                good = ck_path(last_ck) if last_ck is not None else "none"
                raise Diverged(f"training stopped at step {step}: {in_a_row} consecutive steps with a non-finite "
                               f"loss or gradient (train.max_nonfinite); last good checkpoint: {good}")
            if step % t.log_every == 0 or step == t.steps:
                row = _metrics(step, out, loss_fn, model, theory, par, gen.device, int(cfg.seed), batch)
                row.update(lr=opt.param_groups[0]["lr"], grad_norm=float(norm), seconds_per_step=dt,
                           samples_per_second=t.batch_size / dt, peak_memory_mb=_peak_mb(device),
                           nonfinite_skipped=skipped)
                if writer is not None:
                    writer.writerow(row)
                    fh.flush()
                logger.log_metrics(row, step)
                last = row
                bar.advance(f"F={row['free_energy']:.4g} ess={row['ess']:.3f}")
            if step % t.checkpoint_every == 0:
                checkpoint()
                last_ck = step
        if last_ck != step:
            checkpoint()
        path = ck_path(step)
        if fh is not None:
            fh.flush()
        seconds = time.monotonic() - t0
        summary = dict(step=step, stop_reason=reason, seconds=seconds, checkpoint=str(path), **_evaluate(
            model, theory, par, t.eval_samples, batch, cfg.seed, device))
        if logger.active:
            logger.log_summary(summary)
            logger.log_images(_training_plots(run_dir))
    if par.is_main:
        _report(theory, summary, last, par)
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


def _accumulated_step(model, opt, loss_fn, action, batch: int, micro: int, gen, clip, par: Parallel | None = None):
    """Gradients of the batch loss accumulated over ``batch / micro`` chunks; returns (merged output, norm).

    Each chunk's mean loss is weighted by ``micro / batch``, so the sum is the batch mean. A
    non-finite chunk loss ends the step early with a NaN norm (the update is skipped); with
    several processes the ranks agree on it before any backward, so they skip the same step.
    """
    opt.zero_grad(set_to_none=True)
    outs = []
    finite = True
    for _ in range(batch // micro):
        out = loss_fn(model, action, micro, gen)
        outs.append(out)
        bad = not bool(torch.isfinite(out.loss))
        if par is not None:
            bad = par.any(bad)  # every rank skips together (a lone backward would wait for the others)
        if bad:
            finite = False
            break
        # a single chunk is not rescaled, so the default path stays bitwise what it was
        (out.loss if micro == batch else out.loss * (micro / batch)).backward()
    merged = LossOutput(
        loss=torch.stack([o.loss.detach() for o in outs]).mean(),
        log_q=torch.cat([o.log_q for o in outs]),
        action=torch.cat([o.action for o in outs]),
        samples=torch.cat([o.samples for o in outs]) if outs[0].samples is not None else None,
    )
    if not finite:
        return merged, torch.tensor(math.nan)
    if par is not None:
        par.reduce_gradients(model.parameters())
    return merged, clip_grad_norm(model.parameters(), clip)


def _metrics(step, out, loss_fn, model, theory, par: Parallel, device, seed, batch) -> dict:
    """The logged row: free-energy bound, ESS and plaquette come from draws of q.

    For a loss that does not sample q (forward KL) a fresh batch is drawn, from a stream
    keyed by (seed, step) so that logging never changes the training.
    """
    log_q, s, samples = out.log_q, out.action, out.samples
    if not loss_fn.samples_from_model:
        g = torch.Generator(device=device).manual_seed(_eval_seed(par.seed(seed * 1_000_003 + step)))
        with torch.no_grad():
            samples, log_q = model.sample(min(batch, 256), g)
            s = theory.action(samples)
    # the global batch: per-sample values of every data-parallel replica
    log_q, s = par.gather_replicas(log_q.double()), par.gather_replicas(s.double())
    loss = par.gather_replicas(out.loss.detach().double().reshape(1)).mean()
    plaq = _mean_plaquette(theory, samples)
    plaq = par.gather_replicas(torch.tensor([plaq], dtype=torch.float64, device=log_q.device)).mean().item()
    log_w = -s - log_q
    return dict(step=step, loss=loss.item(), free_energy=(log_q + s).mean().item(),
                ess=effective_sample_size(log_w).item(), var_log_w=log_w.var().item(), plaquette=plaq)


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
def _evaluate(model, theory, par: Parallel, n, batch, seed, device) -> dict:
    """ESS and log Z from ``n`` independent draws (each replica draws its share)."""
    if n <= 0:
        return {}
    gen = torch.Generator(device=device).manual_seed(_eval_seed(par.seed(int(seed))))
    mine = -(-n // par.replicas)
    lw = []
    for i in range(0, mine, batch):
        x, log_q = model.sample(min(batch, mine - i), gen)
        lw.append(-theory.action(x).double() - log_q.double())
    lw = par.gather_replicas(torch.cat(lw))
    n = lw.numel()
    log_z, err = log_z_estimate(lw)
    return dict(ess=effective_sample_size(lw).item(), log_z=log_z, log_z_err=err, eval_samples=n)


def _report(theory, summary, last, par: Parallel) -> None:
    where = "" if not par.active else f" on {par.world} ranks ({par.replicas} replicas x {par.world // par.replicas} lattice blocks)"
    lines = [f"train {theory.name} shape={list(theory.lattice.global_shape)}{where}: step {summary['step']} in "
             f"{summary['seconds']:.1f} s" + ("" if summary["stop_reason"] == "completed"
                                               else f" (stopped by {summary['stop_reason']})")]
    if "ess" in summary:
        lines.append(f"  ESS (independent draws, n={summary['eval_samples']})  {summary['ess']:.4f}")
        exact = reference_values(theory).get("log_z")
        lines.append(f"  log Z estimate                      {summary['log_z']:.6g} +- {summary['log_z_err']:.2g}"
                     + (f"   exact {exact:.6g}" if exact is not None else ""))
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
