"""Typed schemas of the job configs (Hydra ConfigStore).

A misspelt key or a value of the wrong type fails while Hydra composes the
config, with Hydra's message naming the key, before any work starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from gaugeflow.distributed.init import DistConf
from gaugeflow.monitor import LoggerConf


@dataclass
class TheoryHMCDefaults:
    """Per-theory HMC settings tuned for 70-90 % acceptance on the default lattice."""

    n_steps: int = 10
    traj_length: float = 1.0
    integrator: str = "omelyan"
    start: str = "hot"


@dataclass
class TheoryConf:
    name: str = MISSING
    kind: str = MISSING  # gauge | phi4
    dim: int = MISSING
    default_shape: List[int] = MISSING
    default_batch_size: int = 64  # train.batch_size's default for this theory
    # gauge theories
    group: Optional[str] = None
    beta: Optional[float] = None
    action: str = "wilson"  # wilson | symanzik | iwasaki | dbw2
    c1: Optional[float] = None  # explicit rectangle coefficient, overrides `action`
    # phi^4: standard (m2, lam) or hopping (kappa, lam_tilde) form
    form: str = "standard"
    m2: Optional[float] = None
    lam: Optional[float] = None
    kappa: Optional[float] = None
    lam_tilde: Optional[float] = None
    # gradient-flow time at which jobs measure the topological charge (0: the unflowed field)
    default_flow_time: float = 0.0
    hmc: TheoryHMCDefaults = field(default_factory=TheoryHMCDefaults)


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
    save_every: int = 1
    max_time: Optional[str] = None  # seconds or HH:MM:SS
    continue_from: Optional[str] = None  # ensemble file whose last configuration starts the chain
    flow_time: float = 0.0  # Wilson-flow time before measuring the 4d topological charge
    precision: str = "float64"
    compression: Optional[str] = None  # null | gzip | gzip:<level> | lzf
    progress: bool = True


@dataclass
class HMCJob:
    theory: TheoryConf = field(default_factory=TheoryConf)
    lattice: LatticeConf = field(default_factory=LatticeConf)
    hmc: HMCConf = field(default_factory=HMCConf)
    seed: int = 0
    device: str = "cpu"
    out: str = MISSING


@dataclass
class ModelConf:
    kind: Optional[str] = None
    n_layers: Optional[int] = None
    hidden: Optional[List[int]] = None  # null: the flow's default for the theory
    kernel_size: int = 3
    activation: str = "leaky_relu"
    transform: str = "spline"
    n_bins: int = 8
    n_mix: int = 6
    bound: float = 4.0
    zero_init: bool = False
    rectangles: bool = True  # U(1): frozen 2x1 loops in the context as well as plaquettes


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
class LossConf:
    """``_target_`` names a :class:`gaugeflow.train.losses.Loss`; the other keys are its arguments."""

    _target_: str = "gaugeflow.train.losses.ReverseKL"
    name: str = "reverse_kl"
    ensemble: Optional[str] = None  # forward_kl: the ensemble file
    n_therm: Optional[int] = None  # forward_kl: leading configurations to drop


@dataclass
class OptimConf:
    """``_target_`` names a torch optimizer; ``lr`` comes from ``train.lr``; null keys are not passed."""

    _target_: str = "torch.optim.Adam"
    name: str = "adam"
    betas: Optional[List[float]] = None
    eps: Optional[float] = None
    weight_decay: Optional[float] = None
    momentum: Optional[float] = None
    nesterov: Optional[bool] = None


@dataclass
class SchedConf:
    """``_target_`` names a :mod:`gaugeflow.train.schedules` class; null keys are not passed."""

    _target_: str = "gaugeflow.train.schedules.Cosine"
    name: str = "cosine"
    warmup_steps: int = 0
    horizon: str = "auto"  # steps | time (the steps that fit in train.max_time) | auto
    restart_lr: Optional[float] = None  # lr a new cycle starts from when a resumed run's time plan has ended
    min_lr: Optional[float] = None
    step_size: Optional[int] = None
    gamma: Optional[float] = None
    factor: Optional[float] = None
    patience: Optional[int] = None
    window: Optional[int] = None
    threshold: Optional[float] = None


@dataclass
class TrainJob:
    theory: TheoryConf = field(default_factory=TheoryConf)
    lattice: LatticeConf = field(default_factory=LatticeConf)
    model: ModelConf = field(default_factory=ModelConf)
    train: TrainConf = field(default_factory=TrainConf)
    loss: LossConf = field(default_factory=LossConf)
    optim: OptimConf = field(default_factory=OptimConf)
    sched: SchedConf = field(default_factory=SchedConf)
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


