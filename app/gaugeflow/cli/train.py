"""``gaugeflow train``: fit a flow to a theory; HDF5 checkpoints, resumable, metrics in CSV.

The job composes the config, builds the components (theory, model, loss, optimizer, schedule),
restores them from a checkpoint (``resume=``, ``init_from=``) and reports; the training itself is
:class:`gaugeflow.train.trainer.Trainer`.
"""

from __future__ import annotations

import pathlib
import sys

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from gaugeflow.cli.build import (
    model_from_config,
    parallel_from_config,
    resolve_model_config,
    resolve_training_config,
    theory_from_config,
)
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
from gaugeflow.cli.progress import progress_bar
from gaugeflow.cli.restore import restore_config, sha256_file, state_dict_mismatch
from gaugeflow.cli.schema import register
from gaugeflow.components import instantiate_node
from gaugeflow.distributed.parallel import Parallel
from gaugeflow.errors import Diverged
from gaugeflow.exact import reference_values
from gaugeflow.io.checkpoint import CheckpointError
from gaugeflow.io.sharded import load_sharded
from gaugeflow.monitor import build_logger
from gaugeflow.train.trainer import Trainer, TrainSettings, replica_batch

register()


def _settings(cfg: DictConfig, max_time: float | None = None) -> TrainSettings:
    """The trainer's settings from ``cfg.train`` (and ``cfg.seed``); bad values are one-line usage errors."""
    return TrainSettings.from_mapping(OmegaConf.to_container(cfg.train, resolve=True), max_time=max_time,
                                      seed=int(cfg.seed))


def _check(cfg: DictConfig) -> None:
    t = cfg.train
    require(not (cfg.resume and cfg.init_from), "give resume= (continue a run) or init_from= (a new run from "
            "trained weights), not both")
    require(t.lr > 0, f"train.lr must be > 0, got {t.lr}")
    _settings(cfg)  # the train.* keys the trainer takes (TrainSettings checks them)


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
    settings = _settings(cfg, max_time)
    replica_batch(par, settings)  # a global batch the replicas do not divide is rounded up
    t.batch_size = settings.batch_size  # what the config, checkpoints and metrics record
    require(par.decomp is None or cfg.loss.name != "forward_kl",
            "loss=forward_kl does not support dist.lattice_grid (the ensemble is not decomposed)")

    with par.physics():
        # the initial weights come from torch's global generator: seed it for reproducible runs
        torch.manual_seed(int(cfg.seed))
        theory = theory_from_config(cfg, par.local_shape)
        resolve_model_config(cfg, theory)  # checkpoints record the architecture in full
        resolve_training_config(cfg)  # ... and the loss, optimizer and schedule
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
        show = bool(t.progress) and sys.stdout.isatty() and par.is_main
        trainer = Trainer(theory, model, loss_fn, opt, sched, settings, parallel=par, generator=gen, step=step,
                          resumed=ck is not None, run_dir=run_dir, config=OmegaConf.to_yaml(cfg, resolve=True),
                          checkpoint_attrs=extra, start_time=JOB_START,
                          progress=lambda total: progress_bar(show, total, "train"), plots=_training_plots)
        # started once the run is set up (a bad schedule or batch fails before wandb starts)
        trainer.logger = build_logger(cfg.logger, run_dir, OmegaConf.to_container(cfg, resolve=True), rank=par.rank,
                                      job_type="train")
        with stop_on_sigterm() as sigterm:
            summary = trainer.run(stop=sigterm, stop_reason="SIGTERM")
        if par.is_main:  # inside the physics: the whole lattice's shape and exact values
            _report(theory, summary, trainer.last_metrics, par)
    return summary


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


def _training_plots(run_dir: pathlib.Path) -> dict[str, pathlib.Path]:
    """Loss, ESS and lr against step as PNGs in <run dir>/plots (for the logger)."""
    from gaugeflow.cli.analyze import plot_training, read_metrics

    written: list[pathlib.Path] = []
    try:
        plot_training(read_metrics(run_dir), run_dir / "plots", written)
    except UsageError:  # no metrics row yet (a run stopped before its first log step)
        return {}
    return {pathlib.Path(p).stem: p for p in written}


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
