"""Typed schemas of the job configs (Hydra ConfigStore).

A misspelt key or a value of the wrong type fails while Hydra composes the
config, with Hydra's message naming the key, before any work starts. The component nodes
(theory, model, loss, optim, sched) take their keys from their YAML files; a key their
callable does not take fails at start-up naming it (:mod:`gaugeflow.components`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from gaugeflow.distributed.init import DistConf
from gaugeflow.monitor import LoggerConf


#: the theory node: the preset's keys (its builder's and the jobs' own, gaugeflow.components.PRESET_KEYS);
#: checked against the builder's signature at start-up, not here, so a plug-in theory brings its own keys
TheoryConf = Any
#: the model node: an architecture's ``_target_`` and keys (conf/model/<name>.yaml), checked the same way
ModelConf = Any

@dataclass
class LatticeConf:
    shape: List[int] = MISSING


@dataclass
class HMCConf:
    n_traj: int = 100
    n_therm: int = 20
    n_steps: int = 10
    traj_length: float = 1.0
    integrator: str = "omelyan"  # leapfrog | omelyan
    force: str = "analytic"  # analytic | autograd
    start: str = "hot"  # hot | cold
    chains: int = 1  # independent chains advanced as one batch
    save_every: int = 1
    measure_every: int = 1  # expensive measurements on every k-th stored configuration (NaN rows between)
    max_time: Optional[str] = None  # seconds or HH:MM:SS
    continue_from: Optional[str] = None  # ensemble file whose last configuration starts the chain
    flow_time: float = 0.0  # Wilson-flow time before measuring the 4d topological charge
    # theories with dynamical fermions (docs/hmc.md "Dynamical fermions"); others refuse them set
    gauge_steps: int = 1  # gauge-force steps per drift of the fermion scale (1: one time scale)
    cg_tol: float = 1e-10  # relative residual of every CG solve
    cg_maxiter: int = 10_000  # iterations before a solve fails (the job stops, exit 1)
    measure_logdet: bool = False  # pseudofermions: log det(D^dagger D) per stored configuration (dense)
    fermion_measurements: bool = True  # pion correlator and chiral condensate (measure_every schedule)
    precision: str = "float64"
    compression: Optional[str] = None  # null | gzip | gzip:<level> | lzf
    progress: bool = True


@dataclass
class HMCJob:
    theory: Any = None
    lattice: LatticeConf = field(default_factory=LatticeConf)
    hmc: HMCConf = field(default_factory=HMCConf)
    seed: int = 0
    device: str = "cpu"
    out: str = MISSING


@dataclass
class TrainConf:
    steps: int = 1000
    batch_size: int = 128
    micro_batch_size: Optional[int] = None  # gradient accumulation: batch_size in chunks of this many
    lr: float = 3e-3
    grad_clip: Optional[float] = None
    dtype: str = "float32"
    max_time: Optional[str] = None
    stop_after: Optional[int] = None
    max_nonfinite: int = 20  # consecutive skipped steps before the run stops
    log_every: int = 50
    checkpoint_every: int = 500
    keep: int = 3
    eval_samples: int = 1024
    eval_batch_size: Optional[int] = None  # draws per model call in the final evaluation; null: 4 x the per-replica batch
    progress: bool = True


@dataclass
class TrainJob:
    theory: Any = None
    lattice: LatticeConf = field(default_factory=LatticeConf)
    model: Any = None
    train: TrainConf = field(default_factory=TrainConf)
    # components built by _target_ with their own keys (gaugeflow.components): loss, optimizer, schedule
    loss: Any = None
    optim: Any = None
    sched: Any = None
    logger: LoggerConf = field(default_factory=LoggerConf)
    dist: DistConf = field(default_factory=DistConf)
    seed: int = 0
    device: str = "cpu"
    resume: Optional[str] = None
    init_from: Optional[str] = None  # a checkpoint or run directory whose weights start a new run
    allow_targets: List[str] = field(default_factory=list)  # extra _target_ prefixes a checkpoint may name


def register() -> None:
    cs = ConfigStore.instance()
    cs.store(name="hmc_schema", node=HMCJob)
    cs.store(name="train_schema", node=TrainJob)


