"""Theory and flow model from a composed job config (shared by train, sample, score)."""

from __future__ import annotations

import torch
from omegaconf import DictConfig, OmegaConf

from gaugeflow.cli.common import UsageError
from gaugeflow.flows.models import build_flow_model, resolve_architecture
from gaugeflow.theories import build_theory


def theory_from_config(cfg: DictConfig, shape=None):
    """The theory of ``cfg.theory`` on ``cfg.lattice.shape`` (or on ``shape``, a decomposed run's
    local block); bad values are a :class:`UsageError`."""
    try:
        return build_theory(OmegaConf.to_container(cfg.theory, resolve=True),
                            cfg.lattice.shape if shape is None else list(shape))
    except ValueError as err:
        raise UsageError(str(err)) from None


def model_from_config(cfg: DictConfig, theory, dtype: torch.dtype, device: torch.device):
    """The flow of ``cfg.model`` for ``theory``; initial weights come from torch's global generator."""
    m = cfg.model
    try:
        model = build_flow_model(theory, m.kind, m.n_layers, None if m.hidden is None else tuple(m.hidden), m.kernel_size, m.activation,
                                 m.transform, m.n_bins, m.n_mix, m.bound, m.zero_init, dtype,
                                 m.rectangles)
    except ValueError as err:
        raise UsageError(str(err)) from None
    return model.to(device)


def resolve_model_config(cfg: DictConfig, theory) -> None:
    """Fill the model keys left null (the flow's defaults for ``theory``) in ``cfg.model``, so the
    config a checkpoint records names the architecture in full."""
    m = cfg.model
    try:
        kind, n_layers, hidden = resolve_architecture(theory, m.kind, m.n_layers,
                                                      None if m.hidden is None else tuple(m.hidden))
    except ValueError as err:
        raise UsageError(str(err)) from None
    m.kind, m.n_layers, m.hidden = kind, n_layers, list(hidden)


def parallel_from_config(cfg: DictConfig):
    """The process layout from ``cfg.dist`` (:class:`gaugeflow.distributed.parallel.Parallel`); launch and
    layout errors are one-line usage errors. Call ``.ctx.shutdown()`` when done."""
    from gaugeflow.distributed.env import LaunchError
    from gaugeflow.distributed.init import DistConfigError, init_from_config
    from gaugeflow.distributed.parallel import Parallel

    try:
        ctx = init_from_config(cfg.dist)
    except (DistConfigError, LaunchError) as err:
        raise UsageError(str(err).splitlines()[0]) from None
    try:
        return Parallel(ctx, cfg.lattice.shape, cfg.dist.get("lattice_grid"), str(cfg.dist.strategy).lower())
    except ValueError as err:
        ctx.shutdown()
        raise UsageError(str(err).splitlines()[0]) from None
