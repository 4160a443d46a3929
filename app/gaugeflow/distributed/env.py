"""Who am I in this launch? Rank, world size, local rank and rendezvous address from the environment.

One chain of environment variables covers the launchers gaugeflow meets, first match wins:

=========  ==========================================================  ==============================
launcher   rank / world size / local rank / local size                  source
=========  ==========================================================  ==============================
torchrun   RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE              torch.distributed.run docs
           (``env`` when set by hand without TORCHELASTIC_RUN_ID)
pals/pmi   PMI_RANK | PALS_RANKID | PMIX_RANK, PMI_SIZE | PALS_SIZE,    ALCF Aurora/Polaris user guides
           PALS_LOCAL_RANKID | PMI_LOCAL_RANK | MPI_LOCALRANKID,       (Cray PALS ``mpiexec``, MPICH
           PALS_LOCAL_SIZE | PMI_LOCAL_SIZE | MPI_LOCALNRANKS          Hydra)
ompi       OMPI_COMM_WORLD_RANK, _SIZE, _LOCAL_RANK, _LOCAL_SIZE       Open MPI ``mpirun(1)``
slurm      SLURM_PROCID, SLURM_STEP_NUM_TASKS, SLURM_LOCALID,          Slurm ``srun(1)`` output
           SLURM_STEP_TASKS_PER_NODE + SLURM_NODEID                    environment
mpi4py     MPI.COMM_WORLD, only when an MPI launcher left a rank        mpi4py docs
           (PMIX_RANK, PALS_RANKID, PMI_FD, ...) but no world size
single     nothing of the above: a plain ``python`` run
=========  ==========================================================  ==============================

Slurm counts only inside an ``srun`` step (``SLURM_STEP_NUM_TASKS``): a batch script itself also
carries ``SLURM_PROCID=0`` and ``SLURM_NTASKS=N``, and a plain ``python`` there is one process.

Rendezvous address (where rank 0 hosts the TCP store), first that applies
(``GAUGEFLOW_RENDEZVOUS=env|hostfile|mpi|local`` forces one):

1. ``MASTER_ADDR`` and ``MASTER_PORT`` from the environment (torchrun always sets them);
2. ``hostfile``: the first host of ``$PBS_NODEFILE`` or of the Slurm step's node list, the host
   that ``mpiexec``/``srun`` place rank 0 on by default; the port is derived from the job id
   (:func:`job_port`), so every rank computes the same pair without talking to the others;
3. ``local``: all ranks on one host (the launcher says so): 127.0.0.1 and the job-derived port;
4. ``mpi``: rank 0's host name and a free port broadcast with mpi4py (imported only here).

mpi4py is never imported unless step "mpi4py" of the rank chain or step 3 is taken.
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
import zlib
from collections.abc import Mapping

#: first port of the range the job-derived port falls in (below Linux's ephemeral range 32768+)
PORT_BASE = 20000
PORT_SPAN = 10000

# variables an MPI launcher sets in the processes it starts even when it exports no world size
# (never ones a module sets globally: a plain python run must stay a single process)
_MPI_HINTS = ("PMIX_RANK", "PALS_RANKID", "PMI_FD", "MV2_COMM_WORLD_RANK")


class LaunchError(RuntimeError):
    """The environment describes an inconsistent or incomplete launch; the message says what to set."""


@dataclasses.dataclass(frozen=True)
class LaunchInfo:
    """Where this process stands in the launch.

    ``rendezvous`` says how ``master_addr``/``master_port`` were obtained: ``env``, ``hostfile``,
    ``mpi``, ``local``, or ``none`` for a single process (which needs no rendezvous).
    """

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    launcher: str
    master_addr: str | None = None
    master_port: int | None = None
    rendezvous: str = "none"
    agent_store: bool = False  # torchrun's agent hosts the store: every rank connects as a client

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def _int(env: Mapping[str, str], key: str) -> int | None:
    value = env.get(key)
    if value is None or value.strip() == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise LaunchError(f"{key}={value!r} is not an integer") from None


def _first(env: Mapping[str, str], *keys: str) -> int | None:
    for key in keys:
        value = _int(env, key)
        if value is not None:
            return value
    return None


def _need(env: Mapping[str, str], have: str, key: str) -> int:
    value = _int(env, key)
    if value is None:
        raise LaunchError(f"{have} is set but {key} is not; export both or neither")
    return value


def expand_tasks_per_node(spec: str) -> list[int]:
    """Slurm's compressed per-node task counts, e.g. ``"2(x3),1"`` -> ``[2, 2, 2, 1]``."""
    counts: list[int] = []
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if m is None:
            raise LaunchError(f"cannot read Slurm tasks-per-node {spec!r}")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts


def first_slurm_host(nodelist: str) -> str:
    """The first host of a Slurm host list: ``"nid[0012-0015,0020],gpu7"`` -> ``"nid0012"``.

    Each bracket group contributes its first entry with its zero padding kept, as
    ``scontrol show hostnames`` would list it first.
    """
    depth, end = 0, len(nodelist)
    for i, ch in enumerate(nodelist):  # the first host expression ends at a top-level comma
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            end = i
            break
    expr = nodelist[:end].strip()
    if not expr:
        raise LaunchError(f"empty Slurm node list {nodelist!r}")

    def first(m: re.Match) -> str:
        return re.split(r"[,-]", m.group(1), maxsplit=1)[0].strip()

    return re.sub(r"\[([^\]]*)\]", first, expr)


def first_pbs_host(nodefile: str) -> str | None:
    """The first non-empty line of ``$PBS_NODEFILE`` (one line per node with ``place=scatter``)."""
    try:
        with open(nodefile) as fh:
            for line in fh:
                if line.strip():
                    return line.strip()
    except OSError:
        return None
    return None


def job_port(job_id: str | None, base: int = PORT_BASE, span: int = PORT_SPAN) -> int:
    """A port every rank of one job derives alike: ``base + crc32(job id) % span``.

    CRC32, not Python's ``hash()``, which is salted per process. Different jobs sharing a node
    (the debug queues are not exclusive) land on different ports unless their ids collide
    modulo ``span``; a collision shows up as a clear bind error on rank 0, not a silent mix-up.
    """
    if not job_id:
        return 29500  # torch's customary default
    return base + zlib.crc32(job_id.encode()) % span


def _job_id(env: Mapping[str, str]) -> str | None:
    for key in ("PBS_JOBID", "SLURM_JOB_ID", "OMPI_MCA_ess_base_jobid", "PALS_APID", "TORCHELASTIC_RUN_ID"):
        if env.get(key):
            step = env.get("SLURM_STEP_ID", "") if key == "SLURM_JOB_ID" else ""
            return env[key] + (f".{step}" if step else "")
    return None


def _ranks(env: Mapping[str, str]) -> tuple[str, int, int, int | None, int | None] | None:
    """(launcher, rank, world, local_rank, local_world) from the first launcher that matches."""
    if "RANK" in env or "WORLD_SIZE" in env:
        rank = _need(env, "WORLD_SIZE" if "WORLD_SIZE" in env else "RANK", "RANK")
        world = _need(env, "RANK", "WORLD_SIZE")
        name = "torchrun" if "TORCHELASTIC_RUN_ID" in env else "env"
        return name, rank, world, _int(env, "LOCAL_RANK"), _int(env, "LOCAL_WORLD_SIZE")
    # Cray PALS mpiexec (Aurora, Polaris) and MPICH Hydra; with --pmi=pmix PALS still exports its own ids
    pmi_rank, pmi_size = _first(env, "PMI_RANK", "PALS_RANKID", "PMIX_RANK"), _first(env, "PMI_SIZE", "PALS_SIZE")
    if pmi_size is not None or (pmi_rank is not None and "PMI_RANK" in env):
        if pmi_rank is None:
            raise LaunchError("PMI_SIZE is set but PMI_RANK is not; export both or neither")
        if pmi_size is None:
            raise LaunchError("PMI_RANK is set but PMI_SIZE is not; export both or neither")
        name = "pals" if any(k.startswith("PALS_") for k in env) else "pmi"
        return (name, pmi_rank, pmi_size, _first(env, "PALS_LOCAL_RANKID", "PMI_LOCAL_RANK", "MPI_LOCALRANKID"),
                _first(env, "PALS_LOCAL_SIZE", "PMI_LOCAL_SIZE", "MPI_LOCALNRANKS"))
    if "OMPI_COMM_WORLD_RANK" in env:
        return ("ompi", _need(env, "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK"),
                _need(env, "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),
                _int(env, "OMPI_COMM_WORLD_LOCAL_RANK"), _int(env, "OMPI_COMM_WORLD_LOCAL_SIZE"))
    if "SLURM_PROCID" in env and "SLURM_STEP_NUM_TASKS" in env:
        local_world = None
        if env.get("SLURM_STEP_TASKS_PER_NODE") and _int(env, "SLURM_NODEID") is not None:
            counts = expand_tasks_per_node(env["SLURM_STEP_TASKS_PER_NODE"])
            node = _int(env, "SLURM_NODEID")
            local_world = counts[node] if node < len(counts) else None
        return ("slurm", _need(env, "SLURM_STEP_NUM_TASKS", "SLURM_PROCID"),
                _need(env, "SLURM_PROCID", "SLURM_STEP_NUM_TASKS"), _int(env, "SLURM_LOCALID"), local_world)
    return None


def _mpi_comm():
    # imported here and only here: importing mpi4py initialises MPI
    try:
        from mpi4py import MPI
    except ImportError:
        return None
    return MPI


def _mpi_ranks(MPI) -> tuple[int, int, int, int]:
    world = MPI.COMM_WORLD
    node = world.Split_type(MPI.COMM_TYPE_SHARED)
    try:
        return world.Get_rank(), world.Get_size(), node.Get_rank(), node.Get_size()
    finally:
        node.Free()


def _mpi_rendezvous(MPI) -> tuple[str, int]:
    comm = MPI.COMM_WORLD
    pair = None
    if comm.Get_rank() == 0:
        with socket.socket() as s:  # a port free now on rank 0's host; the store binds it next
            s.bind(("", 0))
            pair = (socket.gethostname(), s.getsockname()[1])
    return comm.bcast(pair, root=0)


def detect_launch(env: Mapping[str, str] | None = None) -> LaunchInfo:
    """Read the launch from ``env`` (default ``os.environ``); see the module docstring for the chain.

    Raises :class:`LaunchError` with a one-line message for half-set variables, ranks out of
    range, or a multi-host launch whose rendezvous address cannot be found.
    """
    env = os.environ if env is None else env
    found = _ranks(env)
    mpi = None
    if found is None and any(k in env for k in _MPI_HINTS):
        mpi = _mpi_comm()
        if mpi is None:
            hint = next(k for k in _MPI_HINTS if k in env)
            raise LaunchError(f"started by an MPI launcher ({hint} is set) that exports no world size; "
                              "install mpi4py (pip install -e '.[mpi]') or export RANK and WORLD_SIZE")
        rank, world, local_rank, local_world = _mpi_ranks(mpi)
        found = ("mpi4py", rank, world, local_rank, local_world)
    if found is None:
        return LaunchInfo(rank=0, world_size=1, local_rank=0, local_world_size=1, launcher="single")

    launcher, rank, world, local_rank, local_world = found
    if world < 1 or not 0 <= rank < world:
        raise LaunchError(f"{launcher} launch with rank {rank} and world size {world}: need 0 <= rank < world size")
    local_known = local_world is not None
    if local_world is None:
        per_node = _per_node(env, world)
        local_known = per_node is not None
        local_world = world if per_node is None else per_node
        if local_rank is not None:
            local_world = max(local_rank + 1, local_world)
    if local_rank is None:
        # block placement (mpiexec --ppn, srun's default): consecutive ranks share a node
        local_rank = rank % local_world
    if not 0 <= local_rank < local_world:
        raise LaunchError(f"{launcher} launch with local rank {local_rank} and local size {local_world}")

    if world == 1:
        return LaunchInfo(rank, world, local_rank, local_world, launcher)
    addr, port, how = _rendezvous(env, launcher, world, local_world if local_known else None, mpi)
    return LaunchInfo(rank, world, local_rank, local_world, launcher, addr, port, how,
                      agent_store=env.get("TORCHELASTIC_USE_AGENT_STORE") == "True")


def _per_node(env: Mapping[str, str], world: int) -> int | None:
    # ranks per node from the PBS node file when the launcher does not say; None if unknown
    nodefile = env.get("PBS_NODEFILE")
    if nodefile:
        try:
            with open(nodefile) as fh:
                hosts = {line.strip() for line in fh if line.strip()}
            if hosts and world % len(hosts) == 0:
                return world // len(hosts)
        except OSError:
            pass
    return None


def _rendezvous(env: Mapping[str, str], launcher: str, world: int, local_world: int | None,
                mpi) -> tuple[str, int, str]:
    forced = env.get("GAUGEFLOW_RENDEZVOUS", "auto").strip().lower() or "auto"
    if forced not in ("auto", "env", "hostfile", "mpi", "local"):
        raise LaunchError(f"GAUGEFLOW_RENDEZVOUS must be auto, env, hostfile, mpi or local, got {forced!r}")
    port_env = _int(env, "MASTER_PORT")
    if forced in ("auto", "env") and env.get("MASTER_ADDR"):
        return env["MASTER_ADDR"], port_env if port_env is not None else job_port(_job_id(env)), "env"
    if forced == "env":
        raise LaunchError("GAUGEFLOW_RENDEZVOUS=env but MASTER_ADDR is not set")
    port = port_env if port_env is not None else job_port(_job_id(env))
    if forced in ("auto", "hostfile"):
        host = None
        if env.get("PBS_NODEFILE"):
            host = first_pbs_host(env["PBS_NODEFILE"])
        elif launcher == "slurm" and (env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")):
            host = first_slurm_host(env.get("SLURM_STEP_NODELIST") or env["SLURM_JOB_NODELIST"])
        if host:
            return host, port, "hostfile"
        if forced == "hostfile":
            raise LaunchError("GAUGEFLOW_RENDEZVOUS=hostfile but neither PBS_NODEFILE nor a Slurm node list is set")
    if forced == "local" or (forced == "auto" and local_world == world):
        return "127.0.0.1", port, "local"
    if forced in ("auto", "mpi") and launcher in ("pals", "pmi", "ompi", "slurm", "mpi4py"):
        mpi = mpi or _mpi_comm()
        if mpi is not None:
            host, free_port = _mpi_rendezvous(mpi)
            return host, port_env if port_env is not None else free_port, "mpi"
        if forced == "mpi":
            raise LaunchError("GAUGEFLOW_RENDEZVOUS=mpi but mpi4py is not installed")
    raise LaunchError(f"{launcher} launch of {world} ranks over several hosts without a rendezvous address: "
                      "export MASTER_ADDR and MASTER_PORT, run under PBS or srun, or install mpi4py")


def main_only_hydra_overrides(rank: int) -> list[str]:
    """Hydra overrides that keep ranks other than 0 out of the run directory.

    Every rank runs ``@hydra.main`` and would write ``.hydra/`` and a log file into the same
    directory (see DESIGN.md, known traps); give these to Hydra before it starts on rank != 0.
    """
    if rank == 0:
        return []
    # Hydra creates its run directory on every rank (a timestamped one per rank clock): point it
    # at the working directory, which exists; jobs take rank 0's run directory by broadcast
    return ["hydra.output_subdir=null", "hydra/job_logging=disabled", "hydra/hydra_logging=disabled",
            "hydra.run.dir=."]
