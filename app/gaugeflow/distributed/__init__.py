"""Launcher-agnostic start-up: rank discovery, device and backend choice, process group, RNG streams.

Typical use in a job::

    ctx = init_from_config(cfg.dist)          # or init_distributed(device="auto")
    try:
        gen = torch.Generator(ctx.device).manual_seed(rank_seed(cfg.seed, ctx.rank))
        with ctx.guard("train step"):
            ...                              # DDP forward/backward, all_reduce, ...
    finally:
        ctx.shutdown()

mpi4py is imported only when a launch needs it (see :mod:`gaugeflow.distributed.env`).
"""

from gaugeflow.distributed.env import LaunchError, LaunchInfo, detect_launch, job_port, main_only_hydra_overrides
from gaugeflow.distributed.init import (
    DEFAULT_TIMEOUT_S,
    DistConf,
    DistConfigError,
    DistContext,
    PeerFailure,
    choose_backend,
    init_distributed,
    init_from_config,
    rank_seed,
    select_device,
)

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "DistConf",
    "DistConfigError",
    "DistContext",
    "LaunchError",
    "LaunchInfo",
    "PeerFailure",
    "choose_backend",
    "detect_launch",
    "init_distributed",
    "init_from_config",
    "job_port",
    "main_only_hydra_overrides",
    "rank_seed",
    "select_device",
]
