"""``gaugeflow train``: fit a flow to a theory; HDF5 checkpoints, resumable, metrics in CSV."""

from __future__ import annotations

import contextlib
import csv
import math
import os
import pathlib
import sys
import time

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from gaugeflow.cli.common import (
    CONFIG_DIR,
    JOB_START,
    UsageError,
    guarded,
    parse_duration,
    require,
    resolve_device,
    resolve_dtype,
    stop_on_sigterm,
)
from gaugeflow.cli.build import model_from_config, parallel_from_config, resolve_model_config, theory_from_config
from gaugeflow.cli.progress import progress_bar
from gaugeflow.components import instantiate_node
from gaugeflow.errors import Diverged
from gaugeflow.cli.restore import restore_config, sha256_file, state_dict_mismatch
from gaugeflow.exact import reference_values
from gaugeflow.distributed.init import PeerFailure
from gaugeflow.distributed.parallel import Parallel
from gaugeflow.monitor import build_logger
from gaugeflow.cli.schema import register
from gaugeflow.distributed.fsdp import clip_grad_norm
from gaugeflow.io.checkpoint import CheckpointError, checkpoint_path, remove_stale_temporaries, save_checkpoint
from gaugeflow.io.sharded import load_sharded, save_sharded, sharded_path
from gaugeflow.sampling.weights import effective_sample_size, log_z_estimate
from gaugeflow.train.losses import LossOutput

register()

METRICS = ["step", "loss", "free_energy", "ess", "var_log_w", "plaquette", "lr", "grad_norm",
           "seconds_per_step", "samples_per_second", "peak_memory_mb", "nonfinite_skipped", "restart"]


def _eval_seed(seed: int) -> int:
    # the end-of-run evaluation draws from its own stream so it cannot disturb training
    return (seed * 2654435761 + 97) % (2**63 - 1)


def _check(cfg: DictConfig) -> None:
    t = cfg.train
    require(t.steps >= 1, f"train.steps must be >= 1, got {t.steps}")
    require(t.batch_size >= 1, f"train.batch_size must be >= 1, got {t.batch_size}")
    mb = t.micro_batch_size
    require(mb is None or mb >= 1, f"train.micro_batch_size must be >= 1, got {mb}")
    require(t.eval_batch_size is None or t.eval_batch_size >= 1,
            f"train.eval_batch_size must be >= 1, got {t.eval_batch_size}")
    require(not (cfg.resume and cfg.init_from), "give resume= (continue a run) or init_from= (a new run from "
            "trained weights), not both")
    require(t.lr > 0, f"train.lr must be > 0, got {t.lr}")
    require(t.stop_after is None or t.stop_after >= 1, f"train.stop_after must be >= 1, got {t.stop_after}")
    require(t.checkpoint_every >= 1, f"train.checkpoint_every must be >= 1, got {t.checkpoint_every}")
    require(t.log_every >= 1, f"train.log_every must be >= 1, got {t.log_every}")
    require(t.keep >= 1, f"train.keep must be >= 1, got {t.keep}")
    require(t.max_nonfinite >= 1, f"train.max_nonfinite must be >= 1, got {t.max_nonfinite}")
    require(t.grad_clip is None or t.grad_clip > 0, f"train.grad_clip must be > 0, got {t.grad_clip}")




#: what ``resume=`` takes from the checkpoint's config (theory and lattice may not change;
#: explicit train/loss/optim/sched keys on the command line apply on top)
RESUMED = ("theory", "model", "lattice", "train", "loss", "optim", "sched")
#: what ``init_from=`` takes (the command line may change couplings and lattice)
INITIALISED = ("theory", "model", "lattice")
#: budgets of one invocation, never inherited from the run being resumed
PER_INVOCATION = ("stop_after", "max_time", "progress", "eval_samples", "eval_batch_size")


def run_train(cfg: DictConfig) -> dict:
    ck = init = None
    if cfg.resume:
        # the run continues as it was configured; explicit keys on the command line apply on top
        given = {k: cfg.train[k] for k in PER_INVOCATION}
        restart_lr = cfg.sched.get("restart_lr")
        cfg, ck = restore_config(cfg, cfg.resume, "resume", sections=RESUMED, mode="resume")
        for k, v in given.items():
            cfg.train[k] = v
        if restart_lr is not None:
            cfg.sched.restart_lr = restart_lr
    elif cfg.init_from:
        # a new run (optimizer, schedule, run directory) from trained weights
        cfg, init = restore_config(cfg, cfg.init_from, "init_from", sections=INITIALISED, mode="target",
                                   load=("model",))
    _check(cfg)
    t = cfg.train
    max_time = parse_duration(t.max_time, "train.max_time")
    dtype = resolve_dtype(t.dtype, "train.dtype")
    if cfg.dist.strategy == "none":
        resolve_device(cfg.device)  # a clear error for an absent cuda/xpu before anything starts
    par = parallel_from_config(cfg)
    try:
        summary = _train(cfg, ck, par, max_time, dtype, init)
        par.barrier()  # no rank tears the process group down while a peer still talks to it
        return summary
    finally:
        par.ctx.shutdown()


def _train(cfg: DictConfig, ck, par: Parallel, max_time: float | None, dtype: torch.dtype, init=None) -> dict:
    t = cfg.train
    device = par.ctx.device
    run_dir = pathlib.Path(HydraConfig.get().runtime.output_dir)
    if ck is not None:
        inside = ck.path.parent.name == "checkpoints"
        if inside:
            run_dir = ck.path.parent.parent  # continue the same run
        elif par.is_main:
            print(f"resume={cfg.resume}: not inside a run directory; the run continues in {run_dir}")
    # every rank writes into rank 0's run directory (their Hydra clocks may differ)
    run_dir = pathlib.Path(par.broadcast_object(str(run_dir)))
    if par.is_main:
        for p in remove_stale_temporaries(run_dir):
            print(f"removed {p.name}, left by an interrupted checkpoint write")
    batch, effective = par.local_batch(t.batch_size)
    if effective != t.batch_size:
        if par.is_main:
            print(f"train.batch_size={t.batch_size} is not a multiple of the {par.replicas} data-parallel replicas: "
                  f"training with a global batch of {effective} ({batch} per replica)")
        t.batch_size = effective  # what the config, checkpoints and metrics record
    micro = t.micro_batch_size or batch
    require(batch % micro == 0, f"train.micro_batch_size={micro} must divide the per-replica batch {batch}"
            + (f" (train.batch_size={t.batch_size} over {par.replicas} replicas)" if par.replicas > 1 else ""))
    require(par.decomp is None or cfg.loss.name != "forward_kl",
            "loss=forward_kl does not support dist.lattice_grid (the ensemble is not decomposed)")

    with par.physics():
        # the initial weights come from torch's global generator: seed it for reproducible runs
        torch.manual_seed(int(cfg.seed))
        theory = theory_from_config(cfg, par.local_shape)
        resolve_model_config(cfg, theory)  # checkpoints record the architecture in full
        model = model_from_config(cfg, theory, dtype, device)
        extra = {}
        if init is not None:
            _load_init(model, init, cfg.init_from)
            extra = {"init_from": str(init.path.resolve()), "init_from_sha256": sha256_file(init.path),
                     "init_from_step": int(init.step)}
        try:
            model = par.prepare(model, bool(cfg.dist.activation_checkpointing),
                                _param_dtype(cfg.dist.param_dtype), bool(cfg.dist.reshard_after_forward),
                                _param_dtype(cfg.dist.reduce_dtype, "dist.reduce_dtype"))
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
                raise UsageError(f"resume={ck.path}: does not fit this run ({state_dict_mismatch(err)})") from None
            step = sc.step
            _restore_rng(gen, sc.rng or {}, par, int(cfg.seed), step, own=True)
        elif ck is not None:
            try:
                model.load_state_dict(ck.model)
                opt.load_state_dict(ck.optim)
                sched.load_state_dict(ck.sched)
            except (RuntimeError, KeyError, ValueError, TypeError) as err:
                raise UsageError(f"resume={ck.path}: does not fit this model ({state_dict_mismatch(err)})") from None
            step = ck.step
            _restore_rng(gen, ck.rng, par, int(cfg.seed), step)
        try:
            sched.resolve(budget=max_time is not None, resumed=ck is not None)
        except ValueError as err:
            raise UsageError(str(err)) from None
        if sched.restarted and par.is_main:
            lr = opt.param_groups[0]["lr"]
            print(f"resume: the run's time-planned schedule ended with its last train.max_time; a new cycle "
                  f"starts at lr {lr:.3g} over " + ("this train.max_time" if max_time is not None
                                                    else f"the remaining {t.steps - step} train.steps"))
        return _loop(cfg, par, theory, model, loss_fn, opt, sched, gen, step, run_dir, batch, micro, max_time,
                     extra)


def _load_init(model, init, spec) -> None:
    """The weights of checkpoint ``init`` into ``model`` (a new run: nothing else is taken)."""
    try:
        if init.path.is_dir():
            load_sharded(init.path, model, key="init_from")
        else:
            model.load_state_dict(init.model)
    except CheckpointError as err:
        raise UsageError(str(err).splitlines()[0]) from None
    except (RuntimeError, KeyError, ValueError, TypeError) as err:
        raise UsageError(f"init_from={spec}: does not fit this model ({state_dict_mismatch(err)})") from None


def _param_dtype(name, key: str = "dist.param_dtype") -> torch.dtype | None:
    table = {None: None, "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32,
             "float64": torch.float64}
    if name not in table:
        raise UsageError(f"{key} must be null, bfloat16, float16, float32 or float64, got {name!r}")
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


def _loop(cfg, par, theory, model, loss_fn, opt, sched, gen, step, run_dir, batch, micro, max_time,
          extra_attrs=None) -> dict:
    t = cfg.train
    device = par.ctx.device
    config_yaml = OmegaConf.to_yaml(cfg, resolve=True)
    metrics_path = run_dir / "metrics.csv"
    action = theory.action
    last_ck = step if cfg.resume else None
    extra_attrs = extra_attrs or {}

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
                                   keep=t.keep, attrs=extra_attrs)
        par.barrier()  # the file is complete before any rank goes on (or exits)
        return path

    reason, skipped, in_a_row, done_here = "completed", 0, 0, 0
    restart_pending = bool(getattr(sched, "restarted", False))
    t0 = time.monotonic()  # this invocation's steps (rates); budgets count from JOB_START
    ck_seconds = 0.0  # the last checkpoint write (kept in reserve before the budget ends)
    show = bool(t.progress) and sys.stdout.isatty() and par.is_main
    last = {}
    if par.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    new_file = not metrics_path.exists()
    if par.is_main and not new_file:
        _check_metrics_header(metrics_path)
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
        dt = 0.0
        while step < t.steps:
            if par.any(sigterm()):
                reason = "SIGTERM"
                break
            # the next step and the checkpoint after it must fit in what is left of the budget
            if par.any(max_time is not None and time.monotonic() - JOB_START + dt + ck_seconds > max_time):
                reason = "train.max_time"
                break
            if t.stop_after is not None and done_here >= t.stop_after:
                reason = "train.stop_after"
                break
            ts = time.monotonic()
            lr = opt.param_groups[0]["lr"]  # the lr this step trains with
            try:
                out, norm = _accumulated_step(model, opt, loss_fn, action, batch, micro, gen, t.grad_clip, par)
            except (RuntimeError, torch.linalg.LinAlgError) as err:
                if isinstance(err, PeerFailure):
                    raise
                good = ck_path(last_ck) if last_ck is not None else "none"
                raise Diverged(f"training stopped at step {step + 1}: {str(err).strip().splitlines()[0]}; "
                               f"last good checkpoint: {good}") from None
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
                rate = (time.monotonic() - t0) / done_here
                left = max(0.0, max_time - (time.monotonic() - JOB_START) - ck_seconds)
                fit = par.broadcast_object(step + int(left / rate))
                sched.plan(min(t.steps, fit))
            sched.step(out.loss.item())
            dt = time.monotonic() - ts
            if in_a_row >= t.max_nonfinite:
                good = ck_path(last_ck) if last_ck is not None else "none"
                raise Diverged(f"training stopped at step {step}: {in_a_row} consecutive steps with a non-finite "
                               f"loss or gradient (train.max_nonfinite); last good checkpoint: {good}")
            if step % t.log_every == 0 or step == t.steps:
                row = _metrics(step, out, loss_fn, model, theory, par, gen.device, int(cfg.seed), batch)
                row.update(lr=lr, grad_norm=float(norm), seconds_per_step=dt,
                           samples_per_second=t.batch_size / dt, peak_memory_mb=_peak_mb(device),
                           nonfinite_skipped=skipped, restart=int(restart_pending))
                restart_pending = False
                if writer is not None:
                    writer.writerow(row)
                    fh.flush()
                logger.log_metrics(row, step)
                last = row
                bar.advance(f"F={row['free_energy']:.4g} ess={row['ess']:.3f}")
            if step % t.checkpoint_every == 0:
                tc = time.monotonic()
                checkpoint()
                ck_seconds = time.monotonic() - tc
                last_ck = step
        if reason == "train.max_time":
            sched.end_plan()  # a budget stop ends a time plan: resuming starts a new cycle
        if last_ck != step or reason == "train.max_time":
            checkpoint()
        path = ck_path(step)
        if fh is not None:
            fh.flush()
        seconds = time.monotonic() - t0
        if reason == "SIGTERM":
            # the batch system kills soon after SIGTERM: the checkpoint is written, nothing more
            evaluation = {"evaluation": "skipped (SIGTERM)"}
        else:
            deadline = None if max_time is None else JOB_START + max_time
            eval_batch = t.eval_batch_size or 4 * batch
            evaluation = _evaluate(model, theory, par, t.eval_samples, eval_batch, cfg.seed, device, deadline,
                                   dt * eval_batch / max(batch, 1))
        summary = dict(step=step, stop_reason=reason, seconds=seconds, checkpoint=str(path), **evaluation)
        if logger.active:
            logger.log_summary(summary)
            logger.log_images(_training_plots(run_dir))
    if par.is_main:
        _report(theory, summary, last, par)
    return summary


def _check_metrics_header(path: pathlib.Path) -> None:
    """A run resumed from an older gaugeflow: rewrite its metrics.csv (atomically) under today's
    header, columns it lacked left empty, so that appended rows line up."""
    with open(path, newline="") as fh:
        old = list(csv.DictReader(fh))
        fh.seek(0)
        header = next(csv.reader(fh), [])
    if not header or header == METRICS:
        return
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=METRICS, extrasaction="ignore")
        w.writeheader()
        w.writerows(old)
    os.replace(tmp, path)


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
    """Peak memory of this rank in MiB: the accelerator's allocations on cuda and xpu, else the
    process's peak resident set (``ru_maxrss`` is KiB on Linux, bytes on macOS)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    if device.type == "xpu":
        return torch.xpu.max_memory_allocated(device) / 2**20
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


@torch.no_grad()
def _evaluate(model, theory, par: Parallel, n, batch, seed, device, deadline: float | None = None,
              first_estimate: float = 0.0) -> dict:
    """ESS, Pareto k-hat and log Z from ``n`` independent draws (each replica draws its share, in
    model calls of ``batch``). With a ``deadline`` (``time.monotonic()``), only the batches that
    fit are drawn; the summary says how many and why."""
    if n <= 0:
        return {}
    gen = torch.Generator(device=device).manual_seed(_eval_seed(par.seed(int(seed))))
    mine = -(-n // par.replicas)
    lw = []
    per_batch = first_estimate
    done = 0
    note = None
    while done < mine:
        if deadline is not None and par.any(time.monotonic() + per_batch > deadline):
            note = f"cut to {done * par.replicas} of {n} draws to fit train.max_time" if done else \
                "skipped: no time left in train.max_time"
            break
        tb = time.monotonic()
        x, log_q = model.sample(min(batch, mine - done), gen)
        lw.append(-theory.action(x).double() - log_q.double())
        done += x.shape[0]
        per_batch = time.monotonic() - tb
    if not lw:
        return {"evaluation": note}
    lw = par.gather_replicas(torch.cat(lw))
    n = lw.numel()
    log_z, err = log_z_estimate(lw)
    out = dict(ess=effective_sample_size(lw).item(), log_z=log_z, log_z_err=err, eval_samples=n,
               **_khat(lw))
    if note:
        out["evaluation"] = note
    return out


def _khat(log_w: torch.Tensor) -> dict:
    """Pareto k-hat of the log weights and the one-line warning when the error bars understate."""
    from gaugeflow.sampling.weights import weight_diagnostics

    d = weight_diagnostics(log_w)
    return {"khat": d["khat"], **({"weights_warning": d["warning"]} if d.get("warning") else {})}


def _report(theory, summary, last, par: Parallel) -> None:
    where = "" if not par.active else f" on {par.world} ranks ({par.replicas} replicas x {par.world // par.replicas} lattice blocks)"
    lines = [f"train {theory.name} shape={list(theory.lattice.global_shape)}{where}: step {summary['step']} in "
             f"{summary['seconds']:.1f} s" + ("" if summary["stop_reason"] == "completed"
                                               else f" (stopped by {summary['stop_reason']})")]
    if summary.get("evaluation"):
        lines.append(f"  evaluation: {summary['evaluation']}")
    if "ess" in summary:
        lines.append(f"  ESS (independent draws, n={summary['eval_samples']})  {summary['ess']:.4f}"
                     + (f"   Pareto k-hat {summary['khat']:.2f}" if "khat" in summary else ""))
        exact = reference_values(theory).get("log_z")
        lines.append(f"  log Z estimate                      {summary['log_z']:.6g} +- {summary['log_z_err']:.2g}"
                     + (f"   exact {exact:.6g}" if exact is not None else ""))
    if last:
        lines.append(f"  free-energy bound F_q (last batch)  {last['free_energy']:.6g}")
    lines.append(f"  checkpoint                          {summary['checkpoint']}")
    print("\n".join(lines))
    if summary.get("weights_warning"):
        print(f"warning: {summary['weights_warning']}", file=sys.stderr)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> None:
    try:
        guarded(run_train)(cfg)
    except Diverged as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
