"""``gaugeflow sample``: draw from a trained flow and write an ensemble.

``sample.method=imh`` (default) runs the flow-based independence Metropolis chain of
Albergo, Kanwar & Shanahan (arXiv:1904.12072): the ensemble is the chain, exact for the
theory whatever the quality of the model. ``sample.method=reweight`` keeps the independent
draws for importance weighting with ``w = exp(log p - log q)``.

The model runs in ``sample.dtype`` (float64 by default, whatever the training dtype), so that
log q, like the action, is exact to float64 and the chain and the weights are what they claim.

With several ranks (``dist=ddp``) each rank draws its share of every step from its own stream,
computes the action and the observables of its own draws, and writes its own configurations
into a part file; only per-configuration scalars travel to rank 0, which runs the chain and
writes the ensemble file, whose field dataset is an HDF5 virtual dataset over the parts.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import sys
import time
from dataclasses import dataclass, field
from typing import Any, List, Optional

import h5py
import hydra
import numpy as np
import torch
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from gaugeflow.cli.build import parallel_from_config, theory_from_config
from gaugeflow.cli.common import (CONFIG_DIR, UsageError, guarded, parse_duration, require, resolve_device,
                                  resolve_dtype, stop_on_sigterm)
from gaugeflow.cli.progress import progress_bar
from gaugeflow.cli.report import Row, estimate_rows, ess_row, khat_row, log_z_row, table, warn
from gaugeflow.cli.report import format_khat  # noqa: F401  (re-exported: formerly defined here)
from gaugeflow.cli.restore import restore_config, restore_model, sha256_file, training_dtype
from gaugeflow.cli.schema import LatticeConf, ModelConf, TheoryConf
from gaugeflow.distributed.init import DistConf
from gaugeflow.exact import reference_values
from gaugeflow.fermions.fields import JointField, links_of
from gaugeflow.io.ensemble import EnsembleWriter, parse_compression
from gaugeflow.io.provenance import provenance
from gaugeflow.components import instantiate_node
from gaugeflow.sampling.hmc import marginal_action
from gaugeflow.sampling.imh import block_entries, gather_chain
from gaugeflow.sampling.statistics import gamma_method
from gaugeflow.sampling.summary import summarize, topology
from gaugeflow.sampling.weights import log_z_estimate, weight_diagnostics

#: the chain ``sample.method=imh`` runs when ``sample.sampler`` is not given
IMH = {"_target_": "gaugeflow.sampling.imh.IndependenceMetropolis"}


@dataclass
class SampleConf:
    method: str = "imh"  # imh | reweight | a plug-in chain's name: the `sampler` attribute of the file
    # the chain over the proposals' log weights, built by _target_ with a CPU generator
    # (docs/extending.md); null with method=reweight: independent draws kept with their weights
    sampler: Any = None
    n: int = 4096
    batch_size: int = 256
    dtype: str = "float64"  # the model's precision while sampling (float32: complex64 links, half the file)
    flow_time: Optional[float] = None  # null: theory.default_flow_time where the theory has one, else 0
    max_time: Optional[str] = None  # seconds or HH:MM:SS from the job's start; null: no limit
    compression: Optional[str] = None  # HDF5 filter: gzip, gzip:<level>, lzf; null: none
    progress: bool = True
    # theories with dynamical fermions (docs/fermions.md): pion correlator and chiral condensate of
    # every draw; the pseudofermion fields of a joint model as the dataset `pseudofermion`
    fermion_measurements: bool = True
    keep_pseudofermion: bool = False


@dataclass
class SampleJob:
    theory: TheoryConf = None
    lattice: LatticeConf = field(default_factory=LatticeConf)
    model: ModelConf = None
    sample: SampleConf = field(default_factory=SampleConf)
    checkpoint: Optional[str] = None
    allow_targets: List[str] = field(default_factory=list)  # _target_ prefixes beyond gaugeflow. and torch.
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


def _job_clock():
    """Seconds since the job started (the batch system's walltime counts from the launch)."""
    try:
        from gaugeflow.cli.common import job_elapsed
    except ImportError:  # an older common.py: count from the first call
        t0 = time.monotonic()
        return lambda: time.monotonic() - t0
    return job_elapsed


def run_sample(cfg: DictConfig) -> dict:
    """Run the job described by ``cfg``; returns the summary it wrote to summary.json (empty on ranks
    other than 0).

    SIGTERM (the batch system's warning before its kill) ends the job cleanly whenever it comes,
    with the file written: after the current batch, or before the first one during start-up.
    """
    with stop_on_sigterm() as sigterm:
        return _run_sample(cfg, sigterm)


def _run_sample(cfg: DictConfig, sigterm) -> dict:
    clock = _job_clock()
    s = cfg.sample
    require(bool(cfg.checkpoint), "checkpoint=<checkpoint file or run directory> is required")
    builtin = s.get("sampler") is None or OmegaConf.select(s, "sampler._target_") == IMH["_target_"]
    require(s.method in ("imh", "reweight") or not builtin,
            f"sample.method must be imh or reweight, got {s.method!r} (a plug-in chain: sample.sampler._target_ "
            "and its own name)")
    require(s.n >= 1, f"sample.n must be >= 1, got {s.n}")
    require(s.batch_size >= 1, f"sample.batch_size must be >= 1, got {s.batch_size}")
    dtype = resolve_dtype(str(s.dtype), "sample.dtype")
    max_time = parse_duration(s.max_time, "sample.max_time")
    require(s.flow_time is None or float(s.flow_time) >= 0, f"sample.flow_time must be >= 0, got {s.flow_time}")
    try:
        compression = parse_compression(s.compression, "sample.compression")
    except ValueError as err:
        raise UsageError(str(err)) from None
    if cfg.dist.strategy == "none":
        resolve_device(cfg.device)  # a clear error for an absent cuda/xpu
    where = f"checkpoint={cfg.checkpoint}"
    cfg, ck = restore_config(cfg, cfg.checkpoint, "checkpoint", load=("model",))
    require(cfg.dist.strategy in ("none", "ddp"), f"sample: dist.strategy must be none or ddp, got {cfg.dist.strategy!r}")
    require(not cfg.dist.lattice_grid, "sample: dist.lattice_grid is not supported (whole configurations per rank)")
    par = parallel_from_config(cfg)
    try:
        summary = _sample(cfg, ck, where, par, dtype, max_time, clock, sigterm, compression)
        par.barrier()  # no rank tears the process group down while a peer still talks to it
        return summary
    finally:
        par.ctx.shutdown()


def target_record(cfg: DictConfig, ck) -> dict:
    """``{key: {"trained", "target"}}`` for every theory key and the lattice shape in which this job's
    target differs from what the flow was trained at (a flow as the proposal for a nearby target)."""
    try:
        from gaugeflow.cli.restore import target_changes
    except ImportError:  # an older restore.py
        return {}
    return {k: {"trained": a, "target": b} for k, (a, b) in target_changes(cfg, ck).items()}


def target_line(record: dict) -> str | None:
    """One report line naming what differs from the training, or None."""
    if not record:
        return None
    return "  target differs from the training: " + ", ".join(
        f"{k} {v['trained']} -> {v['target']}" for k, v in record.items())


def sample_flow_time(cfg: DictConfig) -> float:
    """``sample.flow_time``, or the theory's ``default_flow_time`` where it has one, else 0."""
    t = cfg.sample.flow_time
    if t is None:
        t = OmegaConf.select(cfg, "theory.default_flow_time", default=None)
    return 0.0 if t is None else float(t)


def _sample(cfg: DictConfig, ck, where: str, par, dtype: torch.dtype, max_time: float | None, clock,
            sigterm, compression: tuple[str | None, int | None]) -> dict:
    """Every rank draws its share of each step from its own stream and measures it; rank 0 gathers the
    per-configuration scalars (rank order), runs the chain and writes the ensemble file."""
    s = cfg.sample
    device = par.ctx.device
    theory = theory_from_config(cfg)
    model = restore_model(cfg, theory, ck, device, where, dtype=dtype)
    trained = training_dtype(ck, where)
    field_dtype = theory.field_dtype(dtype)
    flow_time = sample_flow_time(cfg)
    exact = reference_values(theory)

    gen = torch.Generator(device=device).manual_seed(par.seed(int(cfg.seed)))
    meas_gen = torch.Generator(device=device).manual_seed(_imh_seed(par.seed(int(cfg.seed)) + 1))
    chain = None
    if s.method != "reweight":
        node = s.get("sampler") if s.get("sampler") is not None else IMH
        chain = instantiate_node(node, "sample.sampler", generator=torch.Generator().manual_seed(_imh_seed(int(cfg.seed))))
    target = target_record(cfg, ck)
    attrs = theory.attributes()
    attrs.update(
        config=OmegaConf.to_yaml(cfg, resolve=True),
        target_changes=json.dumps(target),
        seed=int(cfg.seed),
        sampler=str(s.method),
        checkpoint=str(ck.path.resolve()),
        checkpoint_sha256=sha256_file(ck.path),
        checkpoint_step=int(ck.step),
        model_dtype=str(dtype).removeprefix("torch."),
        training_dtype=str(trained).removeprefix("torch."),
        flow_time=flow_time,
    )
    field_name = "links" if theory.is_gauge else "phi"
    n, bs = int(s.n), int(s.batch_size)
    world = par.world if par.active else 1
    rank = par.rank if par.active else 0
    fermion = _fermion_plan(s, theory, model, world)
    if fermion:
        attrs.update(fermion_measurements=fermion["measure"], joint_model=fermion["joint"])
    log_w_parts: list[torch.Tensor] = []
    series: dict[str, list[np.ndarray]] = {}
    carried: dict[str, torch.Tensor] | None = None  # rank 0: the chain's current scalars
    carrier, carried_field = 0, None  # which rank holds the chain's current configuration, and it
    done, reason = 0, "completed"
    show = bool(s.progress) and sys.stdout.isatty() and par.is_main
    running = _RunningESS()
    # configurations in chunks of many (sized for this rank's share), compressed as asked
    options = {"compression": None if compression[0] is None else str(s.compression), "expected": -(-n // world)}
    # rank 0's path: the default out= lies in rank 0's run directory (other ranks make none)
    out = _Output(par.broadcast_object(str(cfg.out)), field_name, theory.field_shape(1)[1:], field_dtype, attrs, par, world, rank, options)
    step_seconds = 0.0
    t0 = time.monotonic()
    with out, progress_bar(show, math.ceil(n / bs), "sample") as bar, torch.no_grad():
        while done < n:
            if par.any(sigterm()):
                reason = "SIGTERM"
                break
            # the next step must fit in the budget; the first always runs (a file with data)
            if done and par.any(max_time is not None and clock() + step_seconds > max_time):
                reason = "sample.max_time"
                break
            ts = time.monotonic()
            mine = min(bs, -(-(n - done) // world))  # every rank draws this many: the streams stay aligned
            b = min(mine * world, n - done)  # proposals kept this step: rank r's block is rows r*mine ...
            keep = max(0, min(mine, b - rank * mine))
            x, log_q = model.sample(mine, gen)
            phi = x.phi if fermion and fermion["joint"] else None
            x = links_of(x)
            # weights and observables in float64 on the configurations as drawn, each rank its own
            x64 = x.to(theory.field_dtype(torch.float64))
            if phi is not None:  # a joint model: the joint action S_G + phi^dagger (D^dagger D)^-1 phi
                parts = theory.action.joint_parts(JointField(x64, phi.to(x64.dtype)))
                action = (parts["gauge_action"] + parts["pseudofermion_action"]).double()
            elif fermion:  # the links' marginal S_G - log det(D^dagger D), with its two parts
                parts = _marginal_parts(theory, x64)
                action = parts["gauge_action"] - parts["fermion_logdet"]
            else:
                action, parts = marginal_action(theory, x64).double(), {}
            values = {"log_q": log_q.double(), "action": action, **{k: v.double() for k, v in parts.items()},
                      **{k: v.double() for k, v in theory.measure(x64, flow_time).items()}}
            if fermion and fermion["measure"]:
                # stochastic estimators draw from their own stream: measuring never changes the proposals
                values.update({k: v.double() for k, v in theory.action.measurements(x64, meas_gen).items()})
            # only per-configuration values travel, in rank order, trimmed to what is kept
            values = _gather_rows(par, values, b)
            current = None
            if par.is_main:
                log_q_all, action_all = values["log_q"], values["action"]
                log_w = -action_all - log_q_all
                log_w_parts.append(log_w.cpu())
                cols = {"log_q": log_q_all, "log_p": -action_all, "action": action_all,
                        **{k: v for k, v in values.items() if k not in ("log_q", "action")}}
                if phi is not None:
                    # the file keeps links: their marginal action is not computed, the weight is the joint one
                    del cols["action"]
                if phi is not None and fermion["keep"]:
                    cols["pseudofermion"] = phi[:b]
                if chain is not None:
                    accepted, current = chain.step(log_w)
                    # the chain's states: rejected steps repeat the previous configuration with its
                    # own log q and log p (the bookkeeping NeuMC got wrong)
                    cols = {k: gather_chain(current, done, v, None if carried is None else carried[k])
                            for k, v in cols.items()}

                    carried = {k: v[-1:] for k, v in cols.items()}
                    cols["accepted"] = accepted
                    cols["proposal"] = current
            fields = x[:keep]
            if chain is not None:
                if par.active:
                    current = _broadcast_indices(par, current, b, device)
                fields, carrier, carried_field = _chain_rows(par, world, rank, x, keep, current, done, mine, b,
                                                            carrier, carried_field)
            out.append(fields, b, mine, cols if par.is_main else None)
            if par.is_main:
                for k, v in cols.items():
                    if k not in ("log_q", "log_p", "action", "proposal", "pseudofermion") and v.ndim == 1:
                        series.setdefault(k, []).append(v.detach().cpu().double().numpy())
            done += b
            step_seconds = time.monotonic() - ts
            if show:
                running.add(log_w)
                bar.advance(f"ess={running.ess:.3f}" + ("" if chain is None else f" acc={chain.acceptance:.2f}"))
        seconds = time.monotonic() - t0
        summary = {}
        if par.is_main:
            log_w = torch.cat(log_w_parts) if log_w_parts else torch.empty(0, dtype=torch.float64)
            volume = math.prod(int(v) for v in theory.lattice.shape)
            summary, names = _summarise(series, log_w, chain is not None, exact, volume)
            out.set_attrs(n_proposals=done, stop_reason=reason, seconds=seconds, ess=_nan(summary["ess"]),
                          khat=_nan(summary["khat"]), acceptance=_nan(summary["acceptance"]),
                          log_z=_nan(summary["log_z"]), log_z_err=_nan(summary["log_z_err"]))
    if not par.is_main:
        return {}
    summary.update(method=str(s.method), n=done, stop_reason=reason, flow_time=flow_time, target_changes=target,
                   model_dtype=str(dtype).removeprefix("torch."), checkpoint=str(ck.path.resolve()),
                   out=str(out.path))
    write_summary(summary)
    _report(theory, s.method, summary, names, ck, seconds, reason, out, flow_time)
    return summary


def _fermion_plan(s, theory, model, world: int) -> dict | None:
    """What a theory with dynamical fermions adds to the file (None for other theories)."""
    from gaugeflow.flows.joint import JointModel

    act = theory.action
    joint = isinstance(getattr(model, "module", model), JointModel)
    keep = bool(s.keep_pseudofermion)
    if not hasattr(act, "fermion_logdet"):
        require(not keep, "sample.keep_pseudofermion=true: this theory has no pseudofermions")
        return None
    require(not keep or joint, "sample.keep_pseudofermion=true: this model draws no pseudofermions (a joint model "
                               "does: model=joint with theory.fermions=pseudofermion)")
    require(not keep or world == 1, "sample.keep_pseudofermion=true is written by single-process runs (dist=none)")
    return {"joint": joint, "keep": keep, "measure": bool(s.fermion_measurements)}


def _marginal_parts(theory, links: torch.Tensor) -> dict[str, torch.Tensor]:
    """``gauge_action`` and ``fermion_logdet`` (dense) of draws of a theory with fermions."""
    act = theory.action
    return {"gauge_action": act.gauge_action(links).double(), "fermion_logdet": act.fermion_logdet(links).double()}


def _gather_rows(par, values: dict[str, torch.Tensor], b: int) -> dict[str, torch.Tensor]:
    """Per-configuration values (``(batch, ...)`` each) of every rank in rank order, the first ``b``
    rows (one collective for all of them; rows of several values, e.g. a correlator, travel flat)."""
    shapes = {k: v.shape[1:] for k, v in values.items()}
    flat = torch.cat([v.reshape(v.shape[0], -1) for v in values.values()], 1)
    if par.active:
        flat = par.gather_replicas(flat)
    flat = flat[:b]
    out, i = {}, 0
    for k, shape in shapes.items():
        w = math.prod(shape)
        out[k] = flat[:, i:i + w].reshape(flat.shape[0], *shape)
        i += w
    return out


def _broadcast_indices(par, current: torch.Tensor | None, b: int, device) -> torch.Tensor:
    """Rank 0's chain indices of this step on every rank (``b`` int64s: small beside the draws)."""
    import torch.distributed as dist

    buf = current.to(device) if par.is_main else torch.empty(b, dtype=torch.int64, device=device)
    with par.ctx.guard("broadcast of the chain"):
        dist.broadcast(buf, 0)
    return buf.cpu()


def _chain_rows(par, world: int, rank: int, x: torch.Tensor, keep: int, current: torch.Tensor, done: int,
                mine: int, b: int, carrier: int, carried_field: torch.Tensor | None):
    """This rank's rows of the chain for this step (its block of chain positions), and who holds the
    chain's configuration afterwards.

    Row ``i`` of the chain is proposal ``current[i] <= i``: a proposal of this rank's own block, or
    the state the chain was in when the block began, a single configuration that comes from the rank
    that drew it (or from the rank that carries the state over from an earlier step). So no rank
    ever holds more than its own draws plus one configuration.
    """
    entries = block_entries(current, done, mine, world)

    def owner(index: int) -> int:
        return (index - done) // mine if index >= done else carrier

    def config(index: int) -> torch.Tensor:
        return x[index - done - rank * mine] if index >= done else carried_field[0]

    entering = None
    need = entries[rank].entering
    if par.active:
        import torch.distributed as dist

        from gaugeflow.distributed.wire import from_wire, to_wire

        ops, keep_alive = [], []
        recv = None
        if need is not None and owner(need) != rank:
            recv = torch.empty(x.shape[1:], dtype=x.dtype, device=x.device)
            wire = to_wire(recv)
            keep_alive.append(wire)
            ops.append(dist.P2POp(dist.irecv, wire, owner(need)))
        for r, entry in enumerate(entries):
            if r != rank and entry.entering is not None and owner(entry.entering) == rank:
                wire = to_wire(config(entry.entering).contiguous())
                keep_alive.append(wire)
                ops.append(dist.P2POp(dist.isend, wire, r))
        if ops:
            with par.ctx.guard("exchange of the chain's configurations"):
                for req in dist.batch_isend_irecv(ops):
                    req.wait()
        if recv is not None:
            entering = from_wire(keep_alive[0], x.dtype).reshape(x.shape[1:])
    if need is not None and entering is None:
        entering = config(need)
    rows = x[:0]
    if keep:
        mine_current = current[rank * mine: rank * mine + keep]
        rows = gather_chain(mine_current, done + rank * mine, x[:keep], entering)
    # the chain's state after this step: a proposal of this step stays with the rank that drew it
    last = int(current[b - 1])
    if last >= done:
        carrier = owner(last)
        carried_field = x[last - done - rank * mine: last - done - rank * mine + 1].clone() \
            if carrier == rank else None
    return rows, carrier, carried_field


class _Output:
    """Where the configurations go: one ensemble file (single process), or per-rank part files plus
    rank 0's ensemble file whose field dataset is a virtual dataset over them (several ranks)."""

    def __init__(self, path, field_name: str, field_shape, field_dtype: torch.dtype, attrs: dict, par,
                 world: int, rank: int, options: dict):
        self.path = pathlib.Path(path)
        self.par, self.world, self.rank = par, world, rank
        self.main = self.part = None
        self.n = 0
        if world == 1:
            self.main = self.part = EnsembleWriter(self.path, field_name, field_shape, field_dtype, attrs, **options)
            return
        parts = [part_name(self.path, r, world) for r in range(world)]
        part_attrs = {k: attrs[k] for k in ("theory", "kind", "group", "shape") if k in attrs}
        part_attrs.update({k: v for k, v in attrs.items() if k not in part_attrs and k != "config"
                           and isinstance(v, (int, float, str))})
        part_attrs.update(part_of=self.path.name, rank=rank, n_parts=world)
        try:
            if rank == 0:
                self.main = VirtualEnsembleWriter(self.path, field_name, field_shape, field_dtype, attrs, parts,
                                                  options.get("compression"))
            self.part = EnsembleWriter(self.path.parent / parts[rank], field_name, field_shape, field_dtype,
                                       part_attrs, **options)
        except BaseException:
            if self.main is not None:
                self.main.abort()
            raise

    def append(self, fields: torch.Tensor, b: int, block: int, cols: dict | None) -> None:
        """This rank's chain rows ``fields`` of a step of ``b`` configurations in blocks of ``block``;
        ``cols``: rank 0's per-configuration values of the whole step."""
        if self.world == 1:
            self.main.append(fields, **cols)
        else:
            if fields.shape[0]:
                self.part.append(fields)
            if self.main is not None:
                self.main.append(b, block, **cols)
        self.n += b

    def set_attrs(self, **attrs) -> None:
        if self.main is not None:
            self.main.set_attrs(**attrs)

    def __enter__(self) -> "_Output":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            if self.part is not None and self.part is not self.main:
                self.part.abort()
            if self.main is not None:
                self.main.abort()
            return
        if self.world == 1:
            self.main.close()
            return
        self.part.close()
        self.par.barrier()  # every part has its final name before the ensemble file points at them
        if self.main is not None:
            self.main.close()


def part_name(path: pathlib.Path, rank: int, world: int) -> str:
    """The part file of ``rank`` beside the ensemble file ``path``, relative to its directory."""
    return f"{path.name}.parts/part_{rank:05d}_of_{world:05d}.h5"


def _attr_value(v: Any) -> Any:
    # the attribute conventions of gaugeflow.io.ensemble (strings as UTF-8 str, lists as arrays)
    if isinstance(v, str):
        return v
    if isinstance(v, bool):
        return np.bool_(v)
    if isinstance(v, (list, tuple)):
        return np.asarray(v, dtype=np.int64 if all(isinstance(x, (int, np.integer)) for x in v) else np.float64)
    return v


class VirtualEnsembleWriter:
    """Rank 0's ensemble file of a multi-rank ``sample``: attributes and per-configuration datasets as
    :class:`~gaugeflow.io.ensemble.EnsembleWriter` writes them, and the field dataset as an HDF5
    virtual dataset mapping each step's blocks of rows to the part files the ranks wrote.

    Readers (``read_ensemble``, plain h5py, h5dump) see one dataset ``links`` / ``phi`` of shape
    ``(n_cfg, ...)``. The parts are named relative to the file (HDF5 looks for them beside it), so
    the file and its ``<name>.parts/`` directory move together. Rows whose part is missing read as
    NaN (the fill value), never as plausible zeros.
    """

    def __init__(self, path, field_name: str, field_shape, field_dtype: torch.dtype, attrs: dict,
                 parts: list[str], compression: str | None = None):
        self.compression = parse_compression(compression)
        self.path = pathlib.Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        self.field_name = field_name
        self.field_shape = tuple(int(s) for s in field_shape)
        self.np_dtype = torch.empty(0, dtype=field_dtype).numpy().dtype
        self.parts = list(parts)
        self.file = h5py.File(self.tmp, "w")
        for k, v in {**provenance(), **attrs}.items():
            self.file.attrs[k] = _attr_value(v)
        if self.compression[0] is not None:
            self.file.attrs["compression"] = str(compression)  # of the parts' configurations and the columns
        self.file.attrs["n_parts"] = len(self.parts)
        self.file.attrs["parts_dir"] = str(pathlib.PurePosixPath(self.parts[0]).parent)
        #: per part: (row in the ensemble, row in the part, rows) of every block it wrote
        self.runs: list[list[tuple[int, int, int]]] = [[] for _ in self.parts]
        self.part_rows = [0] * len(self.parts)
        self.columns: dict[str, h5py.Dataset] = {}
        self.n = 0

    def append(self, b: int, block: int, **columns) -> None:
        """A step of ``b`` configurations, part ``r`` holding rows ``r*block ...`` of it, with their
        per-configuration values."""
        for r in range(len(self.parts)):
            k = max(0, min(block, b - r * block))
            if k:
                self.runs[r].append((self.n + r * block, self.part_rows[r], k))
                self.part_rows[r] += k
        for name, val in columns.items():
            v = np.asarray(val.detach().cpu().numpy() if torch.is_tensor(val) else val)
            v = v.reshape(b, *v.shape[1:]) if v.ndim > 1 else v.reshape(b)  # (b, ...): e.g. a correlator
            if name not in self.columns:
                if self.n:
                    raise ValueError(f"column {name!r} appeared after {self.n} configurations")
                filters = {} if self.compression[0] is None else {
                    "compression": self.compression[0], "compression_opts": self.compression[1], "shuffle": True}
                self.columns[name] = self.file.create_dataset(name, shape=(0, *v.shape[1:]), maxshape=(None, *v.shape[1:]),
                                                              dtype=v.dtype, chunks=True, **filters)
            ds = self.columns[name]
            ds.resize(self.n + b, axis=0)
            ds[self.n:] = v
        self.n += b

    def set_attrs(self, **attrs) -> None:
        for k, v in attrs.items():
            self.file.attrs[k] = _attr_value(v)

    def _virtual_dataset(self) -> None:
        shape = (self.n, *self.field_shape)
        if self.n == 0:
            self.file.create_dataset(self.field_name, shape=shape, dtype=self.np_dtype)
            return
        zeros, ones = (0,) * len(self.field_shape), (1,) * len(self.field_shape)
        dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
        dcpl.set_fill_value(np.full((), np.nan, dtype=self.np_dtype))
        for r, runs in enumerate(self.runs):
            if not runs:
                continue
            src_shape = (self.part_rows[r], *self.field_shape)
            for start, stride, count, block, part_start in merge_runs(runs):
                vspace = h5py.h5s.create_simple(shape)
                vspace.select_hyperslab((start, *zeros), (count, *ones), (stride, *ones), (block, *self.field_shape))
                src = h5py.h5s.create_simple(src_shape)
                src.select_hyperslab((part_start, *zeros), (count * block, *self.field_shape))
                dcpl.set_virtual(vspace, self.parts[r].encode(), self.field_name.encode(), src)
        space = h5py.h5s.create_simple(shape)
        h5py.h5d.create(self.file.id, self.field_name.encode(), h5py.h5t.py_create(self.np_dtype), space,
                        dcpl=dcpl)

    def close(self) -> pathlib.Path:
        """Write the virtual field dataset, finish the file and move it to its final name."""
        self._virtual_dataset()
        self.file.attrs["n_cfg"] = self.n
        self.file.close()
        os.replace(self.tmp, self.path)
        self._remove_stale_parts()
        return self.path

    def _remove_stale_parts(self) -> None:
        # parts of an earlier run with another number of ranks, no longer referenced
        folder = self.path.parent / pathlib.PurePosixPath(self.parts[0]).parent
        mine = {pathlib.PurePosixPath(p).name for p in self.parts}
        for p in folder.glob("part_*_of_*.h5"):
            if p.name not in mine:
                p.unlink(missing_ok=True)

    def abort(self) -> None:
        try:
            self.file.close()
        finally:
            self.tmp.unlink(missing_ok=True)


def merge_runs(runs: list[tuple[int, int, int]]) -> list[tuple[int, int, int, int, int]]:
    """Runs ``(row, part_row, rows)`` of one part, in order, as few strided hyperslabs as possible:
    ``(start, stride, count, block, part_start)`` = ``count`` blocks of ``block`` rows every ``stride``
    rows of the ensemble, consecutive in the part (one per run of equal steps, not one per step).

    >>> merge_runs([(0, 0, 4), (12, 4, 4), (24, 8, 4), (36, 12, 2)])
    [(0, 12, 3, 4, 0), (36, 2, 1, 2, 12)]
    """
    out: list[list[int]] = []
    for row, part_row, rows in runs:
        if out:
            g = out[-1]
            start, stride, count, block, part_start = g
            last = start + (count - 1) * stride
            if rows == block and part_row == part_start + count * block and (
                    (count == 1 and row - last >= block) or (count > 1 and row - last == stride)):
                if count == 1:
                    g[1] = row - last
                g[2] += 1
                continue
        out.append([row, rows, 1, rows, part_row])
    return [tuple(g) for g in out]


class _RunningESS:
    """Kish ESS of all weights so far, updated per batch in log space (for the progress line)."""

    def __init__(self):
        self.lse1 = self.lse2 = torch.tensor(-math.inf, dtype=torch.float64, device="cpu")
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


def _summarise(series, log_w: torch.Tensor, is_chain: bool, exact: dict, volume: int) -> tuple[dict, list[str]]:
    cat = {k: np.concatenate(v) for k, v in series.items()}
    n = log_w.numel()
    out: dict = {}
    accepted = cat.pop("accepted", None)
    weights = None if is_chain else log_w.numpy()
    obs = summarize(cat, log_w=weights)
    if "topological_charge" in cat:
        obs.update(topology(cat["topological_charge"], volume, weights))
    for k, est in obs.items():
        out[k] = {"mean": est.mean, "err": est.err, "tau_int": est.tau_int}
        if k in exact:
            out[k]["exact"] = exact[k]
    diag = weight_diagnostics(log_w)
    out["ess"], out["khat"], out["n_eff"] = diag["ess"], diag["khat"], diag["n_eff"]
    out["weights_warning"] = diag["warning"]
    if accepted is not None and accepted.size:
        acc = gamma_method(accepted.astype(np.float64))
        out["acceptance"], out["acceptance_err"], out["acceptance_tau_int"] = acc.mean, acc.err, acc.tau_int
    else:
        out["acceptance"], out["acceptance_err"], out["acceptance_tau_int"] = None, None, None
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


def _report(theory, method, summary, names, ck, seconds, reason, out, flow_time: float = 0.0) -> None:
    params = ", ".join(f"{k}={v}" for k, v in theory.params.items() if k not in ("c0",))
    what = {"imh": "IMH steps", "reweight": "independent draws (reweighted)"}.get(method, f"{method} chain steps")
    head = [f"sample {theory.name} ({params}) shape={list(theory.lattice.shape)}: {summary['n']} {what} from "
            f"{ck.path} (step {ck.step}) in {seconds:.1f} s, model in {summary['model_dtype']}"
            + ("" if reason == "completed" else f" (stopped by {reason})")]
    if target_line(summary["target_changes"]):
        head.append(target_line(summary["target_changes"]))
    rows = [ess_row(summary["ess"], summary["n_eff"], summary["n"]), khat_row(summary["khat"])]
    if summary["acceptance"] is not None:
        rows += estimate_rows({"accepted": {"mean": summary["acceptance"], "err": summary["acceptance_err"],
                                            "tau_int": summary["acceptance_tau_int"]}})
    if summary["log_z"] is not None:
        rows.append(log_z_row(summary["log_z"], summary["log_z_err"], summary.get("log_z_exact")))
        rows.append(Row("F_q = <log q + S>_q", f"{summary['free_energy_bound']:.6g}   (>= -log Z)"))
    # the rows `gaugeflow analyze` prints for the file: same names, same exact values, same column width
    rows += estimate_rows({name: summary[name] for name in names}, {k: v["exact"] for k, v in summary.items()
                                                                      if k in names and "exact" in v},
                          ndim=theory.lattice.ndim, flow_time=flow_time)
    print("\n".join([*head, *table(rows), f"wrote {out.n} configurations to {out.path}"]))
    sys.stdout.flush()
    warn(summary["weights_warning"], "sample")


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="sample")
def main(cfg: DictConfig) -> None:
    guarded(run_sample)(cfg)
