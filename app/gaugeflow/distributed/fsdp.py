"""Data parallelism for flow models: FSDP2 sharding per coupling layer, or plain gradient all-reduce.

Two strategies, both applied from outside the model (the physics stays free of parallelism):

``fsdp``
    :func:`shard_flow_model` applies FSDP2 (``torch.distributed.fsdp.fully_shard``; the design is
    that of PyTorch FSDP, Zhao et al. 2304.11277, with per-parameter ``DTensor`` sharding) to every
    coupling layer of ``model.flow.layers`` and then to the root. Each rank keeps ``1/world`` of
    every parameter (``Shard(0)``), of its gradient and of its optimizer state; a layer's full
    parameters exist only while that layer runs (all-gather before, free after with
    ``reshard_after_forward=True``), and gradients are reduce-scattered (averaged) in backward.
    Flows are not called through ``forward`` alone: the model is used through ``sample`` and
    ``log_prob``, and ``log_prob`` runs every layer's ``inverse``. FSDP2 hooks only ``forward``, so
    those methods are registered with ``register_fsdp_forward_method``; without that
    ``inverse`` would see the sharded parameters.

``ddp``
    :func:`allreduce_gradients` after ``backward``: one all-reduce per bucket of flattened
    gradients, divided by the world size. ``torch.nn.parallel.DistributedDataParallel`` is not
    used because it hooks ``forward`` only (``sample``/``log_prob`` bypass it).

In both, each rank draws its own part of the batch from its own generator and minimises the mean
of its local loss; averaging the gradients over ranks then gives the gradient of the mean over
the global batch (all local batches of equal size). :func:`reduce_metrics` makes the logged
metrics global: per-sample ``log q`` and ``S`` are all-gathered, so the ESS is that of the global
batch, and scalars are averaged.

Works on CPU with gloo (FSDP2 accepts a CPU device mesh; FSDP1 does not and is not used), CUDA
with nccl and XPU with xccl. Build the optimizer *after* sharding: it must hold the sharded
``DTensor`` parameters. Usage::

    model = u1_equivariant(theory, ...)              # identical initialisation on every rank
    model = shard_flow_model(model, activation_checkpointing=True)
    opt = torch.optim.Adam(model.parameters(), lr)    # per-shard optimizer state
    x, log_q = model.sample(local_batch, gen)         # gen seeded per rank
    ((log_q + theory.action(x)).mean()).backward()    # reduce-scatter happens here
    opt.step()
    m = reduce_metrics({"log_q": log_q.detach(), "action": s.detach(), "loss": loss.detach()})
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

from gaugeflow.distributed.wire import from_wire, to_wire

__all__ = [
    "allreduce_gradients",
    "apply_activation_checkpointing",
    "clip_grad_norm",
    "collective_device",
    "is_sharded",
    "reduce_metrics",
    "reshard",
    "shard_flow_model",
]

#: methods of a coupling layer that run its parameters (``forward`` is hooked by FSDP itself)
LAYER_METHODS = ("inverse",)
#: methods of a FlowModel through which it is used
MODEL_METHODS = ("sample", "log_prob")
_CKPT_FLAG = "_gaugeflow_checkpointed"


# ---------------------------------------------------------------------------------------------
# activation checkpointing


def _checkpointed(fn):
    @functools.wraps(fn)
    def run(*args, **kwargs):
        # non-reentrant: works with inputs that need no grad, keyword arguments and FSDP2's
        # backward hooks, and gives gradients identical to the plain call
        return checkpoint(fn, *args, use_reentrant=False, **kwargs)

    return run


def apply_activation_checkpointing(model: nn.Module, methods: Sequence[str] = ("forward", *LAYER_METHODS)) -> nn.Module:
    """Recompute each coupling layer's activations in backward instead of keeping them.

    ``torch.utils.checkpoint`` (non-reentrant) wraps ``forward`` and ``inverse`` of every layer of
    ``model.flow.layers`` on the instance, so parameter names (and hence checkpoints) stay those
    of the plain model, unlike ``checkpoint_wrapper``'s extra module level. The memory kept per
    layer drops to its input; backward costs one more forward per layer. Gradients are
    identical to the plain model's (same operations, same order). Apply before
    :func:`shard_flow_model`'s ``fully_shard`` (it does so with ``activation_checkpointing=True``),
    so that FSDP's all-gather hooks stay outside the recomputed region. Idempotent.
    """
    for layer in _layers(model):
        if getattr(layer, _CKPT_FLAG, False):
            continue
        for name in methods:
            # the bound method of the class, captured before anything else patches the instance
            setattr(layer, name, _checkpointed(getattr(layer, name)))
        setattr(layer, _CKPT_FLAG, True)
    return model


def _layers(model: nn.Module) -> list[nn.Module]:
    flow = getattr(model, "flow", None)
    layers = getattr(flow, "layers", None)
    if layers is None:
        raise TypeError(f"expected a FlowModel with .flow.layers, got {type(model).__name__}")
    return list(layers)


# ---------------------------------------------------------------------------------------------
# FSDP2


def _cast_floating(obj, dtype):
    if isinstance(obj, torch.Tensor):
        return obj.to(dtype) if obj.is_floating_point() and obj.dtype != dtype else obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(_cast_floating(o, dtype) for o in obj)
    if isinstance(obj, dict):
        return {k: _cast_floating(v, dtype) for k, v in obj.items()}
    return obj


def _first_floating_dtype(obj) -> torch.dtype | None:
    if isinstance(obj, torch.Tensor):
        return obj.dtype if obj.is_floating_point() else None
    if isinstance(obj, (tuple, list)):
        for o in obj:
            found = _first_floating_dtype(o)
            if found is not None:
                return found
    if isinstance(obj, dict):
        return _first_floating_dtype(list(obj.values()))
    return None


def _low_precision_networks(layer: nn.Module, param_dtype: torch.dtype) -> None:
    """Run the layer's networks (its children with parameters) in ``param_dtype``, the rest not.

    FSDP2 casts a module's floating inputs to ``param_dtype``; for a coupling layer that would
    put the whole bijection (spline knots, remainders mod 2 pi, log|det J|) in low precision,
    and complex links are not cast at all, so the network would meet float64 features with
    float32 weights. Instead the layer keeps the field's precision and each network casts its
    inputs to ``param_dtype`` and its outputs back (as autocast would around the network).
    """
    for child in layer.children():
        if not any(True for _ in child.parameters()):
            continue

        def pre(module, args, kwargs):
            module._gaugeflow_in_dtype = _first_floating_dtype((args, kwargs))
            return _cast_floating(args, param_dtype), _cast_floating(kwargs, param_dtype)

        def post(module, args, kwargs, out):
            dtype = module.__dict__.pop("_gaugeflow_in_dtype", None)
            return out if dtype is None else _cast_floating(out, dtype)

        child.register_forward_pre_hook(pre, with_kwargs=True)
        child.register_forward_hook(post, with_kwargs=True)


def _default_mesh(model: nn.Module):
    from torch.distributed.device_mesh import init_device_mesh

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("shard_flow_model needs an initialised process group (gaugeflow.distributed.init_distributed)")
    param = next(model.parameters(), None)
    device = param.device.type if param is not None else "cpu"
    return init_device_mesh(device, (dist.get_world_size(),))


def shard_flow_model(
    model: nn.Module,
    *,
    mesh=None,
    reshard_after_forward: bool = True,
    param_dtype: torch.dtype | None = None,
    reduce_dtype: torch.dtype | None = None,
    activation_checkpointing: bool = False,
) -> nn.Module:
    """Shard a :class:`~gaugeflow.flows.base.FlowModel` with FSDP2, one unit per coupling layer.

    Args:
        model: the flow model, with identical parameters on every rank (build it from the same
            seed, or broadcast rank 0's). It is modified in place and returned.
        mesh: a 1-d ``DeviceMesh`` over the data-parallel ranks (default: all ranks, on the
            parameters' device type); a 2-d mesh gives HSDP (replicate x shard).
        reshard_after_forward: free each layer's gathered parameters after it ran (ZeRO-3
            memory; the all-gather is repeated in backward). ``False`` keeps them until
            backward (ZeRO-2: less communication, more memory).
        param_dtype: precision of the networks' computation (e.g. ``torch.bfloat16``); the
            sharded parameters and the optimizer keep the model's dtype, and the bijection
            itself keeps the field's precision (see :func:`_low_precision_networks`).
        reduce_dtype: precision of the gradient reduce-scatter (default: ``param_dtype``, or the
            model's dtype without mixed precision). float32 gradients of bfloat16 networks
            is the usual choice.
        activation_checkpointing: recompute each layer's activations in backward
            (:func:`apply_activation_checkpointing`).

    Each coupling layer becomes one FSDP unit (one all-gather and one reduce-scatter per layer
    per pass; Zhao et al. 2304.11277, sec. 3.2 on unit granularity), the root gets the rest
    (nothing, for the current priors). ``inverse`` of every layer and ``sample``/``log_prob``
    of the model are registered as FSDP forward methods. Parameter names are unchanged, so
    ``model.state_dict()`` keys match the unsharded model (values are ``DTensor`` shards).
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    mesh = mesh if mesh is not None else _default_mesh(model)
    layers = _layers(model)
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    # casting is done per network (see _low_precision_networks), never on the layer's inputs
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype, cast_forward_inputs=False)
    for layer in layers:
        if param_dtype is not None:
            _low_precision_networks(layer, param_dtype)
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=mp)
        for name in LAYER_METHODS:
            if hasattr(layer, name):
                register_fsdp_forward_method(layer, name)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=mp)
    for name in MODEL_METHODS:
        if hasattr(model, name):
            register_fsdp_forward_method(model, name)
            if not reshard_after_forward:
                _reshard_after_no_grad(model, name)
    return model


def _reshard_after_no_grad(model: nn.Module, name: str) -> None:
    # with reshard_after_forward=False FSDP2 keeps the gathered parameters until backward; an
    # evaluation pass under no_grad has no backward, and the model would stay unsharded (full
    # memory, and model.parameters() would list the gathered tensors, not the sharded ones)
    method = getattr(model, name)

    @functools.wraps(method)
    def run(*args, **kwargs):
        out = method(*args, **kwargs)
        if not torch.is_grad_enabled():
            reshard(model)
        return out

    setattr(model, name, run)


def reshard(model: nn.Module) -> None:
    """Free every gathered parameter of an FSDP2 model (no-op for a plain model).

    Needed only with ``reshard_after_forward=False`` after a forward pass with grad enabled
    that is not followed by backward; :func:`gaugeflow.io.sharded.save_sharded` calls it.
    """
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model`` (or any submodule) was sharded by FSDP2."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


# ---------------------------------------------------------------------------------------------
# plain data parallel


def allreduce_gradients(params: Iterable[torch.Tensor], group=None, bucket_mb: float = 25.0) -> None:
    """Average the gradients of ``params`` over the ranks of ``group`` (the ``ddp`` strategy).

    Gradients are copied into flat buckets of about ``bucket_mb`` MiB per dtype (one collective
    per bucket rather than one per tensor: small tensors are latency-bound; DDP's bucketing, Li
    et al. 2006.15704), all-reduced asynchronously, divided by the group size and copied back.
    A parameter that needs grad but got none (unused this step) counts as a zero gradient, so
    every rank reduces the same buckets. Parameters must be plain tensors: FSDP's ``DTensor``
    parameters are reduced by FSDP itself. A world of one is a no-op.
    """
    params = [p for p in params if p.requires_grad]
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size(group) == 1:
        return
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without DTensor has no FSDP2 either
        DTensor = ()  # noqa: N806
    if any(isinstance(p, DTensor) for p in params):
        raise TypeError("allreduce_gradients got FSDP-sharded parameters; FSDP reduces their gradients itself")
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    world = dist.get_world_size(group)
    limit = max(1, int(bucket_mb * 2**20))
    buckets: list[list[torch.Tensor]] = []
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for p in params:
        by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
    for grads in by_dtype.values():  # insertion order: the same on every rank
        bucket, size = [], 0
        for g in grads:
            nbytes = g.numel() * g.element_size()
            if bucket and size + nbytes > limit:
                buckets.append(bucket)
                bucket, size = [], 0
            bucket.append(g)
            size += nbytes
        if bucket:
            buckets.append(bucket)
    flats, works = [], []
    for bucket in buckets:
        flat = torch.cat([to_wire(g.detach()).reshape(-1) for g in bucket])
        flats.append(flat)
        works.append(dist.all_reduce(flat, group=group, async_op=True))
    for bucket, flat, work in zip(buckets, flats, works):
        work.wait()
        flat.div_(world)
        offset = 0
        for g in bucket:
            view = torch.view_as_real(g) if g.is_complex() else g  # a view: the copy lands in g
            view.copy_(flat[offset:offset + view.numel()].view_as(view))
            offset += view.numel()


def clip_grad_norm(params: Iterable[torch.Tensor], max_norm: float | None) -> torch.Tensor:
    """Global gradient 2-norm (a plain 0-d tensor on every rank), clipping to ``max_norm`` if given.

    ``torch.nn.utils.clip_grad_norm_`` computes the norm of FSDP ``DTensor`` gradients across
    shards but returns it as a ``DTensor``; this returns its full value, so that
    ``torch.isfinite(norm)`` and ``float(norm)`` mean the same on every strategy.
    """
    params = [p for p in params if p.grad is not None]
    if not params:
        return torch.tensor(0.0)
    limit = float("inf") if max_norm is None or max_norm <= 0 else float(max_norm)
    norm = torch.nn.utils.clip_grad_norm_(params, limit)
    full = getattr(norm, "full_tensor", None)
    return full() if full is not None else norm


# ---------------------------------------------------------------------------------------------
# metrics


def _gather_rows(t: torch.Tensor, group) -> torch.Tensor:
    """All ranks' ``t`` concatenated along dim 0 in rank order (the sizes may differ)."""
    world = dist.get_world_size(group)
    wire = to_wire(t.detach().contiguous())
    n = torch.tensor([wire.shape[0]], dtype=torch.int64, device=wire.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n, group=group)
    sizes = [int(s) for s in sizes]
    most = max(sizes)
    if most != wire.shape[0]:  # all_gather needs equal shapes: pad, then cut
        pad = wire.new_zeros((most - wire.shape[0], *wire.shape[1:]))
        wire = torch.cat([wire, pad])
    parts = [torch.empty_like(wire) for _ in range(world)]
    dist.all_gather(parts, wire, group=group)
    return from_wire(torch.cat([p[:s] for p, s in zip(parts, sizes)]), t.dtype)


def reduce_metrics(tensors: Mapping[str, torch.Tensor | float | int], group=None) -> dict:
    """Metrics of the global batch: per-sample tensors all-gathered, scalars averaged over ranks.

    A tensor with at least one dimension is per-sample (e.g. ``log_q``, ``action``): the result
    holds every rank's rows concatenated in rank order, so ``effective_sample_size(-action -
    log_q)`` is the ESS of the global batch (ESS is not the mean of the ranks' ESS). A 0-d
    tensor or a Python number is a scalar (e.g. the loss): the result is its mean over ranks, a
    Python float. Every rank gets the same result and must call with the same keys in the same
    order. Without a process group (one process) the values come back unchanged, scalars as
    floats.
    """
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1
    out: dict = {}
    scalars: dict[str, float] = {}
    for key, value in tensors.items():
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            out[key] = _gather_rows(value, group) if distributed else value.detach()
        else:
            scalars[key] = float(value.detach().item() if isinstance(value, torch.Tensor) else value)
    if scalars:
        if distributed:
            device = collective_device(group)
            vec = torch.tensor(list(scalars.values()), dtype=torch.float64, device=device)
            dist.all_reduce(vec, group=group)
            vec /= dist.get_world_size(group)
            scalars = dict(zip(scalars, vec.tolist()))
        out.update(scalars)
    return {key: out[key] for key in tensors}


def collective_device(group=None) -> torch.device:
    """Where small tensors for collectives of ``group`` must live: the accelerator for
    nccl/xccl/ccl, the CPU for gloo (and for a mixed ``cpu:gloo,cuda:nccl`` group)."""
    backend = str(dist.get_backend(group))
    if backend in ("nccl", "xccl", "ccl"):
        kind = "cuda" if backend == "nccl" else "xpu"
        return torch.device(kind, getattr(torch, kind).current_device())
    return torch.device("cpu")
