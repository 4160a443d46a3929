"""Start and stop the process group: device first, then backend, then ``init_process_group``.

Order of start-up (torch ``init_process_group`` docs; ALCF Aurora PyTorch guide):

1. :func:`~gaugeflow.distributed.env.detect_launch` reads rank, world size and the rendezvous address;
2. :func:`select_device` picks and *sets* this rank's accelerator (``local_rank`` modulo the
   devices it sees, so ``ZE_AFFINITY_MASK``/``CUDA_VISIBLE_DEVICES`` narrowing to one works);
3. :func:`choose_backend` maps the device to a backend (table below);
4. rank 0 hosts a TCP store; every rank checks in, so a rank that never started is named;
5. ``init_process_group(backend, store=..., timeout=..., device_id=...)``, with ``device_id``
   for cuda/xpu so the communicator binds to the device chosen in step 2.

A world of one is no process group at all: no store, no backend, nothing to shut down.

======  =======  ===========================================================================
device  backend  note
======  =======  ===========================================================================
cpu     gloo     also what the tests use
cuda    nccl
xpu     xccl     native in torch >= 2.8 (``torch.distributed.is_xccl_available()``); current
                 Aurora frameworks modules ship it, no extension needed
xpu     ccl      legacy fallback, only if ``oneccl_bindings_for_pytorch`` imports (its import
                 registers the backend); intel-extension-for-pytorch is never required
======  =======  ===========================================================================

``backend=`` overrides the table (e.g. ``gloo`` on cuda, or ``cpu:gloo,cuda:nccl``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import importlib
import importlib.util
import os
import re
import socket
import time
from collections.abc import Iterator, Mapping
from typing import List, Optional

import numpy as np
import torch
import torch.distributed as dist

from gaugeflow.distributed.env import LaunchError, LaunchInfo, detect_launch

#: default collective timeout; a rank that died ends the job after at most about this long
DEFAULT_TIMEOUT_S = 600.0
#: least time given to all ranks to start: Python imports on thousands of nodes take minutes
MIN_START_TIMEOUT_S = 600.0
#: longest wait for the other survivors when naming the ranks behind a failed collective
MAX_REPORT_GRACE_S = 30.0
_STORE_PREFIX = "gaugeflow"


class DistConfigError(ValueError):
    """A device, backend or strategy choice that cannot work here; the message says why."""


class PeerFailure(RuntimeError):
    """A collective or the start-up failed because of another rank; ``missing`` names the suspects."""

    def __init__(self, message: str, missing: list[int] | None = None):
        super().__init__(message)
        self.missing = list(missing or [])


@dataclasses.dataclass
class DistConf:
    """Schema of the ``dist`` config group (conf/dist/none.yaml, conf/dist/ddp.yaml)."""

    strategy: str = "none"  # none | ddp | fsdp
    backend: Optional[str] = None  # null: from the device (gloo / nccl / xccl)
    timeout_s: float = DEFAULT_TIMEOUT_S
    device: str = "auto"  # auto | cpu | cuda | xpu (each rank takes local_rank modulo the visible devices)
    lattice_grid: Optional[List[int]] = None  # ranks per lattice axis (domain decomposition); null: none
    activation_checkpointing: bool = False  # recompute each coupling layer's activations in backward
    param_dtype: Optional[str] = None  # fsdp mixed precision of the networks: bfloat16 | float32 | null
    reduce_dtype: Optional[str] = "float32"  # fsdp mixed precision: dtype of the gradient reduce-scatter
    reshard_after_forward: bool = True  # fsdp: free gathered parameters after each layer (ZeRO-3)


# ---------------------------------------------------------------------------------------------
# device and backend


def _xpu_available() -> bool:
    return hasattr(torch, "xpu") and torch.xpu.is_available()


def select_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """This rank's device, set as the current one for cuda/xpu before any process group exists.

    ``auto`` takes cuda, else xpu, else cpu. Without an explicit index the device is
    ``local_rank % device_count``: one rank per GPU (or Aurora tile) when the launcher shows all
    devices to every rank, device 0 when ``ZE_AFFINITY_MASK``/``CUDA_VISIBLE_DEVICES`` shows one.
    """
    text = (name or "auto").strip().lower()
    if text == "auto":
        text = "cuda" if torch.cuda.is_available() else "xpu" if _xpu_available() else "cpu"
    try:
        dev = torch.device(text)
    except RuntimeError:
        raise DistConfigError(f"device must be auto, cpu, cuda or xpu, got {name!r}") from None
    if dev.type == "cpu":
        return torch.device("cpu")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DistConfigError(f"device={name} but no CUDA device is available")
        backend_mod = torch.cuda
    elif dev.type == "xpu":
        if not _xpu_available():
            raise DistConfigError(f"device={name} but no XPU device is available (load the frameworks module)")
        backend_mod = torch.xpu
    else:
        raise DistConfigError(f"device must be auto, cpu, cuda or xpu, got {name!r}")
    count = backend_mod.device_count()
    index = dev.index if dev.index is not None else local_rank % count
    if not 0 <= index < count:
        raise DistConfigError(f"device={name}: index {index} but only {count} {dev.type} devices are visible")
    backend_mod.set_device(index)
    return torch.device(dev.type, index)


def _xccl_available() -> bool:
    probe = getattr(dist, "is_xccl_available", None)
    return bool(probe and probe())


def _ccl_importable() -> bool:
    return importlib.util.find_spec("oneccl_bindings_for_pytorch") is not None


def choose_backend(device_type: str, override: str | None = None, *,
                   xccl_available: bool | None = None, ccl_importable: bool | None = None) -> str:
    """The collective backend for ``device_type`` (see the module table); ``override`` wins if it can work.

    ``xccl_available``/``ccl_importable`` default to probing this installation; tests pass them.
    """
    xccl = _xccl_available() if xccl_available is None else xccl_available
    ccl = _ccl_importable() if ccl_importable is None else ccl_importable
    if override is not None and str(override).strip() not in ("", "auto", "none", "null"):
        name = str(override).strip().lower()
        if name == "ccl" and not ccl:
            raise DistConfigError("backend=ccl needs oneccl_bindings_for_pytorch, which is not installed; "
                                  "use xccl (torch >= 2.8) instead")
        if name == "nccl" and device_type != "cuda":
            raise DistConfigError(f"backend=nccl needs device=cuda, not {device_type}")
        if name in ("xccl", "ccl") and device_type != "xpu":
            raise DistConfigError(f"backend={name} needs device=xpu, not {device_type}")
        if name == "xccl" and not xccl:
            raise DistConfigError("backend=xccl but this torch has no xccl (needs torch >= 2.8 built for XPU)")
        return name
    if device_type == "cpu":
        return "gloo"
    if device_type == "cuda":
        return "nccl"
    if device_type == "xpu":
        if xccl:
            return "xccl"
        if ccl:
            return "ccl"
        raise DistConfigError("no collective backend for xpu: this torch has no xccl (torch >= 2.8 for XPU) "
                              "and oneccl_bindings_for_pytorch is not installed")
    raise DistConfigError(f"no collective backend for device type {device_type!r}")


# ---------------------------------------------------------------------------------------------
# random streams


def rank_seed(seed: int, rank: int) -> int:
    """An independent 63-bit seed for ``rank``'s random stream, derived from the job's ``seed``.

    NumPy's ``SeedSequence(seed, spawn_key=(rank,))`` hashes the pair (its documented way to
    spawn parallel streams; O'Neill's seed_seq hashing). ``seed + rank`` would not do: the runs
    with seed 0 and seed 1 would share all but one of their rank streams, so "independent" runs
    that differ by one in the seed would not be. Deterministic across processes and platforms,
    so a resumed job gets the same streams.

    >>> rank_seed(0, 0) != rank_seed(0, 1) != rank_seed(1, 0)
    True
    """
    if rank < 0:
        raise ValueError(f"rank must be >= 0, got {rank}")
    sequence = np.random.SeedSequence(int(seed) % 2**64, spawn_key=(int(rank),))
    return int(sequence.generate_state(1, np.uint64)[0] >> np.uint64(1))


# ---------------------------------------------------------------------------------------------
# failure reports


_COMM_ERROR = re.compile(r"gloo|nccl|xccl|\bccl\b|connection (reset|closed|refused)|timed out|timeout|"
                         r"socket|peer|broken pipe", re.IGNORECASE)


def _is_comm_error(err: BaseException) -> bool:
    if isinstance(err, dist.DistError):
        return True
    return isinstance(err, RuntimeError) and bool(_COMM_ERROR.search(str(err)))


def _first_line(err: BaseException) -> str:
    text = (str(err).strip().splitlines() or [type(err).__name__])[0]
    # gloo prefixes its messages with the C++ source location: noise in a one-line report
    text = re.sub(r"^\[[^\]]*\.(cc|cpp|h|hpp):\d+\]\s*", "", text)
    return text.split(" This is typically caused", 1)[0]  # gloo's generic advice after the facts


def _ranks_text(ranks: list[int], limit: int = 8) -> str:
    shown = ", ".join(str(r) for r in ranks[:limit])
    more = f" and {len(ranks) - limit} more" if len(ranks) > limit else ""
    return f"rank{'s' if len(ranks) > 1 else ''} {shown}{more}"


def _absent(store, keys: list[str]) -> list[int]:
    # bisection with Store.check (true iff all keys exist): O(k log n) round trips for k absentees
    if store.check(keys):
        return []
    if len(keys) == 1:
        return [int(keys[0].rsplit("/", 1)[1])]
    mid = len(keys) // 2
    return _absent(store, keys[:mid]) + _absent(store, keys[mid:])


def _check_in(store, tag: str, rank: int, world: int, wait_s: float) -> list[int]:
    """Mark ``rank`` present under ``tag``; wait up to ``wait_s`` for all; return the ranks absent."""
    store.set(f"{tag}/{rank}", socket.gethostname())
    if store.add(f"{tag}/count", 1) >= world:
        store.set(f"{tag}/all", "1")  # the last to arrive releases the others
    try:
        store.wait([f"{tag}/all"], datetime.timedelta(seconds=max(wait_s, 0.01)))
        return []
    except (RuntimeError, dist.DistError):  # the store's wait timed out: someone is missing
        return _absent(store, [f"{tag}/{r}" for r in range(world)])


# ---------------------------------------------------------------------------------------------
# the context


@dataclasses.dataclass
class DistContext:
    """This process's place in the job, and the handle that ends it (:meth:`shutdown`)."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    backend: str | None
    launcher: str
    timeout_s: float
    report_grace_s: float = 0.0
    _store: object = dataclasses.field(default=None, repr=False)
    _failures: int = dataclasses.field(default=0, repr=False)

    @property
    def is_main(self) -> bool:
        """Rank 0 owns the run directory, logs, wandb and console progress."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.backend is not None

    def shutdown(self) -> None:
        """Destroy the process group (if any); safe to call twice.

        Rank 0 hosts the store's server, so it leaves last: it waits (briefly) until every other
        rank has destroyed its process group. A peer whose teardown found the server gone could
        abort its process ("terminate called without an active exception") after a good run.
        """
        if self.backend is not None and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
            self._depart()
        self._store = None

    def _depart(self) -> None:
        store = self._store
        if store is None or self.world_size < 2:
            return
        try:
            if self.rank != 0:
                store.set(f"{_STORE_PREFIX}/exit/{self.rank}", "1")
            else:
                store.set_timeout(datetime.timedelta(seconds=min(30.0, self.report_grace_s + 10)))
                store.wait([f"{_STORE_PREFIX}/exit/{r}" for r in range(1, self.world_size)])
        except Exception:  # noqa: BLE001 - a peer that died already: nobody left to wait for
            pass

    def __enter__(self) -> "DistContext":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    @contextlib.contextmanager
    def guard(self, what: str = "collective") -> Iterator[None]:
        """Turn a communication error inside the block into a one-line :class:`PeerFailure`.

        The survivors check in on the TCP store for ``report_grace_s``; whoever does not is
        named (it exited, or hangs outside the collective). If rank 0 died, the store died with
        it, and the message says so. Errors that are not communication errors pass unchanged.
        """
        if not self.is_distributed:
            yield
            return
        t0 = time.monotonic()
        try:
            yield
        except PeerFailure:
            raise
        except Exception as err:
            if not _is_comm_error(err):
                raise
            raise self._peer_failure(what, err, time.monotonic() - t0) from err

    def barrier(self) -> None:
        """A guarded barrier (a no-op for a single process)."""
        if self.is_distributed:
            with self.guard("barrier"):
                dist.barrier()

    def _peer_failure(self, what: str, err: BaseException, elapsed: float) -> PeerFailure:
        self._failures += 1
        head = f"rank {self.rank} of {self.world_size}: {what} failed after {elapsed:.1f} s"
        tail = f"[{self.backend}: {_first_line(err)}]"
        if self._store is None:
            return PeerFailure(f"{head} {tail}")
        try:
            self._store.set_timeout(datetime.timedelta(seconds=self.report_grace_s + 10))
            missing = _check_in(self._store, f"{_STORE_PREFIX}/failure/{self._failures}",
                                self.rank, self.world_size, self.report_grace_s)
        except Exception:  # noqa: BLE001 - the store is gone: it lived in rank 0
            who = ("the rendezvous store is gone, so rank 0 (its host) exited or hangs" if self.rank != 0
                   else "the rendezvous store on this rank failed")
            return PeerFailure(f"{head}: {who} {tail}", [0] if self.rank != 0 else [])
        if missing:
            who = f"{_ranks_text(missing)} did not report within {self.report_grace_s:.0f} s (exited or hung)"
        else:
            who = "every rank reported, so the fault is in the transport, not a lost rank"
        return PeerFailure(f"{head}: {who} {tail}", missing)


def _short(host: str) -> str:
    return host.split(".", 1)[0].lower()


def _open_store(info: LaunchInfo, timeout_s: float):
    is_server = info.rank == 0 and not info.agent_store
    if is_server and info.rendezvous == "hostfile" and _short(socket.gethostname()) != _short(info.master_addr):
        # a custom --hostfile moved rank 0 off the node file's first host: say so instead of hanging
        raise LaunchError(f"rank 0 runs on {socket.gethostname()} but the rendezvous address taken from the "
                          f"node list is {info.master_addr}; export MASTER_ADDR (and MASTER_PORT) or "
                          "GAUGEFLOW_RENDEZVOUS=mpi")
    try:
        return dist.TCPStore(info.master_addr, info.master_port, info.world_size, is_master=is_server,
                             timeout=datetime.timedelta(seconds=timeout_s), wait_for_workers=False)
    except (RuntimeError, dist.DistError) as err:
        where = f"{info.master_addr}:{info.master_port}"
        if is_server:
            raise LaunchError(f"rank 0 could not open the rendezvous store on {where} ({_first_line(err)}); "
                              "another job on this node may hold the port: export MASTER_PORT") from None
        raise PeerFailure(f"rank {info.rank} of {info.world_size}: could not reach the rendezvous store on {where} "
                          f"within {timeout_s:.0f} s, so rank 0 did not start or exited ({_first_line(err)})",
                          [0]) from None


def init_distributed(device: str = "auto", backend: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S, *,
                     env: Mapping[str, str] | None = None, report_grace_s: float | None = None,
                     start_timeout_s: float | None = None) -> DistContext:
    """Detect the launch, set the device, and start the process group (none for a single process).

    ``timeout_s`` bounds every collective: a rank that dies or hangs ends the job with a
    :class:`PeerFailure` naming it (under :meth:`DistContext.guard`) instead of hanging until the
    walltime. ``report_grace_s`` (default ``min(timeout_s / 2, 30)``) is how long survivors wait
    for each other before naming the absent ranks. ``start_timeout_s`` (default
    ``max(timeout_s, 600)``) bounds the start-up: reaching rank 0's store and every rank checking
    in; ranks that never started are named.
    """
    if not timeout_s > 0:
        raise DistConfigError(f"timeout_s must be > 0, got {timeout_s}")
    start_s = max(timeout_s, MIN_START_TIMEOUT_S) if start_timeout_s is None else float(start_timeout_s)
    info = detect_launch(env)
    dev = select_device(device, info.local_rank)
    grace = min(timeout_s / 2, MAX_REPORT_GRACE_S) if report_grace_s is None else float(report_grace_s)
    if not info.is_distributed:
        return DistContext(info.rank, 1, info.local_rank, info.local_world_size, dev, None, info.launcher,
                           float(timeout_s), grace)
    name = choose_backend(dev.type, backend)
    if name == "ccl":
        importlib.import_module("oneccl_bindings_for_pytorch")  # registers the "ccl" backend
    # libraries that read the torch variables (the legacy ccl backend among them) see the launch
    for key, value in (("RANK", info.rank), ("WORLD_SIZE", info.world_size), ("LOCAL_RANK", info.local_rank),
                       ("LOCAL_WORLD_SIZE", info.local_world_size), ("MASTER_ADDR", info.master_addr),
                       ("MASTER_PORT", info.master_port)):
        os.environ.setdefault(key, str(value))

    store = _open_store(info, start_s)
    missing = _check_in(store, f"{_STORE_PREFIX}/started", info.rank, info.world_size, start_s)
    store.set_timeout(datetime.timedelta(seconds=timeout_s))
    if missing:
        raise PeerFailure(f"rank {info.rank} of {info.world_size}: {_ranks_text(missing)} did not start within "
                          f"{start_s:.0f} s ({info.launcher} launch, store {info.master_addr}:{info.master_port})",
                          missing)
    ctx = DistContext(info.rank, info.world_size, info.local_rank, info.local_world_size, dev, name,
                      info.launcher, float(timeout_s), grace, _store=store)
    with ctx.guard("init_process_group"):
        dist.init_process_group(name, store=dist.PrefixStore("pg", store), rank=info.rank,
                                world_size=info.world_size, timeout=datetime.timedelta(seconds=timeout_s),
                                device_id=dev if dev.type != "cpu" else None)
    return ctx


def init_from_config(conf, *, env: Mapping[str, str] | None = None) -> DistContext:
    """:func:`init_distributed` from a ``dist`` config node (:class:`DistConf` or its DictConfig).

    ``strategy: none`` refuses a multi-rank launch: N copies of a single-process job would all
    write the same run directory.
    """
    strategy = str(conf.strategy).lower()
    if strategy not in ("none", "ddp", "fsdp"):
        raise DistConfigError(f"dist.strategy must be none, ddp or fsdp, got {conf.strategy!r}")
    if strategy == "none":
        info = detect_launch(env)
        if info.is_distributed:
            raise DistConfigError(f"launched as {info.world_size} ranks ({info.launcher}) but dist.strategy=none; "
                                  "add dist=ddp or start one process")
    return init_distributed(conf.device, conf.backend, float(conf.timeout_s), env=env)
