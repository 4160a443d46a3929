"""Jobs that start from a checkpoint: the trained theory, model and lattice, plus the user's overrides.

Rule (shared by ``sample``, ``score``, train's ``resume`` and ``init_from``): the sections
``theory``, ``model`` and ``lattice`` come from the checkpoint's ``config`` attribute (the
resolved YAML of the training job), the theory in full (group, action, c0/c1, every coupling).
A theory group choice equal to the checkpoint's theory name changes nothing. What the command
line may change depends on the job (``mode``):

* ``resume``: nothing of the theory or lattice: an explicit key whose value differs from the
  checkpoint's is an error naming the key and both values (a resumed run is the same run);
* ``target`` (``sample``, ``score``, ``init_from``): keys given on the command line apply on top
  (``theory.beta=2.1``, ``'lattice.shape=[16,16]'``), and a theory preset of the same field
  space (group and dimension) replaces the checkpoint's: a flow is a legitimate proposal for a
  nearby target. :func:`target_changes` lists what differs from the trained theory.

A model group override (``model=small``) means the composed group instead, with its own dotted
overrides. ``_target_`` keys restored from a checkpoint are instantiated only under
``gaugeflow.`` and ``torch.`` unless ``allow_targets`` adds prefixes.

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
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from gaugeflow.errors import UsageError
from gaugeflow.io.checkpoint import SECTIONS, Checkpoint, CheckpointError, load_checkpoint

log = logging.getLogger(__name__)

RESTORED = ("theory", "model", "lattice")
#: ``_target_`` prefixes a checkpoint's config may name without ``allow_targets``
TRUSTED_TARGETS = ("gaugeflow.", "torch.")


def restore_config(cfg: DictConfig, spec, key: str = "checkpoint", *, sections: Sequence[str] = RESTORED,
                   overrides: Iterable[str] | None = None, load: Sequence[str] = SECTIONS, mode: str = "target"
                   ) -> tuple[DictConfig, Checkpoint]:
    """``cfg`` with ``sections`` taken from the checkpoint ``spec`` (a file or a run directory).

    ``key`` names the config key that gave ``spec`` in error messages. ``overrides`` are the
    command-line overrides (default: Hydra's, none outside a Hydra job). ``load`` selects the
    checkpoint sections read from disk. ``mode``: ``resume`` or ``target`` (module docstring).
    Returns the merged config (a copy) and the checkpoint.
    """
    if mode not in ("resume", "target"):
        raise ValueError(f"mode must be resume or target, got {mode!r}")
    where = f"{key}={spec}"
    try:
        ck = load_any_checkpoint(spec, key, sections=load)
    except CheckpointError as err:
        raise UsageError(str(err)) from None
    saved = upgrade_saved(saved_config(ck, where), where)
    parsed = _parse(_command_line() if overrides is None else list(overrides))
    groups = _group_names(cfg, sections)
    trained = ck.theory or str(OmegaConf.select(saved, "theory.name", default=""))

    merged = copy.deepcopy(cfg)
    restored = []
    for sec in sections:
        choice = next((o for o in parsed if o.key_or_group == sec and not o.is_delete() and o.package is None),
                      None) if sec in groups else None
        if sec == "model" and choice is None:
            # model=small / model=default (model_size=...): the composed architecture, not the checkpoint's
            choice = next((o for o in parsed if o.key_or_group == "model_size" and not o.is_delete()), None)
        if choice is not None and not (sec == "theory" and str(choice.value()) == trained):
            # an explicit group choice: Hydra already composed it with its dotted overrides
            if sec == "theory":
                _check_theory_choice(merged.theory, saved, trained, mode, where)
            continue
        if sec not in saved or not isinstance(saved[sec], DictConfig):
            raise UsageError(f"{where}: the checkpoint's config has no '{sec}' section")
        try:
            merged[sec] = _fit(merged[sec], saved[sec], sec, where)
            restored.append(sec)
            for o in parsed:
                if o.key_or_group.startswith(sec + ".") and o.package is None:
                    if mode == "resume" and sec in ("theory", "lattice"):
                        _same_as_saved(o, saved, where)
                    _apply(merged, o)
        except OmegaConfBaseException as err:
            raise UsageError(f"{where}: {_first_line(err)}") from None

    if "theory" in sections and trained:
        name = OmegaConf.select(merged, "theory.name", default=None)
        if name != trained and mode == "resume":
            raise UsageError(f"{where}: checkpoint of theory {trained!r}, not {name!r}")
    allowed = (*TRUSTED_TARGETS, *[str(a) for a in (cfg.get("allow_targets") or [])])
    for sec in restored:
        check_targets(merged[sec], allowed, f"{where}: {sec}")
    return merged, ck


def check_targets(node, allowed: Sequence[str], where: str) -> None:
    """Refuse a ``_target_`` in ``node`` (recursively) outside the ``allowed`` prefixes.

    A checkpoint's config is data from a file: it must not name an arbitrary callable for
    ``instantiate`` unless the user allowed its package (``allow_targets=[mypkg]``).
    """
    data = OmegaConf.to_container(node, resolve=False) if isinstance(node, DictConfig) else node
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            target = item.get("_target_")
            if target is not None and not any(str(target) == a.rstrip(".") or str(target).startswith(
                    a if a.endswith(".") else a + ".") for a in allowed):
                raise UsageError(f"{where} names _target_={target!r}, outside {', '.join(allowed)}: "
                                 f"add its package to allow_targets=[...] if you trust this checkpoint")
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def _same_as_saved(o, saved: DictConfig, where: str) -> None:
    """A resumed run keeps its theory and lattice: an explicit key must equal the checkpoint's."""
    key = o.key_or_group
    new = o.value()
    old = OmegaConf.select(saved, key, default=None)
    if isinstance(old, (DictConfig, ListConfig)):
        old = OmegaConf.to_container(old, resolve=True)
    if _normal(new) != _normal(old):
        raise UsageError(f"{where}: {key}={_show(new)} differs from the run's {key}={_show(old)}; a resumed run "
                         f"keeps its theory and lattice (start a new run from its weights with init_from=)")


def _normal(v):
    if isinstance(v, (list, tuple)):
        return [_normal(x) for x in v]
    if isinstance(v, bool) or v is None or isinstance(v, str):
        return v
    if isinstance(v, (int, float)):
        return float(v)
    return v


def _show(v) -> str:
    return "null" if v is None else str(v).replace(" ", "")


#: theory builders whose configurations are the same fields (gauge links; the group and dimension
#: are checked beside): a flow trained for one is a proposal for the other
_SAME_FIELDS = {"gaugeflow.theories.gauge_theory": "links", "gaugeflow.theories.wilson_nf2_theory": "links"}


def _check_theory_choice(chosen: DictConfig, saved: DictConfig, trained: str, mode: str, where: str) -> None:
    """A theory preset other than the checkpoint's: an error for ``resume``; for ``target``
    allowed on the same field space (group and dimension)."""
    name = OmegaConf.select(chosen, "name", default=None)
    if mode == "resume":
        raise UsageError(f"{where}: checkpoint of theory {trained!r}, not {name!r}")
    for k in ("_target_", "group", "dim"):
        a, b = OmegaConf.select(chosen, k, default=None), OmegaConf.select(saved, f"theory.{k}", default=None)
        if k == "_target_":  # builders of one field space (a pure-gauge flow reweighted by a determinant)
            a, b = _SAME_FIELDS.get(a, a), _SAME_FIELDS.get(b, b)
        if a != b:
            raise UsageError(f"{where}: theory={name} is not on the field space the flow was trained for "
                             f"(theory.{k}={_show(a)}, the checkpoint's {trained!r} has {_show(b)})")


#: theory keys that are bookkeeping, not physics (not reported as target changes)
_NOT_PHYSICS = ("default_shape", "default_batch_size", "hmc", "default_flow_time")


def target_changes(cfg: DictConfig, ck: Checkpoint) -> dict[str, tuple]:
    """What the job's target differs in from the theory and lattice the flow was trained at:
    ``{key: (trained, target)}`` for the theory name, every coupling and the lattice shape."""
    saved = upgrade_saved(saved_config(ck))
    out = {}
    mine = OmegaConf.to_container(cfg.theory, resolve=True)
    theirs = OmegaConf.to_container(saved.theory, resolve=True) if "theory" in saved else {}
    for k in sorted(set(mine) | set(theirs)):
        if k in _NOT_PHYSICS:
            continue
        if _normal(mine.get(k)) != _normal(theirs.get(k)):
            out[f"theory.{k}"] = (theirs.get(k), mine.get(k))
    a = [int(x) for x in cfg.lattice.shape]
    b = [int(x) for x in OmegaConf.select(saved, "lattice.shape", default=[])]
    if a != b:
        out["lattice.shape"] = (b, a)
    return out


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


def upgrade_saved(saved: DictConfig, where: str = "checkpoint") -> DictConfig:
    """A checkpoint's config with theory and model nodes of an older gaugeflow (``kind:`` keys)
    rewritten as today's ``_target_`` nodes (:mod:`gaugeflow.components`)."""
    from gaugeflow.components import upgrade_model, upgrade_theory

    try:
        if isinstance(saved.get("theory"), DictConfig):
            theory = upgrade_theory(OmegaConf.to_container(saved.theory, resolve=True))
            saved.theory = OmegaConf.create(theory)
        if isinstance(saved.get("model"), DictConfig):
            group = OmegaConf.select(saved, "theory.group", default=None)
            saved.model = OmegaConf.create(upgrade_model(OmegaConf.to_container(saved.model, resolve=True), group))
    except UsageError as err:
        raise UsageError(f"{where}: {err}") from None
    except OmegaConfBaseException as err:
        raise UsageError(f"{where}: unreadable config in the checkpoint ({_first_line(err)})") from None
    for sec in ("theory", "model"):
        if isinstance(saved.get(sec), DictConfig) and "_target_" not in saved[sec]:
            raise UsageError(f"{where}: the checkpoint's {sec} names no _target_ (the callable that builds it)")
    return saved


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


def restore_model(cfg: DictConfig, theory, ck: Checkpoint, device: torch.device, where: str = "checkpoint",
                  dtype: torch.dtype | None = None):
    """The flow of ``cfg.model`` for ``theory`` with the checkpoint's weights, in ``dtype`` (default:
    the training dtype; float32 weights load exactly into a float64 model), in eval mode and
    without gradients."""
    from gaugeflow.cli.build import model_from_config

    model = model_from_config(cfg, theory, training_dtype(ck, where) if dtype is None else dtype, device)
    try:
        if ck.path.is_dir():  # sharded: reassemble the full tensors from every shard
            from gaugeflow.io.sharded import load_sharded

            load_sharded(ck.path, model, key=where.split("=", 1)[0])
        else:
            model.load_state_dict(ck.model)
    except CheckpointError as err:
        raise UsageError(str(err)) from None
    except (RuntimeError, KeyError, ValueError) as err:
        raise UsageError(f"{where}: does not fit this model ({state_dict_mismatch(err)})") from None
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


def state_dict_mismatch(err: BaseException, limit: int = 240) -> str:
    """One line saying why weights do not load: torch's first line is only a header
    ("Error(s) in loading state_dict for ...:"), the reason is on the next."""
    lines = [ln.strip() for ln in str(err).strip().splitlines() if ln.strip()]
    if len(lines) > 1 and lines[0].startswith("Error(s) in loading state_dict"):
        lines = lines[1:]
    text = lines[0] if lines else type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


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


__all__ = ["RESTORED", "TRUSTED_TARGETS", "check_targets", "restore_config", "restore_model", "saved_config",
           "sha256_file", "target_changes", "training_dtype"]
