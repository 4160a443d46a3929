"""Components built from config nodes: ``_target_`` names a callable, the other keys are its arguments.

Every theory, flow architecture, loss, optimizer, schedule and sampler of a job is such a node
(docs/extending.md). A node's keys are checked against the callable's signature before anything
is built, so a misspelt key fails at start-up with one line naming it.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any, Callable

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
