"""The trainer: one loop for ``gaugeflow train``, the benchmarks, the tests and library users.

A :class:`Trainer` fits a flow ``model`` to a ``theory`` with a ``loss`` (a callable
``loss(model, action, batch, generator) -> LossOutput``, e.g. :class:`gaugeflow.train.losses.ReverseKL`),
a torch ``optimizer`` and a :class:`gaugeflow.train.schedules.Schedule`. It owns what every run
needs: gradient accumulation over micro-batches, clipping, skipping non-finite steps (and
stopping after too many in a row, :class:`gaugeflow.errors.Diverged`), the schedule's per-step
planning for a wall-clock budget, stops (``max_time``, ``stop_after``, a stop request such as
SIGTERM), checkpoints (one HDF5 file, or a directory of shards under FSDP), ``metrics.csv``, a
:class:`gaugeflow.monitor.Logger`, and the final evaluation (ESS, log Z, Pareto k-hat of
independent draws, cut to what fits in the budget).

It needs neither Hydra nor files: without ``run_dir`` nothing is written, without ``parallel``
it runs in this process. The rows it logs are kept in :attr:`Trainer.history`::

    trainer = Trainer(theory, model, ReverseKL(), torch.optim.Adam(model.parameters(), lr=3e-3),
                      settings=TrainSettings(steps=500, batch_size=64))
    summary = trainer.run()   # {"step", "stop_reason", "seconds", "checkpoint", "ess", "log_z", ...}
    trainer.history.loss      # the loss at every log step

The command-line job (:mod:`gaugeflow.cli.train`) only composes the config, builds these
components, restores them from a checkpoint and reports; it gives the trainer the run directory,
the config text checkpoints record, its logger, a progress bar and its SIGTERM flag.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import math
import os
import pathlib
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from gaugeflow.distributed.fsdp import clip_grad_norm
from gaugeflow.distributed.init import DistContext, PeerFailure
from gaugeflow.distributed.parallel import Parallel
from gaugeflow.errors import Diverged, UsageError, require
from gaugeflow.fermions.fields import cat_fields, links_of
from gaugeflow.io.checkpoint import (
    checkpoint_path,
    remove_stale_temporaries,
    save_checkpoint,
)
from gaugeflow.io.sharded import save_sharded, sharded_path
from gaugeflow.monitor import Logger, NullLogger
from gaugeflow.sampling.weights import effective_sample_size, log_z_estimate
from gaugeflow.train.losses import LossOutput
from gaugeflow.train.schedules import Constant

__all__ = ["METRICS", "History", "TrainSettings", "Trainer", "accumulated_step", "batch_metrics", "evaluate",
           "peak_memory_mb", "replica_batch", "single_process"]

#: the columns of ``metrics.csv`` (and the keys of a logged row), in order
METRICS = ["step", "loss", "free_energy", "ess", "var_log_w", "plaquette", "lr", "grad_norm",
           "seconds_per_step", "samples_per_second", "peak_memory_mb", "nonfinite_skipped", "restart"]


@dataclass
class TrainSettings:
    """What a training run does; the keys of the ``train`` config group (same names and meanings).

    ``batch_size`` is the global batch of a step (over all data-parallel replicas);
    ``micro_batch_size`` (None: the per-replica batch) the chunks it is drawn and back-propagated
    in. ``max_time`` is a wall-clock budget in seconds counted from the trainer's ``start_time``
    (default: the start of :meth:`Trainer.run`); ``stop_after`` ends one :meth:`Trainer.run` after
    that many steps. ``eval_samples`` independent draws (in model calls of ``eval_batch_size``,
    None: 4 x the per-replica batch) give the final ESS and log Z. ``seed`` keys the evaluation's
    stream (and the generator, when none is given).
    """

    steps: int = 200
    batch_size: int = 64
    micro_batch_size: int | None = None
    grad_clip: float | None = None
    max_time: float | None = None
    stop_after: int | None = None
    max_nonfinite: int = 20
    log_every: int = 50
    checkpoint_every: int = 500
    keep: int = 3
    eval_samples: int = 1024
    eval_batch_size: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Raise :class:`gaugeflow.errors.UsageError` (one line naming the ``train.`` key) on a bad value."""
        require(self.steps >= 1, f"train.steps must be >= 1, got {self.steps}")
        require(self.batch_size >= 1, f"train.batch_size must be >= 1, got {self.batch_size}")
        mb = self.micro_batch_size
        require(mb is None or mb >= 1, f"train.micro_batch_size must be >= 1, got {mb}")
        require(self.eval_batch_size is None or self.eval_batch_size >= 1,
                f"train.eval_batch_size must be >= 1, got {self.eval_batch_size}")
        require(self.max_time is None or self.max_time > 0, f"train.max_time must be positive, got {self.max_time}")
        require(self.stop_after is None or self.stop_after >= 1, f"train.stop_after must be >= 1, got {self.stop_after}")
        require(self.checkpoint_every >= 1, f"train.checkpoint_every must be >= 1, got {self.checkpoint_every}")
        require(self.log_every >= 1, f"train.log_every must be >= 1, got {self.log_every}")
        require(self.keep >= 1, f"train.keep must be >= 1, got {self.keep}")
        require(self.max_nonfinite >= 1, f"train.max_nonfinite must be >= 1, got {self.max_nonfinite}")
        require(self.grad_clip is None or self.grad_clip > 0, f"train.grad_clip must be > 0, got {self.grad_clip}")

    @classmethod
    def from_mapping(cls, values: Mapping, **overrides) -> TrainSettings:
        """Settings from a mapping such as the ``train`` config node; keys that are not settings
        (``lr``, ``dtype``, ``progress``) are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in {**dict(values), **overrides}.items() if k in names})


@dataclass
class History:
    """What :meth:`Trainer.run` logged, one entry per log step: ``seconds`` since the run started,
    ``rows`` the full metrics rows (columns :data:`METRICS`). ``seconds`` count from the start of
    the :meth:`Trainer.run` call that logged the row."""

    step: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    ess: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    rows: list[dict] = field(default_factory=list)


def single_process(shape, device: torch.device | str = "cpu") -> Parallel:
    """The layout of a job that is one process on ``device`` (every collective is the identity)."""
    ctx = DistContext(0, 1, 0, 1, torch.device(device), None, "single", 0.0)
    return Parallel(ctx, shape, None, "none")


def replica_batch(par: Parallel, settings: TrainSettings, announce: bool = True) -> tuple[int, int]:
    """``(per-replica batch, micro-batch)`` of ``settings`` on ``par``.

    A global batch the replicas do not divide is rounded up to the next multiple, in
    ``settings.batch_size`` too (what checkpoints and metrics record), and rank 0 says so once
    (``announce``). A micro-batch that does not divide the per-replica batch is a usage error.
    """
    batch, effective = par.local_batch(settings.batch_size)
    if effective != settings.batch_size:
        if announce and par.is_main:
            print(f"train.batch_size={settings.batch_size} is not a multiple of the {par.replicas} data-parallel "
                  f"replicas: training with a global batch of {effective} ({batch} per replica)")
        settings.batch_size = effective
    micro = settings.micro_batch_size or batch
    require(batch % micro == 0, f"train.micro_batch_size={micro} must divide the per-replica batch {batch}"
            + (f" (train.batch_size={settings.batch_size} over {par.replicas} replicas)" if par.replicas > 1 else ""))
    return batch, micro


def _shape(theory) -> tuple[int, ...]:
    lattice = getattr(theory, "lattice", None)
    return tuple(getattr(lattice, "shape", ()))


def _eval_seed(seed: int) -> int:
    # the end-of-run evaluation draws from its own stream so it cannot disturb training
    return (seed * 2654435761 + 97) % (2**63 - 1)


class _NoBar:
    def advance(self, status: str = "") -> None:
        pass


class Trainer:
    """Trains ``model`` on ``theory`` with ``loss``, ``optimizer`` and ``schedule``; see the module docstring.

    Args:
        theory: the target: ``theory.action(fields)`` is S per configuration; ``theory.name``
            (recorded in checkpoints) and ``theory.is_gauge`` (a plaquette column) are used when present.
        model: the flow (``sample``, ``log_prob``), already on its device (and prepared by ``parallel``).
        loss: ``loss(model, action, batch, generator) -> LossOutput``; an object with
            ``samples_from_model = False`` (forward KL) gets its logged ESS from fresh draws of q.
            A loss that reads data must be bound first (``loss.bind(theory, device, dtype)``).
        optimizer: a torch optimizer over the model's parameters.
        schedule: a :class:`gaugeflow.train.schedules.Schedule` of ``optimizer`` (None: constant lr).
        settings: :class:`TrainSettings` (None: the defaults).
        parallel: the process layout (None: this process alone, on the model's device).
        generator: the sampling stream (None: seeded from ``settings.seed``, per rank).
        step: the step the model, optimizer and schedule are at (a resumed run).
        resumed: they were restored from a checkpoint of this run at ``step`` (so that checkpoint
            is the last good one, and a time-planned schedule continues or restarts its cycle).
        run_dir: where ``checkpoints/`` and ``metrics.csv`` go (None: nothing is written).
        config: the text checkpoints record as their ``config`` attribute.
        checkpoint_attrs: further attributes of single-file checkpoints.
        logger: a :class:`gaugeflow.monitor.Logger`; :meth:`run` enters and finishes it.
        start_time: ``time.monotonic()`` that ``settings.max_time`` counts from (a batch job: the
            process start); None: the start of each :meth:`run`.
        progress: ``progress(total_steps)``, a context manager whose value has ``advance(status)``
            (a console progress bar), or None.
        plots: ``plots(run_dir) -> {name: image path}``, sent to an active logger at the end.
    """

    def __init__(self, theory, model, loss, optimizer, schedule=None, settings: TrainSettings | None = None, *,
                 parallel: Parallel | None = None, generator: torch.Generator | None = None, step: int = 0,
                 resumed: bool = False, run_dir: str | os.PathLike | None = None, config: str = "",
                 checkpoint_attrs: Mapping | None = None, logger: Logger | None = None,
                 start_time: float | None = None,
                 progress: Callable[[int], contextlib.AbstractContextManager] | None = None,
                 plots: Callable[[pathlib.Path], Mapping[str, pathlib.Path]] | None = None):
        self.settings = settings if settings is not None else TrainSettings()
        self.settings.check()
        self.theory, self.model, self.loss, self.optimizer = theory, model, loss, optimizer
        if parallel is None:
            param = next(iter(model.parameters()), None)
            device = param.device if param is not None else (generator.device if generator is not None else "cpu")
            parallel = single_process(_shape(theory), device)
        self.parallel = parallel
        self.device = parallel.ctx.device
        self.schedule = schedule if schedule is not None else Constant(optimizer, self.settings.steps)
        self.generator = generator if generator is not None else \
            torch.Generator(device=self.device).manual_seed(parallel.seed(self.settings.seed))
        self.step = int(step)
        self.batch, self.micro = replica_batch(parallel, self.settings)
        self.run_dir = None if run_dir is None else pathlib.Path(run_dir)
        self.config = str(config)
        self.checkpoint_attrs = dict(checkpoint_attrs or {})
        self.logger = logger if logger is not None else NullLogger("no logger")
        self.start_time = start_time
        self.progress = progress
        self.plots = plots
        self.history = History()
        self.last_metrics: dict = {}  # the last logged row
        self.nonfinite_skipped = 0  # steps skipped for a non-finite loss or gradient (this trainer)
        self.last_checkpoint: int | None = self.step if resumed else None  # the step of the last good one
        if self.run_dir is not None and parallel.is_main:
            for p in remove_stale_temporaries(self.run_dir):
                print(f"removed {p.name}, left by an interrupted checkpoint write")
        try:
            self.schedule.resolve(budget=self.settings.max_time is not None, resumed=resumed)
        except ValueError as err:
            raise UsageError(str(err)) from None
        self._restart_pending = bool(getattr(self.schedule, "restarted", False))
        if self._restart_pending and parallel.is_main:
            lr = optimizer.param_groups[0]["lr"]
            why = ("time-planned schedule ended with its last train.max_time"
                   if getattr(self.schedule, "restart_reason", "time") != "steps" else
                   f"schedule ended at step {self.step}, below train.steps={self.settings.steps}")
            print(f"resume: the run's {why}; a new cycle starts at lr {lr:.3g} over "
                  + ("this train.max_time" if self.settings.max_time is not None
                     else f"the remaining {self.settings.steps - self.step} train.steps"))
        replanned = getattr(self.schedule, "replanned", None)
        if replanned and parallel.is_main:
            print(f"resume: the schedule planned for {replanned[0]} steps continues over train.steps={replanned[1]} "
                  "from where it is (the lr does not jump)")

    # -- checkpoints ----------------------------------------------------------------------
    @property
    def sharded(self) -> bool:
        """Checkpoints are directories of per-rank shards (an FSDP-sharded model)."""
        return self.parallel.strategy == "fsdp"

    def checkpoint_path(self, step: int | None = None) -> pathlib.Path | None:
        """Where the checkpoint of ``step`` (default: the current step) is (None without a run directory)."""
        if self.run_dir is None:
            return None
        at = self.step if step is None else step
        return sharded_path(self.run_dir, at) if self.sharded else checkpoint_path(self.run_dir, at)

    def checkpoint(self) -> pathlib.Path | None:
        """Write the checkpoint of the current step (collective: every rank calls it); its path."""
        if self.run_dir is None:
            return None
        par, s = self.parallel, self.settings
        if self.sharded:  # every rank writes its own shard; rank 0 completes the directory
            with par.ctx.guard("sharded checkpoint"):
                return save_sharded(self.run_dir, self.step, self.model, self.optimizer,
                                    sched_state=self.schedule.state_dict(),
                                    rng_states_this_rank={"sampler": self.generator.get_state()},
                                    theory=getattr(self.theory, "name", ""), config=self.config, keep=s.keep)
        states = par.gather_objects(self.generator.get_state())  # collective: every rank takes part
        path = checkpoint_path(self.run_dir, self.step)
        if par.is_main:
            rng = {"sampler": states[0], **{f"sampler_rank{r}": st for r, st in enumerate(states) if r}}
            path = save_checkpoint(self.run_dir, self.step, model=self.model.state_dict(),
                                   optim=self.optimizer.state_dict(), sched=self.schedule.state_dict(), rng=rng,
                                   theory=getattr(self.theory, "name", ""), config=self.config, keep=s.keep,
                                   attrs=self.checkpoint_attrs)
        par.barrier()  # the file is complete before any rank goes on (or exits)
        return path

    def _last_good(self) -> str:
        good = self.checkpoint_path(self.last_checkpoint) if self.last_checkpoint is not None else None
        return str(good) if good is not None else "none"

    # -- the loop ---------------------------------------------------------------------------
    def run(self, stop: Callable[[], bool] | None = None, stop_reason: str = "stop requested") -> dict:
        """Train until ``settings.steps`` (or a stop); checkpoint; evaluate. Returns the summary:
        ``step``, ``stop_reason`` (``completed``, ``train.max_time``, ``train.stop_after`` or
        ``stop_reason`` once ``stop()`` turned true), ``seconds`` (of this call), ``checkpoint``
        (its path or None) and the evaluation's ``ess``, ``log_z``, ``log_z_err``, ``eval_samples``,
        ``khat`` (and ``weights_warning``, ``evaluation`` notes). After a ``stop()`` the checkpoint
        is written and the evaluation skipped. A later call continues (each call is one
        invocation: ``stop_after`` and a budget without ``start_time`` count per call).

        Raises :class:`gaugeflow.errors.Diverged` after ``settings.max_nonfinite`` non-finite steps
        in a row or an error inside a step (naming the step and the last good checkpoint).
        """
        with self.parallel.physics():
            return self._run(stop, stop_reason)

    def _run(self, stop, stop_reason: str) -> dict:
        t, par, sched, opt = self.settings, self.parallel, self.schedule, self.optimizer
        batch, micro, max_time = self.batch, self.micro, t.max_time
        # what the losses differentiate (a stochastic fermion determinant, if the theory asks for it)
        action = getattr(self.theory, "training_action", None) or self.theory.action
        reason, in_a_row, done_here, stopped = "completed", 0, 0, False
        t0 = time.monotonic()  # this invocation's steps (rates); budgets count from start_time
        start = self.start_time if self.start_time is not None else t0
        ck_seconds = 0.0  # the last checkpoint write (kept in reserve before the budget ends)
        run_dir = self.run_dir
        metrics_path = run_dir / "metrics.csv" if run_dir is not None else None
        if run_dir is not None and par.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
        new_file = metrics_path is not None and not metrics_path.exists()
        if metrics_path is not None and par.is_main and not new_file:
            _check_metrics_header(metrics_path)
        logger = self.logger
        with contextlib.ExitStack() as stack:
            stack.enter_context(logger)
            fh = stack.enter_context(open(metrics_path, "a", newline="")) \
                if metrics_path is not None and par.is_main else None
            bar = stack.enter_context(self.progress(t.steps - self.step)) if self.progress is not None else _NoBar()
            writer = csv.DictWriter(fh, fieldnames=METRICS) if fh is not None else None
            if writer is not None and new_file:
                writer.writeheader()
            dt = 0.0
            while self.step < t.steps:
                if par.any(stop is not None and stop()):
                    reason, stopped = stop_reason, True
                    break
                # the next step and the checkpoint after it must fit in what is left of the budget
                if par.any(max_time is not None and time.monotonic() - start + dt + ck_seconds > max_time):
                    reason = "train.max_time"
                    break
                if t.stop_after is not None and done_here >= t.stop_after:
                    reason = "train.stop_after"
                    break
                ts = time.monotonic()
                lr = opt.param_groups[0]["lr"]  # the lr this step trains with
                try:
                    out, norm = accumulated_step(self.model, opt, self.loss, action, batch, micro, self.generator,
                                                 t.grad_clip, par)
                except (RuntimeError, torch.linalg.LinAlgError) as err:
                    if isinstance(err, PeerFailure):
                        raise
                    raise Diverged(f"training stopped at step {self.step + 1}: "
                                   f"{str(err).strip().splitlines()[0]}; last good checkpoint: "
                                   f"{self._last_good()}") from None
                if torch.isfinite(norm):
                    opt.step()
                    in_a_row = 0
                else:
                    # a non-finite loss or gradient: skip the update, keep the schedule on time
                    self.nonfinite_skipped += 1
                    in_a_row += 1
                self.step += 1
                done_here += 1
                if sched.resolved == "time" and max_time is not None and done_here >= 3:
                    # plan for the steps that fit in what is left of the budget at the rate so far
                    # (logging and checkpoints included), by rank 0's clock: replicas must share the lr
                    rate = (time.monotonic() - t0) / done_here
                    left = max(0.0, max_time - (time.monotonic() - start) - ck_seconds)
                    fit = par.broadcast_object(self.step + int(left / rate))
                    sched.plan(min(t.steps, fit))
                sched.step(out.loss.item())
                dt = time.monotonic() - ts
                if in_a_row >= t.max_nonfinite:
                    raise Diverged(f"training stopped at step {self.step}: {in_a_row} consecutive steps with a "
                                   f"non-finite loss or gradient (train.max_nonfinite); last good checkpoint: "
                                   f"{self._last_good()}")
                if self.step % t.log_every == 0 or self.step == t.steps:
                    row = batch_metrics(self.step, out, self.loss, self.model, self.theory, par,
                                        self.generator.device, t.seed, batch)
                    row.update(lr=lr, grad_norm=float(norm), seconds_per_step=dt,
                               samples_per_second=t.batch_size / dt, peak_memory_mb=peak_memory_mb(self.device),
                               nonfinite_skipped=self.nonfinite_skipped, restart=int(self._restart_pending))
                    self._restart_pending = False
                    if writer is not None:
                        writer.writerow(row)
                        fh.flush()
                    logger.log_metrics(row, self.step)
                    self._record(row, time.monotonic() - t0)
                    bar.advance(f"F={row['free_energy']:.4g} ess={row['ess']:.3f}")
                if self.step % t.checkpoint_every == 0 and run_dir is not None:
                    tc = time.monotonic()
                    self.checkpoint()
                    ck_seconds = time.monotonic() - tc
                    self.last_checkpoint = self.step
            if reason == "train.max_time":
                sched.end_plan()  # a budget stop ends a time plan: resuming starts a new cycle
            if run_dir is not None and (self.last_checkpoint != self.step or reason == "train.max_time"):
                self.checkpoint()
                self.last_checkpoint = self.step
            path = self.checkpoint_path()
            if fh is not None:
                fh.flush()
            seconds = time.monotonic() - t0
            if stopped:
                # the batch system kills soon after SIGTERM: the checkpoint is written, nothing more
                evaluation = {"evaluation": f"skipped ({stop_reason})"}
            else:
                deadline = None if max_time is None else start + max_time
                eval_batch = t.eval_batch_size or 4 * batch
                evaluation = evaluate(self.model, self.theory, par, t.eval_samples, eval_batch, t.seed, self.device,
                                      deadline, dt * eval_batch / max(batch, 1))
            summary = dict(step=self.step, stop_reason=reason, seconds=seconds,
                           checkpoint=None if path is None else str(path), **evaluation)
            if logger.active:
                logger.log_summary(summary)
                if self.plots is not None and run_dir is not None:
                    logger.log_images(self.plots(run_dir))
        return summary

    def _record(self, row: dict, seconds: float) -> None:
        self.last_metrics = row
        h = self.history
        h.step.append(int(row["step"]))
        h.loss.append(float(row["loss"]))
        h.ess.append(float(row["ess"]))
        h.seconds.append(seconds)
        h.rows.append(dict(row))


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


def accumulated_step(model, opt, loss_fn, action, batch: int, micro: int, gen, clip, par: Parallel | None = None):
    """Gradients of the batch loss accumulated over ``batch / micro`` chunks; returns (merged output, norm).

    Each chunk's mean loss is weighted by ``micro / batch``, so the sum is the batch mean. A
    non-finite chunk loss ends the step early with a NaN norm (the update is skipped); with
    several processes the ranks agree on it before any backward, so they skip the same step.
    The gradients are those of the global batch (reduced over ``par``), clipped to norm ``clip``
    (None: not clipped); the optimizer step is the caller's.
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
        samples=cat_fields([o.samples for o in outs]) if outs[0].samples is not None else None,
    )
    if not finite:
        return merged, torch.tensor(math.nan)
    if par is not None:
        par.reduce_gradients(model.parameters())
    return merged, clip_grad_norm(model.parameters(), clip)


def batch_metrics(step, out, loss_fn, model, theory, par: Parallel, device, seed, batch) -> dict:
    """The logged row's physics: free-energy bound, ESS and plaquette from draws of q.

    For a loss that does not sample q (forward KL) a fresh batch is drawn, from a stream
    keyed by (seed, step) so that logging never changes the training.
    """
    log_q, s, samples = out.log_q, out.action, out.samples
    if not getattr(loss_fn, "samples_from_model", True):
        g = torch.Generator(device=device).manual_seed(_eval_seed(par.seed(seed * 1_000_003 + step)))
        with torch.no_grad():
            samples, log_q = model.sample(min(batch, 256), g)
            s = theory.action(samples)
    if not getattr(getattr(theory, "training_action", None), "exact_value", True):
        # the training value is not the target's action (a stochastic determinant gradient): its
        # weights would describe another distribution, so the batch's physics columns stay empty
        s = torch.full_like(log_q, math.nan)
    # the global batch: per-sample values of every data-parallel replica
    log_q, s = par.gather_replicas(log_q.double()), par.gather_replicas(s.double())
    loss = par.gather_replicas(out.loss.detach().double().reshape(1)).mean()
    plaq = _mean_plaquette(theory, samples)
    plaq = par.gather_replicas(torch.tensor([plaq], dtype=torch.float64, device=log_q.device)).mean().item()
    log_w = -s - log_q
    return dict(step=step, loss=loss.item(), free_energy=(log_q + s).mean().item(),
                ess=effective_sample_size(log_w).item(), var_log_w=log_w.var().item(), plaquette=plaq)


def _mean_plaquette(theory, samples) -> float:
    if not getattr(theory, "is_gauge", False):
        return math.nan
    from gaugeflow.observables import mean_plaquette

    return mean_plaquette(links_of(samples)).mean().item()


def peak_memory_mb(device: torch.device) -> float:
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
def evaluate(model, theory, par: Parallel | None, n, batch, seed, device, deadline: float | None = None,
             first_estimate: float = 0.0) -> dict:
    """ESS, Pareto k-hat and log Z from ``n`` independent draws (each replica draws its share, in
    model calls of ``batch``), from a stream keyed by ``seed`` apart from training's. With a
    ``deadline`` (``time.monotonic()``), only the batches that fit are drawn; the summary says how
    many and why. ``par`` None: this process alone."""
    if n <= 0:
        return {}
    if par is None:
        par = single_process(_shape(theory), device)
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
