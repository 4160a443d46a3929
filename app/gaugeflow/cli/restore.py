"""Jobs that start from a checkpoint: the trained theory, model and lattice, plus the user's overrides.

Rule (shared by ``sample``, ``score`` and train's ``resume``): the sections ``theory``,
``model`` and ``lattice`` come from the checkpoint's ``config`` attribute (the resolved
YAML of the training job). Keys given on the command line apply on top of them
(``theory.beta=2.1``, ``model.n_bins=4``, ``'lattice.shape=[16,16]'``). A group override
(``model=small``, ``theory=u1_2d``) means the composed group instead, with its own dotted
overrides. A theory whose name differs from the checkpoint's is an error.

Overrides are read from ``HydraConfig.get().overrides.task`` and parsed by Hydra's own
override parser, so values have exactly the types Hydra would give them; the merged
sections are validated against the job's typed schema.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import logging
from collections.abc import Iterable, Sequence

import torch
import yaml
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from gaugeflow.cli.common import UsageError
from gaugeflow.io.checkpoint import SECTIONS, Checkpoint, CheckpointError, load_checkpoint

log = logging.getLogger(__name__)

RESTORED = ("theory", "model", "lattice")


def restore_config(cfg: DictConfig, spec, key: str = "checkpoint", *, sections: Sequence[str] = RESTORED,
                   overrides: Iterable[str] | None = None, load: Sequence[str] = SECTIONS
                   ) -> tuple[DictConfig, Checkpoint]:
    """``cfg`` with ``sections`` taken from the checkpoint ``spec`` (a file or a run directory).

    ``key`` names the config key that gave ``spec`` in error messages. ``overrides`` are the
    command-line overrides (default: Hydra's, none outside a Hydra job). ``load`` selects the
    checkpoint sections read from disk. Returns the merged config (a copy) and the checkpoint.
    """
    where = f"{key}={spec}"
    try:
        ck = load_any_checkpoint(spec, key, sections=load)
    except CheckpointError as err:
        raise UsageError(str(err)) from None
    saved = saved_config(ck, where)
    parsed = _parse(_command_line() if overrides is None else list(overrides))
    groups = _group_names(cfg, sections)

    merged = copy.deepcopy(cfg)
    for sec in sections:
        if sec in groups and any(o.key_or_group == sec and not o.is_delete() for o in parsed):
            # an explicit group choice: Hydra already composed it with its dotted overrides
            continue
        if sec not in saved or not isinstance(saved[sec], DictConfig):
            raise UsageError(f"{where}: the checkpoint's config has no '{sec}' section")
        try:
            merged[sec] = _fit(merged[sec], saved[sec], sec, where)
            for o in parsed:
                if o.key_or_group.startswith(sec + ".") and o.package is None:
                    _apply(merged, o)
        except OmegaConfBaseException as err:
            raise UsageError(f"{where}: {_first_line(err)}") from None

    trained = ck.theory or str(OmegaConf.select(saved, "theory.name", default=""))
    if "theory" in sections and trained:
        name = OmegaConf.select(merged, "theory.name", default=None)
        if name != trained:
            raise UsageError(f"{where}: checkpoint of theory {trained!r}, not {name!r}")
    return merged, ck


def load_any_checkpoint(spec, key: str = "checkpoint", sections: Sequence[str] = SECTIONS) -> Checkpoint:
    """A single-file checkpoint, or the manifest of a sharded one (``step_*/``, FSDP runs): its
    step, theory and config; the sharded tensors are read later by :func:`restore_model` or
    :func:`gaugeflow.io.sharded.load_sharded`."""
    import json

    from gaugeflow.io.sharded import MANIFEST, resolve_any_checkpoint

    path = resolve_any_checkpoint(spec, key)
    if not path.is_dir():
        return load_checkpoint(path, key, sections=sections)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        step = int(manifest["step"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{key}={path}: unreadable {MANIFEST} ({_first_line(err)})") from None
    attrs = {"step": step, "theory": str(manifest.get("theory", "")), "config": str(manifest.get("config", ""))}
    return Checkpoint(path, step, attrs, model={})


def saved_config(ck: Checkpoint, where: str = "checkpoint") -> DictConfig:
    """The training job's resolved config stored in the checkpoint."""
    text = ck.config
    try:
        saved = OmegaConf.create(text) if text.strip() else None
    except (OmegaConfBaseException, yaml.YAMLError, ValueError) as err:
        raise UsageError(f"{where}: unreadable config in the checkpoint ({_first_line(err)})") from None
    if not isinstance(saved, DictConfig):
        raise UsageError(f"{where}: the checkpoint records no training config")
    return saved


def training_dtype(ck: Checkpoint, where: str = "checkpoint") -> torch.dtype:
    """The dtype the model was trained in (``train.dtype`` of its config; float32 if absent)."""
    name = str(OmegaConf.select(saved_config(ck, where), "train.dtype", default="float32"))
    table = {"float32": torch.float32, "float64": torch.float64}
    if name not in table:
        raise UsageError(f"{where}: checkpoint trained in unknown dtype {name!r}")
    return table[name]


def restore_model(cfg: DictConfig, theory, ck: Checkpoint, device: torch.device, where: str = "checkpoint"):
    """The flow of ``cfg.model`` for ``theory`` with the checkpoint's weights, in the training dtype,
    in eval mode and without gradients."""
    from gaugeflow.cli.build import model_from_config

    model = model_from_config(cfg, theory, training_dtype(ck, where), device)
    try:
        if ck.path.is_dir():  # sharded: reassemble the full tensors from every shard
            from gaugeflow.io.sharded import load_sharded

            load_sharded(ck.path, model, key=where.split("=", 1)[0])
        else:
            model.load_state_dict(ck.model)
    except CheckpointError as err:
        raise UsageError(str(err)) from None
    except (RuntimeError, KeyError, ValueError) as err:
        raise UsageError(f"{where}: does not fit this model ({_first_line(err)})") from None
    model.eval()
    model.requires_grad_(False)
    return model


def sha256_file(path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file (provenance: which checkpoint or ensemble a result came from); of a
    sharded checkpoint directory, over its files' names and contents in name order."""
    import pathlib

    path = pathlib.Path(path)
    h = hashlib.sha256()
    for f in sorted(path.iterdir()) if path.is_dir() else [path]:
        if path.is_dir():
            h.update(f.name.encode())
        with open(f, "rb") as fh:
            while block := fh.read(chunk):
                h.update(block)
    return h.hexdigest()


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _command_line() -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    return list(HydraConfig.get().overrides.task)


def _parse(overrides: list[str]):
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        return OverridesParser.create().parse_overrides(overrides)
    except HydraException as err:
        raise UsageError(_first_line(err)) from None


def _group_names(cfg: DictConfig, sections: Sequence[str]) -> set[str]:
    """Which of ``sections`` are config groups of this job (so ``sec=name`` picks an option)."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return set(HydraConfig.get().runtime.choices) & set(sections)
    # outside a Hydra job (tests, notebooks): a section holding a mapping is treated as a group
    return {s for s in sections if isinstance(cfg.get(s), DictConfig)}


def _fit(schema_node, saved_node: DictConfig, path: str, where: str):
    """A fresh node of the schema's type filled from the saved one: keys the schema lacks are
    dropped (the checkpoint may come from a newer or older gaugeflow), keys the saved config lacks
    take the schema's defaults rather than values of whatever preset the job composed."""
    typ = OmegaConf.get_type(schema_node) if isinstance(schema_node, DictConfig) else None
    if typ is None or not dataclasses.is_dataclass(typ):
        return copy.deepcopy(saved_node)
    fresh = OmegaConf.structured(typ)
    return OmegaConf.merge(fresh, _known(fresh, OmegaConf.to_container(saved_node), path, where))


def _known(fresh: DictConfig, saved: dict, path: str, where: str) -> dict:
    """The part of ``saved`` (a plain dict) whose keys the structured node ``fresh`` has."""
    known = set(fresh.keys())  # `in` on a DictConfig is False for keys whose value is MISSING
    kept = {}
    for k, v in saved.items():
        if k not in known:
            log.warning("%s: ignoring %s.%s of the checkpoint's config (not a key of this job)", where, path, k)
            continue
        child = None if OmegaConf.is_missing(fresh, k) else fresh[k]
        structured = isinstance(child, DictConfig) and dataclasses.is_dataclass(OmegaConf.get_type(child))
        if isinstance(v, dict) and structured:
            kept[k] = _known(child, v, f"{path}.{k}", where)
        else:
            kept[k] = v
    return kept


def _apply(cfg: DictConfig, o) -> None:
    """Apply one parsed dotted override to ``cfg`` as Hydra does when composing."""
    key = o.key_or_group
    if o.is_delete():
        parent_key, _, leaf = key.rpartition(".")
        parent = OmegaConf.select(cfg, parent_key)
        if isinstance(parent, DictConfig) and leaf in parent:
            with open_dict(parent):
                del parent[leaf]
        return
    if o.is_sweep_override():
        raise UsageError(f"{o.input_line}: a sweep needs --multirun")
    value = o.value()
    if o.is_add() or o.is_force_add():
        with open_dict(cfg):
            OmegaConf.update(cfg, key, value, merge=True, force_add=True)
    else:
        OmegaConf.update(cfg, key, value, merge=True)


__all__ = ["RESTORED", "restore_config", "restore_model", "saved_config", "sha256_file", "training_dtype"]
