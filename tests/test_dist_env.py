"""Launcher detection, device/backend choice, per-rank seeds, and real 2-process gloo runs.

The multi-process tests start ranks as separate interpreters with the torch environment
variables (what a launcher does), on a free local port, and bound every wait by a timeout.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from gaugeflow.distributed import (
    DistConf,
    DistConfigError,
    LaunchError,
    choose_backend,
    detect_launch,
    init_distributed,
    init_from_config,
    job_port,
    main_only_hydra_overrides,
    rank_seed,
    select_device,
)
from gaugeflow.distributed import env as env_mod
from gaugeflow.distributed.env import expand_tasks_per_node, first_slurm_host
from torch.distributed.elastic.utils.distributed import get_free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def nodefile(tmp_path):
    path = tmp_path / "nodefile"
    hosts = ["x4102c5s0b0n0.hostmgmt2102.cm.aurora.alcf.anl.gov", "x4102c5s1b0n0.hostmgmt2102.cm.aurora.alcf.anl.gov"]
    path.write_text("\n".join(hosts) + "\n")
    return str(path)


@pytest.fixture(autouse=True)
def no_real_mpi(monkeypatch):
    # a test that reaches for mpi4py gets "not installed" unless it installs a fake
    monkeypatch.setattr(env_mod, "_mpi_comm", lambda: None)


# ---------------------------------------------------------------------------------------------
# the chain of environment variables


def test_plain_python_run_is_one_process():
    info = detect_launch({})
    assert (info.rank, info.world_size, info.local_rank, info.local_world_size) == (0, 1, 0, 1)
    assert info.launcher == "single" and info.is_main and not info.is_distributed
    assert info.master_addr is None and info.rendezvous == "none"


def test_os_environ_is_the_default(monkeypatch):
    for key in list(os.environ):
        if key.startswith(("RANK", "WORLD_SIZE", "PMI_", "PALS_", "OMPI_", "SLURM_", "PMIX_")):
            monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29999")
    info = detect_launch()
    assert (info.rank, info.world_size, info.master_port) == (1, 2, 29999)


def test_torchrun():
    info = detect_launch({"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
                          "MASTER_ADDR": "node0", "MASTER_PORT": "29400", "TORCHELASTIC_RUN_ID": "abc",
                          "TORCHELASTIC_USE_AGENT_STORE": "True"})
    assert (info.rank, info.world_size, info.local_rank, info.local_world_size) == (5, 8, 1, 4)
    assert (info.launcher, info.master_addr, info.master_port, info.rendezvous) == ("torchrun", "node0", 29400, "env")
    assert info.agent_store


def test_torch_variables_set_by_hand():
    info = detect_launch({"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1234"})
    assert info.launcher == "env" and info.local_rank == 1 and not info.agent_store


@pytest.mark.parametrize("env, names", [
    ({"RANK": "0"}, "WORLD_SIZE"),
    ({"WORLD_SIZE": "2"}, "RANK"),
    ({"PMI_SIZE": "4"}, "PMI_RANK"),
    ({"PMI_RANK": "1"}, "PMI_SIZE"),
    ({"OMPI_COMM_WORLD_RANK": "1"}, "OMPI_COMM_WORLD_SIZE"),
    ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK"),
])
def test_half_set_variables_are_named(env, names):
    with pytest.raises(LaunchError, match=names):
        detect_launch(env)


def test_rank_out_of_range():
    with pytest.raises(LaunchError, match="0 <= rank < world size"):
        detect_launch({"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"})


def test_aurora_pals(nodefile):
    env = {"PMI_RANK": "13", "PMI_SIZE": "24", "PALS_LOCAL_RANKID": "1", "PALS_LOCAL_SIZE": "12",
           "PALS_NODEID": "1", "PBS_NODEFILE": nodefile, "PBS_JOBID": "1234567.aurora-pbs-0001"}
    info = detect_launch(env)
    assert (info.launcher, info.rank, info.world_size) == ("pals", 13, 24)
    assert (info.local_rank, info.local_world_size) == (1, 12)
    # rank 0 sits on the node file's first host; the port is the same on every rank of the job
    assert info.master_addr.startswith("x4102c5s0b0n0") and info.rendezvous == "hostfile"
    assert info.master_port == job_port("1234567.aurora-pbs-0001")


def test_aurora_pals_under_pmix_without_pmi_rank(nodefile):
    env = {"PALS_RANKID": "3", "PALS_SIZE": "24", "PALS_LOCAL_RANKID": "3", "PMIX_RANK": "3",
           "PBS_NODEFILE": nodefile, "PBS_JOBID": "7"}
    info = detect_launch(env)
    assert (info.launcher, info.rank, info.world_size, info.local_rank) == ("pals", 3, 24, 3)
    # ranks per node from the node file when the launcher does not say: 24 ranks on 2 hosts
    assert info.local_world_size == 12


def test_polaris_pmi_and_mpich_hydra():
    polaris = detect_launch({"PMI_RANK": "6", "PMI_SIZE": "8", "PMI_LOCAL_RANK": "2", "PMI_LOCAL_SIZE": "4",
                             "MASTER_ADDR": "x3001c0s1b0n0", "MASTER_PORT": "2345"})
    assert (polaris.launcher, polaris.local_rank, polaris.local_world_size) == ("pmi", 2, 4)
    hydra = detect_launch({"PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2"})
    assert (hydra.local_rank, hydra.local_world_size) == (1, 2)
    assert (hydra.master_addr, hydra.rendezvous) == ("127.0.0.1", "local")  # one host: loopback


def test_open_mpi():
    info = detect_launch({"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "4",
                          "OMPI_COMM_WORLD_LOCAL_RANK": "0", "OMPI_COMM_WORLD_LOCAL_SIZE": "2",
                          "MASTER_ADDR": "nodeA", "MASTER_PORT": "4000"})
    assert (info.launcher, info.rank, info.world_size, info.local_rank, info.local_world_size) == ("ompi", 2, 4, 0, 2)


def test_slurm_srun_step():
    env = {"SLURM_PROCID": "5", "SLURM_STEP_NUM_TASKS": "8", "SLURM_LOCALID": "1", "SLURM_NODEID": "1",
           "SLURM_STEP_TASKS_PER_NODE": "4(x2)", "SLURM_STEP_NODELIST": "nid[0012-0013]",
           "SLURM_JOB_ID": "77", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "8"}
    info = detect_launch(env)
    assert (info.launcher, info.rank, info.world_size, info.local_rank, info.local_world_size) == ("slurm", 5, 8, 1, 4)
    assert (info.master_addr, info.rendezvous, info.master_port) == ("nid0012", "hostfile", job_port("77.0"))


def test_slurm_batch_script_itself_is_one_process():
    # sbatch exports these to the batch shell; a plain `python` there is not an 8-rank launch
    info = detect_launch({"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_LOCALID": "0", "SLURM_JOB_ID": "77",
                          "SLURM_JOB_NODELIST": "nid[0012-0013]"})
    assert info.launcher == "single" and info.world_size == 1


def test_precedence_torchrun_then_pmi_then_ompi_then_slurm():
    torch_env = {"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "a", "MASTER_PORT": "1"}
    pmi = {"PMI_RANK": "3", "PMI_SIZE": "4", "MASTER_ADDR": "a", "MASTER_PORT": "1"}
    ompi = {"OMPI_COMM_WORLD_RANK": "5", "OMPI_COMM_WORLD_SIZE": "6"}
    slurm = {"SLURM_PROCID": "6", "SLURM_STEP_NUM_TASKS": "7"}
    assert detect_launch({**slurm, **ompi, **pmi, **torch_env}).launcher == "env"
    assert detect_launch({**slurm, **ompi, **pmi}).launcher == "pmi"
    assert detect_launch({**slurm, **ompi, "MASTER_ADDR": "a"}).launcher == "ompi"
    assert detect_launch({**slurm, "MASTER_ADDR": "a"}).launcher == "slurm"


def test_rendezvous_order_and_forcing(nodefile):
    base = {"PMI_RANK": "0", "PMI_SIZE": "24", "PALS_LOCAL_RANKID": "0", "PALS_LOCAL_SIZE": "12",
            "PBS_NODEFILE": nodefile, "PBS_JOBID": "9"}
    assert detect_launch({**base, "MASTER_ADDR": "m", "MASTER_PORT": "5"}).master_addr == "m"
    forced = detect_launch({**base, "MASTER_ADDR": "m", "GAUGEFLOW_RENDEZVOUS": "hostfile"})
    assert forced.rendezvous == "hostfile" and forced.master_addr.startswith("x4102c5s0b0n0")
    # MASTER_PORT alone keeps the host from the node file and the port from the user
    assert detect_launch({**base, "MASTER_PORT": "31000"}).master_port == 31000
    with pytest.raises(LaunchError, match="GAUGEFLOW_RENDEZVOUS must be"):
        detect_launch({**base, "GAUGEFLOW_RENDEZVOUS": "dns"})
    with pytest.raises(LaunchError, match="MASTER_ADDR is not set"):
        detect_launch({**base, "GAUGEFLOW_RENDEZVOUS": "env"})


def test_multi_host_without_address_is_refused():
    env = {"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}
    with pytest.raises(LaunchError, match="MASTER_ADDR"):
        detect_launch(env)


class _FakeComm:
    """Stands in for mpi4py's COMM_WORLD of a 4-rank, 2-per-node job seen from rank 2."""

    def __init__(self, rank=2, size=4, node_rank=0, node_size=2):
        self.r, self.s, self.nr, self.ns = rank, size, node_rank, node_size
        self.bcasts = 0

    def Get_rank(self):
        return self.r

    def Get_size(self):
        return self.s

    def Split_type(self, kind):
        return _FakeComm(self.nr, self.ns)

    def Free(self):
        pass

    def bcast(self, obj, root=0):
        self.bcasts += 1
        return ("rank0-host", 23456)


class _FakeMPI:
    COMM_TYPE_SHARED = 1

    def __init__(self):
        self.COMM_WORLD = _FakeComm()


def test_mpi4py_when_launcher_gives_no_size(monkeypatch):
    fake = _FakeMPI()
    monkeypatch.setattr(env_mod, "_mpi_comm", lambda: fake)
    info = detect_launch({"PMIX_RANK": "2"})
    assert (info.launcher, info.rank, info.world_size, info.local_rank, info.local_world_size) == ("mpi4py", 2, 4, 0, 2)
    assert (info.master_addr, info.master_port, info.rendezvous) == ("rank0-host", 23456, "mpi")
    assert fake.COMM_WORLD.bcasts == 1


def test_mpi_hint_without_mpi4py_says_what_to_install():
    with pytest.raises(LaunchError, match="install mpi4py"):
        detect_launch({"PMIX_RANK": "0"})


def test_no_chain_reaches_for_mpi4py(monkeypatch, nodefile):
    calls = []
    monkeypatch.setattr(env_mod, "_mpi_comm", lambda: calls.append(1))
    for env in ({}, {"PMI_RANK": "0", "PMI_SIZE": "24", "PBS_NODEFILE": nodefile},
                {"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_SIZE": "2"},
                {"SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_NODELIST": "n[1-2]"}):
        detect_launch(env)
    assert calls == []


@pytest.mark.parametrize("nodelist, first", [
    ("nid[0012-0015,0020],gpu7", "nid0012"),
    ("node01", "node01"),
    ("gpu7,nid[1-2]", "gpu7"),
    ("rack[3-4]-n[08,09]", "rack3-n08"),
])
def test_first_slurm_host(nodelist, first):
    assert first_slurm_host(nodelist) == first


def test_slurm_tasks_per_node():
    assert expand_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    with pytest.raises(LaunchError):
        expand_tasks_per_node("two")


def test_job_port_is_stable_and_in_range():
    ports = {job_port(f"{i}.aurora-pbs") for i in range(200)}
    assert all(20000 <= p < 30000 for p in ports) and len(ports) > 190
    assert job_port("42.pbs") == job_port("42.pbs") and job_port(None) == 29500


def test_only_rank_zero_writes_hydra_files():
    assert main_only_hydra_overrides(0) == []
    assert "hydra.output_subdir=null" in main_only_hydra_overrides(3)


# ---------------------------------------------------------------------------------------------
# device, backend, seeds, config


@pytest.mark.parametrize("device, kw, backend", [
    ("cpu", {}, "gloo"),
    ("cuda", {}, "nccl"),
    ("xpu", {"xccl_available": True, "ccl_importable": True}, "xccl"),
    ("xpu", {"xccl_available": False, "ccl_importable": True}, "ccl"),
])
def test_backend_from_device(device, kw, backend):
    assert choose_backend(device, **kw) == backend


def test_backend_overrides_and_refusals():
    assert choose_backend("cuda", "gloo") == "gloo"
    assert choose_backend("cpu", "auto") == "gloo"
    assert choose_backend("cpu", "cpu:gloo,cuda:nccl") == "cpu:gloo,cuda:nccl"
    with pytest.raises(DistConfigError, match="no collective backend for xpu"):
        choose_backend("xpu", xccl_available=False, ccl_importable=False)
    with pytest.raises(DistConfigError, match="oneccl_bindings_for_pytorch"):
        choose_backend("xpu", "ccl", xccl_available=True, ccl_importable=False)
    with pytest.raises(DistConfigError, match="needs device=cuda"):
        choose_backend("cpu", "nccl")
    with pytest.raises(DistConfigError, match="needs device=xpu"):
        choose_backend("cuda", "xccl", xccl_available=True)


def test_device_selection():
    assert select_device("cpu", local_rank=3) == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "xpu" if torch.xpu.is_available() else "cpu"
    assert select_device("auto").type == expected
    with pytest.raises(DistConfigError, match="device must be"):
        select_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(DistConfigError, match="no CUDA device"):
            select_device("cuda")


def test_rank_seeds_are_distinct_and_stable():
    seeds = [rank_seed(s, r) for s in range(4) for r in range(64)]
    assert len(set(seeds)) == len(seeds)
    assert all(0 <= x < 2**63 for x in seeds)
    # the pairs seed + rank would merge: (0, 1) and (1, 0)
    assert rank_seed(0, 1) != rank_seed(1, 0)
    assert rank_seed(7, 3) == rank_seed(7, 3) and rank_seed(-1, 0) == rank_seed(2**64 - 1, 0)
    a = torch.Generator().manual_seed(rank_seed(0, 0))
    b = torch.Generator().manual_seed(rank_seed(0, 1))
    assert not torch.equal(torch.rand(8, generator=a), torch.rand(8, generator=b))


def test_dist_config_files_match_the_schema():
    schema = OmegaConf.structured(DistConf)
    ddp = OmegaConf.merge(schema, OmegaConf.load(os.path.join(ROOT, "conf/dist/ddp.yaml")))
    assert (ddp.strategy, ddp.backend, ddp.device) == ("ddp", None, "auto") and ddp.timeout_s > 0
    none = OmegaConf.merge(schema, OmegaConf.load(os.path.join(ROOT, "conf/dist/none.yaml")))
    job = OmegaConf.create({"device": "cpu", "dist": none})
    assert job.dist.strategy == "none" and job.dist.device == "cpu"  # follows the job's device key


def test_single_process_has_no_process_group():
    ctx = init_distributed("cpu", env={})
    assert (ctx.rank, ctx.world_size, ctx.backend, ctx.is_main, ctx.is_distributed) == (0, 1, None, True, False)
    assert not dist.is_initialized()
    with ctx.guard("nothing"):
        pass
    ctx.barrier()
    ctx.shutdown()
    ctx.shutdown()


def test_config_strategy_none_refuses_a_multi_rank_launch():
    conf = OmegaConf.structured(DistConf(strategy="none", device="cpu"))
    env = {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}
    with pytest.raises(DistConfigError, match="dist=ddp"):
        init_from_config(conf, env=env)
    assert init_from_config(conf, env={}).backend is None
    with pytest.raises(DistConfigError, match="strategy"):
        init_from_config(OmegaConf.structured(DistConf(strategy="zero3")), env={})
    with pytest.raises(DistConfigError, match="timeout_s"):
        init_distributed("cpu", timeout_s=0, env={})


# ---------------------------------------------------------------------------------------------
# real processes


_RANK_SCRIPT = textwrap.dedent("""
    import json, os, sys, time
    import torch, torch.distributed as dist
    from gaugeflow.distributed import PeerFailure, init_distributed, rank_seed
    mode, timeout = sys.argv[1], float(sys.argv[2])
    t0 = time.monotonic()
    # a generous start-up bound: the test machine may start the two interpreters seconds apart
    ctx = init_distributed("cpu", timeout_s=timeout, start_timeout_s=120)
    out = {"rank": ctx.rank, "backend": ctx.backend, "launcher": ctx.launcher,
           "initialized": dist.is_initialized(), "mpi4py": "mpi4py" in sys.modules}
    if ctx.rank == 1 and mode == "die":
        os._exit(7)
    if ctx.rank == 1 and mode == "hang":
        time.sleep(120)
    x = torch.full((3,), float(ctx.rank + 1))
    seed = torch.tensor([rank_seed(0, ctx.rank)], dtype=torch.int64)
    seeds = [torch.zeros(1, dtype=torch.int64) for _ in range(ctx.world_size)]
    t1 = time.monotonic()
    try:
        with ctx.guard("all_reduce"):
            dist.all_reduce(x)
            dist.all_gather(seeds, seed)
        ctx.barrier()
        out.update(sum=x.tolist(), distinct_seeds=len({int(s) for s in seeds}))
    except PeerFailure as err:
        out.update(error=str(err), missing=err.missing)
    out["seconds"] = time.monotonic() - t1  # from the collective on
    ctx.shutdown()
    out["after_shutdown"] = dist.is_initialized()
    print(json.dumps(out), flush=True)
""")

# scenario -> collective timeout in seconds
_SCENARIOS = {"ok": 30.0, "die": 4.0, "hang": 2.0}


@pytest.fixture(scope="module")
def launches(tmp_path_factory):
    """Start every multi-process scenario at once (interpreter start-up dominates), then collect.

    Ranks get the torch variables on a free local port, as a launcher would set them.
    """
    tmp = tmp_path_factory.mktemp("dist")
    script = tmp / "rank.py"
    script.write_text(_RANK_SCRIPT)
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("PMI", "PALS", "OMPI", "SLURM", "MASTER_", "TORCHELASTIC", "LOCAL_",
                                 "RANK", "WORLD_SIZE"))}
    base.update(OMP_NUM_THREADS="1", TORCH_CPP_LOG_LEVEL="ERROR")
    procs: dict[str, list[subprocess.Popen]] = {}
    for mode, timeout in _SCENARIOS.items():
        port = get_free_port()
        procs[mode] = [subprocess.Popen(
            [sys.executable, str(script), mode, str(timeout)],
            env=dict(base, RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in range(2)]
    results = {}
    for mode, group in procs.items():
        results[mode] = []
        for i, p in enumerate(group):
            try:
                # rank 0 reports; a rank left hanging on purpose is ended once rank 0 is done
                stdout, stderr = p.communicate(timeout=120 if i == 0 or mode != "hang" else 0.1)
            except subprocess.TimeoutExpired:
                p.kill()
                stdout, stderr = p.communicate()
            results[mode].append((p.returncode, stdout, stderr))
    return results


def _report(result) -> dict:
    code, stdout, stderr = result
    assert code == 0, stderr
    return json.loads(stdout.strip().splitlines()[-1])


def test_two_gloo_ranks_all_reduce_and_shut_down(launches):
    # fresh interpreters: the env chain and the start-up never imported mpi4py
    for result in launches["ok"]:
        out = _report(result)
        assert (out["backend"], out["launcher"], out["initialized"]) == ("gloo", "env", True)
        assert out["sum"] == [3.0, 3.0, 3.0] and out["distinct_seeds"] == 2
        assert out["after_shutdown"] is False and out["mpi4py"] is False


def test_dead_peer_ends_the_job_within_the_timeout_naming_it(launches):
    # what gloo raises when a peer exits: a RuntimeError "Connection reset/closed by peer" that
    # names an address, not a rank; the guard turns it into one line naming rank 1
    timeout = _SCENARIOS["die"]
    assert launches["die"][1][0] == 7
    out = _report(launches["die"][0])
    assert out["missing"] == [1] and "rank 1 did not report" in out["error"]
    assert "\\n" not in out["error"] and out["error"].startswith("rank 0 of 2: all_reduce failed")
    # gloo notices at once; the report then waits timeout/2 for other survivors
    assert out["seconds"] < timeout


def test_hung_peer_ends_the_job_after_the_timeout(launches):
    timeout = _SCENARIOS["hang"]
    out = _report(launches["hang"][0])
    assert out["missing"] == [1] and "Timed out" in out["error"]
    assert timeout <= out["seconds"] < 1.5 * timeout + 2
