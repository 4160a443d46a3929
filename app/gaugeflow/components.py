"""Components built from config nodes: ``_target_`` names a callable, the other keys are its arguments.

Every theory, flow architecture, loss, optimizer, schedule and sampler of a job is such a node
(docs/extending.md). A node's keys are checked against the callable's signature before anything
is built, so a misspelt key fails at start-up with one line naming it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

from gaugeflow.errors import UsageError

#: keys of a node that describe it rather than configure the callable
DESCRIPTIVE = ("_target_", "name")


def locate(target: str, key: str) -> Callable:
    """The callable ``target`` names (``module.attr``); one-line error naming ``key`` otherwise."""
    import importlib

    if not target or not isinstance(target, str):
        raise UsageError(f"{key}._target_ must name a callable, got {target!r}")
    parts = target.split(".")
    obj = None
    for i in range(len(parts) - 1, 0, -1):  # the longest importable module prefix, then attributes
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ModuleNotFoundError as err:
            if err.name is None or not ".".join(parts[:i]).startswith(err.name):
                raise  # the module exists but imports something missing: a real error
            continue
        try:
            for attr in parts[i:]:
                obj = getattr(obj, attr)
        except AttributeError:
            obj = None
        break
    if obj is None:
        raise UsageError(f"{key}._target_={target!r} cannot be imported")
    if not callable(obj):
        raise UsageError(f"{key}._target_={target!r} is not callable")
    return obj


def _parameters(fn: Callable) -> tuple[dict[str, inspect.Parameter], bool]:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # a builtin without a signature: accept what it accepts
        return {}, True
    named = {n: p for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return named, any(p.kind == p.VAR_KEYWORD for p in params.values())


def check_keys(fn: Callable, keys: Mapping[str, Any], key: str, given: tuple[str, ...] = (),
               what: str | None = None) -> None:
    """Every entry of ``keys`` is a parameter of ``fn`` and every required parameter is given.

    ``given``: parameters the job passes itself (``theory``, ``dtype``, ``params``, ...);
    ``what``: how errors name the component (default: the callable's name).
    """
    named, open_ = _parameters(fn)
    target = what or f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', fn)}"
    if not open_:
        for k in keys:
            if k not in named or k in given:
                own = [n for n in named if n not in given]
                raise UsageError(f"{key}.{k} is not a key of {target}; its keys: {', '.join(own) or 'none'}")
    for n, p in named.items():
        if p.default is p.empty and n not in keys and n not in given:
            raise UsageError(f"{key}.{n} must be set ({target} needs it)")


def defaults_of(fn: Callable, given: tuple[str, ...] = ()) -> dict[str, Any]:
    """The keyword defaults of ``fn`` (its keys a node may leave out), without ``given``."""
    named, _ = _parameters(fn)
    return {n: p.default for n, p in named.items() if n not in given and p.default is not p.empty}


def spec_of(node, key: str) -> tuple[str, dict[str, Any]]:
    """``(_target_, keys)`` of a config node (DictConfig or mapping); null keys and ``name`` dropped."""
    from omegaconf import DictConfig, OmegaConf

    spec = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    if "_target_" not in spec:
        raise UsageError(f"{key} names no _target_ (the callable that builds it)")
    target = spec.pop("_target_")
    return target, {k: v for k, v in spec.items() if v is not None and k not in DESCRIPTIVE}


def resolved_spec(node, key: str, given: tuple[str, ...] = ()) -> dict[str, Any]:
    """A component node in full, as checkpoints record it: ``_target_``, ``name`` and, for
    gaugeflow's own callables, every key with its default filled in. Another package's callable
    (a torch optimizer) keeps the keys as configured: its defaults belong to its version."""
    spec = _plain(node)
    target, keys = spec_of(spec, key)
    out: dict[str, Any] = {"_target_": target}
    if spec.get("name") is not None:
        out["name"] = spec["name"]
    if target.startswith("gaugeflow."):
        fn = locate(target, key)
        check_keys(fn, keys, key, given=given)
        out.update(defaults_of(fn, given=given))
        out.update(keys)
    else:
        out.update({k: v for k, v in spec.items() if k not in DESCRIPTIVE})
    return {k: _listify(v) for k, v in out.items()}


def instantiate_node(node, key: str, **kwargs):
    """Build the object a config group describes (``_target_`` + keys; null keys and ``name``
    dropped); ``kwargs`` are what the job passes itself. Keys are checked first; errors in the
    callable are one line naming the group."""
    name = node.get("name") if hasattr(node, "get") else None
    target, keys = spec_of(node, key)
    fn = locate(target, key)
    check_keys(fn, keys, key, given=tuple(kwargs), what=f"{key}={name} ({target})" if name else target)
    try:
        return fn(**kwargs, **keys)
    except (ValueError, TypeError) as err:
        raise UsageError(f"{key}={name or target}: {str(err).splitlines()[0]}") from None


# -- theories ---------------------------------------------------------------------------------

#: keys of a theory preset the jobs read themselves (not passed to the builder)
#: (``defaults`` too: a preset file read as plain YAML carries its defaults list)
PRESET_KEYS = ("name", "dim", "default_shape", "default_batch_size", "default_flow_time", "hmc", "defaults")
#: a preset's ``hmc`` defaults (conf/hmc.yaml reads them)
HMC_KEYS = ("n_steps", "traj_length", "integrator", "start")


def _plain(node) -> dict:
    from omegaconf import DictConfig, OmegaConf

    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)


def upgrade_theory(spec: dict) -> dict:
    """A theory node written before builders were named by ``_target_`` (``kind: gauge|phi4`` and
    every key of every theory, unused ones null), as today's preset; others unchanged."""
    from gaugeflow.theories.builders import LEGACY_KINDS

    if "_target_" in spec or "kind" not in spec:
        return spec
    kind = spec["kind"]
    if kind not in LEGACY_KINDS:
        raise UsageError(f"theory.kind={kind!r} is not a theory (a checkpoint of an unknown gaugeflow?)")
    fn = locate(LEGACY_KINDS[kind], "theory")
    own = set(_parameters(fn)[0]) - {"shape"}
    # the old schema's keys: those the builder takes (absent ones: its defaults), the jobs' own;
    # anything else (another theory's null keys, a newer gaugeflow's) is dropped
    out = {"_target_": LEGACY_KINDS[kind], **defaults_of(fn, given=("shape",))}
    for k, v in spec.items():
        if k in PRESET_KEYS or (k in own and v is not None):
            out[k] = v
    if isinstance(out.get("hmc"), dict):
        out["hmc"] = {k: v for k, v in out["hmc"].items() if k in HMC_KEYS}
    return out


def build_theory(node, shape):
    """The :class:`~gaugeflow.theories.Theory` of a theory preset node on ``shape``.

    ``_target_`` names a builder ``(shape, **keys) -> Theory``; the preset's own keys
    (:data:`PRESET_KEYS`) are not passed; ``name`` becomes ``Theory.name``. A node of an older
    checkpoint (``kind:``) is upgraded first. Raises :class:`UsageError` naming the key.
    """
    from gaugeflow.lattice import validate_shape

    spec = upgrade_theory(_plain(node))
    try:
        shape = validate_shape(shape)
    except ValueError as err:
        raise UsageError(str(err)) from None
    dim = spec.get("dim")
    if dim is not None and len(shape) != int(dim):
        raise UsageError(f"lattice.shape={list(shape)} has {len(shape)} extents but theory {spec.get('name')!r} is "
                         f"{dim}-dimensional")
    name = spec.get("name")
    target, keys = spec_of({k: v for k, v in spec.items() if k not in PRESET_KEYS}, "theory")
    fn = locate(target, "theory")
    check_keys(fn, keys, "theory", given=("shape",), what=f"theory={name} ({target})" if name else target)
    try:
        theory = fn(list(shape), **keys)
    except (ValueError, TypeError, KeyError) as err:
        raise UsageError(str(err).splitlines()[0].strip("'\"")) from None
    if name:
        theory.name = str(name)
    return theory


# -- flow models ------------------------------------------------------------------------------

MODEL_GIVEN = ("theory", "dtype")


def legacy_kind(group: str | None) -> str:
    """The flow older gaugeflow built for ``model.kind: null``: by the theory's group."""
    from gaugeflow.groups import get_group

    if not group or str(group) == "none":
        return "affine"
    return "u1_equivariant" if get_group(group).N == 1 else "sun_spectral"


def upgrade_model(spec: dict, theory=None) -> dict:
    """A model node written before architectures were named by ``_target_`` (``kind:`` and one flat
    key set shared by every architecture) as today's architecture node; others unchanged.
    ``kind: null`` (the theory's flow) needs ``theory``: a Theory or its group's name."""
    from gaugeflow.flows.models import LEGACY_KINDS

    if "_target_" in spec or "kind" not in spec:
        return spec
    kind = spec["kind"]
    if kind is None and theory is not None:
        group = theory if isinstance(theory, str) else (theory.group.name if theory.group is not None else None)
        kind = legacy_kind(group)
    if kind not in LEGACY_KINDS:
        raise UsageError(f"model.kind={kind!r} is not an architecture: choose one with model=<name>")
    fn = locate(LEGACY_KINDS[kind], "model")
    own = set(_parameters(fn)[0]) - set(MODEL_GIVEN)
    # the flat key set: this architecture's keys (absent ones: its defaults), the rest dropped
    return {"_target_": LEGACY_KINDS[kind], **defaults_of(fn, given=MODEL_GIVEN),
            **{k: v for k, v in spec.items() if k in own and v is not None}}


def _listify(v):
    if isinstance(v, Mapping):  # a nested node (e.g. the joint model's gauge_keys)
        return {k: _listify(x) for k, x in v.items()}
    return [_listify(x) for x in v] if isinstance(v, (list, tuple)) else v


def _model_builder(node, theory, key: str = "model") -> tuple[str, Callable, dict[str, Any]]:
    """``(_target_, builder, keys)`` of a model node (an older ``kind:`` node upgraded), the keys
    checked against the builder's signature; errors name ``key`` (a nested model, e.g. a joint
    model's ``model.gauge_keys``, names its own)."""
    target, keys = spec_of(upgrade_model(_plain(node), theory), key)
    fn = locate(target, key)
    check_keys(fn, keys, key, given=MODEL_GIVEN, what=f"{key} ({target})")
    return target, fn, keys


def resolved_model_spec(node, theory, key: str = "model") -> dict:
    """The model node in full: ``_target_`` and every key of its builder (given, else the
    builder's default, with ``resolve_keys`` filling what depends on the theory), as checkpoints
    record it. Unknown keys are a :class:`UsageError` naming them."""
    target, fn, keys = _model_builder(node, theory, key)
    full = {**defaults_of(fn, given=MODEL_GIVEN), **keys}
    hook = getattr(fn, "resolve_keys", None)
    if hook is not None:
        full = hook(theory, full)
    return {"_target_": target, **{k: _listify(v) for k, v in full.items()}}


def build_model(node, theory, dtype, key: str = "model"):
    """The flow a model node describes for ``theory``, in ``dtype`` (a builder ``(theory, dtype,
    **keys) -> nn.Module``; docs/extending.md). Raises :class:`UsageError` naming the key."""
    _, fn, keys = _model_builder(node, theory, key)
    try:
        return fn(theory, dtype, **keys)
    except (ValueError, TypeError) as err:
        raise UsageError(str(err).splitlines()[0]) from None
