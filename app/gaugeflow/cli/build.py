"""Theory and flow model from a composed job config (shared by train, sample, score, hmc).

Both are components (:mod:`gaugeflow.components`): ``cfg.theory._target_`` names a builder
``(shape, **keys) -> Theory``, ``cfg.model._target_`` a builder ``(theory, dtype, **keys) ->
nn.Module``; docs/extending.md.
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from gaugeflow.components import build_model, build_theory, resolved_model_spec, resolved_spec, upgrade_theory
from gaugeflow.errors import UsageError


def theory_from_config(cfg: DictConfig, shape=None):
    """The theory of ``cfg.theory`` on ``cfg.lattice.shape`` (or on ``shape``, a decomposed run's
    local block); bad values are a :class:`UsageError`."""
    return build_theory(cfg.theory, cfg.lattice.shape if shape is None else list(shape))


def model_from_config(cfg: DictConfig, theory, dtype: torch.dtype, device: torch.device):
    """The flow of ``cfg.model`` for ``theory``; initial weights come from torch's global generator."""
    if cfg.get("model") is None:
        raise UsageError(f"theory={theory.name} names no flow architecture: choose one with model=<name>")
    return build_model(cfg.model, theory, dtype).to(device)


def resolve_model_config(cfg: DictConfig, theory) -> None:
    """Write the component nodes in full into ``cfg``: the model's ``_target_`` and every key of
    its builder (defaults and theory-dependent values filled in), and an older checkpoint's
    theory node as today's preset, so the config a checkpoint records rebuilds the run alone."""
    if cfg.get("model") is None:
        raise UsageError(f"theory={theory.name} names no flow architecture: choose one with model=<name>")
    spec = resolved_model_spec(cfg.model, theory)
    with open_dict(cfg):
        cfg.model = OmegaConf.create(spec)
        cfg.theory = OmegaConf.create(upgrade_theory(OmegaConf.to_container(cfg.theory, resolve=True)))


#: what the job passes itself to each training component (not config keys)
TRAINING_COMPONENTS = {"loss": (), "optim": ("params", "lr"), "sched": ("optimizer", "total_steps")}


def resolve_training_config(cfg: DictConfig) -> None:
    """Write the loss, optimizer and schedule nodes in full into ``cfg`` (see
    :func:`gaugeflow.components.resolved_spec`), so a checkpoint's config rebuilds them alone."""
    with open_dict(cfg):
        for key, given in TRAINING_COMPONENTS.items():
            cfg[key] = OmegaConf.create(resolved_spec(cfg[key], key, given))


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
