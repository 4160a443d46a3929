"""The production paths of ``gaugeflow train``: stops of each kind and resumes, schedules across
invocations, restoring the run's physics, starting from trained weights, untrusted targets,
interrupted checkpoint writes, mid-run errors and launches of 3 and 12 ranks."""

import csv
import math
import os
import pathlib
import subprocess
import sys

import h5py
import numpy as np
import pytest
from omegaconf import OmegaConf

from gaugeflow.io.checkpoint import load_checkpoint
from gaugeflow.io.tree import read_tree, write_tree
from test_train_distributed import launch

ENV = {**os.environ, "HYDRA_FULL_ERROR": "0", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
LR = 5e-3
SMALL = ["model=small", "model.n_layers=2", "model.hidden=[4]", "train.batch_size=8", "train.steps=8",
         "train.log_every=1", "train.checkpoint_every=4", "train.eval_samples=16", "seed=5", "lattice.shape=[4,4]",
         f"train.lr={LR}", "train.progress=false"]


def gaugeflow(*args, cwd, env=ENV):
    return subprocess.run([sys.executable, "-m", "gaugeflow.cli.main", "train", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def ok(r):
    assert r.returncode == 0, r.stderr
    return r


def weights(path):
    with h5py.File(path) as f:
        return {k: f["model"][k][()] for k in f["model"]}


def rows(run):
    return list(csv.DictReader(open(pathlib.Path(run) / "metrics.csv")))


def one_line_error(r, code=2):
    assert r.returncode == code, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.stderr, r.stderr
    return lines[0]


def test_lr_column_is_the_lr_each_step_trained_with(tmp_path):
    ok(gaugeflow(*SMALL, "hydra.run.dir=run", cwd=tmp_path))
    lrs = [float(r["lr"]) for r in rows(tmp_path / "run")]
    want = [LR * 0.5 * (1 + math.cos(math.pi * k / 8)) for k in range(8)]  # step k+1 trains with factor(k)
    assert lrs == pytest.approx(want, rel=1e-12, abs=1e-15)
    assert [r["restart"] for r in rows(tmp_path / "run")] == ["0"] * 8


def test_each_kind_of_stop_resumes_bitwise_with_a_step_planned_schedule(tmp_path):
    steps = [*SMALL, "sched.horizon=steps"]
    ok(gaugeflow(*steps, "hydra.run.dir=full", cwd=tmp_path))
    # stop_after, then a train.max_time stop (the budget counts from the process start, so a
    # millisecond budget stops before the next step), then to the end
    ok(gaugeflow(*steps, "train.stop_after=3", "hydra.run.dir=part", cwd=tmp_path))
    r = ok(gaugeflow(*steps, "resume=part", "train.max_time=0.001", "hydra.run.dir=x1", cwd=tmp_path))
    assert "stopped by train.max_time" in r.stdout and "skipped: no time left" in r.stdout
    assert load_checkpoint(tmp_path / "part").step == 3
    ok(gaugeflow(*steps, "resume=part", "hydra.run.dir=x2", cwd=tmp_path))
    a = weights(tmp_path / "full" / "checkpoints" / "step_00000008.h5")
    b = weights(tmp_path / "part" / "checkpoints" / "step_00000008.h5")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    full, part = rows(tmp_path / "full"), rows(tmp_path / "part")
    assert [r["step"] for r in part] == [r["step"] for r in full]
    assert [r["lr"] for r in part] == [r["lr"] for r in full] and [r["loss"] for r in part] == [r["loss"] for r in full]


def test_time_plans_end_with_max_time_and_resume_as_a_new_cycle(tmp_path):
    timed = [*SMALL, "train.steps=1000", "sched.min_lr=1e-5"]
    # inside its plan (stop_after): the resumed run continues it
    ok(gaugeflow(*timed, "train.max_time=600", "train.stop_after=3", "hydra.run.dir=run", cwd=tmp_path))
    r = ok(gaugeflow(*timed, "resume=run", "train.max_time=600", "train.stop_after=2", "hydra.run.dir=x", cwd=tmp_path))
    assert "new cycle" not in r.stdout
    # a max_time stop ends the plan; the next invocation restarts from the base lr in one line
    ok(gaugeflow(*timed, "resume=run", "train.max_time=0.001", "hydra.run.dir=x", cwd=tmp_path))
    r = ok(gaugeflow(*timed, "resume=run", "train.max_time=600", "train.stop_after=2", "hydra.run.dir=x",
                     cwd=tmp_path))
    assert r.stdout.count("new cycle") == 1
    got = rows(tmp_path / "run")
    assert [int(x["step"]) for x in got] == [1, 2, 3, 4, 5, 6, 7]  # no extra row
    assert [x["restart"] for x in got] == ["0"] * 5 + ["1", "0"]
    assert float(got[5]["lr"]) == pytest.approx(LR, rel=1e-12)  # the first step of the new cycle
    assert float(got[6]["lr"]) < LR
    # with sched.restart_lr the new cycle starts there
    ok(gaugeflow(*timed, "resume=run", "train.max_time=0.001", "hydra.run.dir=x", cwd=tmp_path))
    ok(gaugeflow(*timed, "resume=run", "sched.restart_lr=1e-3", "train.stop_after=1", "hydra.run.dir=x", cwd=tmp_path))
    assert float(rows(tmp_path / "run")[-1]["lr"]) == pytest.approx(1e-3, rel=1e-12)


def test_resume_keeps_the_run_theory_and_lattice(tmp_path):
    ok(gaugeflow(*SMALL, "theory.beta=1.5", "train.stop_after=2", "hydra.run.dir=run", cwd=tmp_path))
    line = one_line_error(gaugeflow(*SMALL, "resume=run", "theory.beta=2.5", "hydra.run.dir=x", cwd=tmp_path))
    assert "theory.beta=2.5" in line and "theory.beta=1.5" in line
    line = one_line_error(gaugeflow(*SMALL, "resume=run", "lattice.shape=[6,6]", "hydra.run.dir=x", cwd=tmp_path))
    assert "lattice.shape=[6,6]" in line and "lattice.shape=[4,4]" in line
    assert "'su2_2d'" in one_line_error(gaugeflow(*SMALL, "resume=run", "theory=su2_2d", "hydra.run.dir=x",
                                                  cwd=tmp_path))
    # the preset named again (as job scripts do) and an equal key change nothing
    ok(gaugeflow(*SMALL, "resume=run", "theory=u1_2d", "theory.beta=1.5", "train.stop_after=1", "hydra.run.dir=x",
                 cwd=tmp_path))
    saved = OmegaConf.create(load_checkpoint(tmp_path / "run").config)
    assert saved.theory.beta == 1.5 and list(saved.lattice.shape) == [4, 4]
    assert load_checkpoint(tmp_path / "run").step == 3


def test_a_checkpoint_outside_a_run_directory_and_stale_temporaries(tmp_path):
    ok(gaugeflow(*SMALL, "train.stop_after=2", "hydra.run.dir=run", cwd=tmp_path))
    ck = tmp_path / "run" / "checkpoints"
    stale = [ck / ".step_00000004.h5.tmp-4242", ck / ".step_00000006.tmp-abc"]
    stale[0].write_bytes(b"half a checkpoint")
    stale[1].mkdir()
    r = ok(gaugeflow(*SMALL, "resume=run", "train.stop_after=1", "hydra.run.dir=x", cwd=tmp_path))
    assert not any(p.exists() for p in stale) and "interrupted checkpoint write" in r.stdout
    loose = tmp_path / "loose.h5"
    loose.write_bytes((ck / "step_00000003.h5").read_bytes())
    r = ok(gaugeflow(*SMALL, "resume=loose.h5", "train.stop_after=1", "hydra.run.dir=cont", cwd=tmp_path))
    assert "not inside a run directory" in r.stdout and "cont" in r.stdout
    assert load_checkpoint(tmp_path / "cont").step == 4 and not (tmp_path / "checkpoints").exists()


def test_init_from_starts_a_new_run_from_trained_weights(tmp_path):
    ok(gaugeflow(*SMALL, "model.hidden=null", "model.n_layers=null", "train.stop_after=3", "hydra.run.dir=run",
                 cwd=tmp_path))
    src = load_checkpoint(tmp_path / "run")
    arch = OmegaConf.create(src.config).model  # the architecture is recorded resolved
    assert arch._target_ == "gaugeflow.flows.models.u1_equivariant" and list(arch.hidden) == [8, 8] and arch.n_layers == 16
    # a larger lattice at a nearby coupling; an lr so small that the weights stay the loaded ones
    # (the model comes from the checkpoint: no model keys on this command line)
    rest = [a for a in SMALL if not a.startswith("model")]
    r = ok(gaugeflow(*rest, "init_from=run", "lattice.shape=[6,6]", "theory.beta=1.2", "train.steps=1",
                     "train.lr=1e-12", "hydra.run.dir=new", cwd=tmp_path))
    assert "shape=[6, 6]" in r.stdout
    new = load_checkpoint(tmp_path / "new")
    saved = OmegaConf.create(new.config)
    assert new.step == 1 and saved.theory.beta == 1.2 and list(saved.lattice.shape) == [6, 6]
    assert list(saved.model.hidden) == [8, 8] and new.attrs["init_from"] == str(src.path)
    assert len(new.attrs["init_from_sha256"]) == 64 and int(new.attrs["init_from_step"]) == 3
    a, b = weights(src.path), weights(new.path)
    assert a.keys() == b.keys() and all(np.allclose(a[k], b[k], rtol=0, atol=1e-9) for k in a)
    assert [x["step"] for x in rows(tmp_path / "new")] == ["1"]  # a new history, not the source's
    line = one_line_error(gaugeflow(*rest, "init_from=run", "model.hidden=[3,3]", "hydra.run.dir=bad", cwd=tmp_path))
    assert "init_from=run" in line and "does not fit" in line and "size mismatch" in line
    one_line_error(gaugeflow(*SMALL, "init_from=run", "resume=run", "hydra.run.dir=bad", cwd=tmp_path))


def test_checkpoint_targets_outside_gaugeflow_and_torch_need_allow_targets(tmp_path):
    ok(gaugeflow(*SMALL, "train.stop_after=2", "hydra.run.dir=run", cwd=tmp_path))
    (tmp_path / "mypkg").mkdir()
    (tmp_path / "mypkg" / "__init__.py").write_text("from torch.optim import Adam as MyAdam\n")
    path = load_checkpoint(tmp_path / "run").path
    with h5py.File(path, "r+") as f:
        f.attrs["config"] = f.attrs["config"].replace("_target_: torch.optim.Adam", "_target_: mypkg.MyAdam")
    env = {**ENV, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ENV.get('PYTHONPATH', '')}"}
    line = one_line_error(gaugeflow(*SMALL, "resume=run", "hydra.run.dir=x", cwd=tmp_path, env=env))
    assert "mypkg.MyAdam" in line and "allow_targets" in line
    ok(gaugeflow(*SMALL, "resume=run", "allow_targets=[mypkg]", "train.stop_after=1", "hydra.run.dir=x",
                 cwd=tmp_path, env=env))
    assert load_checkpoint(tmp_path / "run").step == 3


def test_an_error_inside_a_step_ends_with_one_line_naming_step_and_checkpoint(tmp_path):
    (tmp_path / "boom.py").write_text(
        "from gaugeflow.train.losses import ReverseKL\n"
        "class Boom(ReverseKL):\n"
        "    calls = 0\n"
        "    def __call__(self, *a, **k):\n"
        "        Boom.calls += 1\n"
        "        if Boom.calls == 6:\n"
        "            raise RuntimeError('linalg_eigh_backward: the loss is ill-defined\\nsecond line')\n"
        "        return super().__call__(*a, **k)\n")
    env = {**ENV, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ENV.get('PYTHONPATH', '')}"}
    r = gaugeflow(*SMALL, "loss._target_=boom.Boom", "hydra.run.dir=run", cwd=tmp_path, env=env)
    line = one_line_error(r, code=1)
    assert "step 6" in line and "linalg_eigh_backward" in line and "step_00000004.h5" in line
    assert load_checkpoint(tmp_path / "run").step == 4


def test_peak_memory_is_mib_on_linux_and_macos(monkeypatch):
    import resource

    import torch

    from gaugeflow.train import trainer

    class Usage:
        ru_maxrss = 300 * 2**20  # bytes on macOS, KiB on Linux

    monkeypatch.setattr(resource, "getrusage", lambda who: Usage)
    monkeypatch.setattr(sys, "platform", "darwin")
    assert trainer.peak_memory_mb(torch.device("cpu")) == 300
    monkeypatch.setattr(sys, "platform", "linux")
    assert trainer.peak_memory_mb(torch.device("cpu")) == 300 * 1024


@pytest.mark.parametrize("n", [3, pytest.param(12, marks=pytest.mark.slow)])  # 12: an Aurora node, ~1 min
def test_default_training_on_any_number_of_ranks(tmp_path, n):
    # the theory's default batch (256 for u1_2d) on 3 or 12 replicas (an Aurora node), no hydra.run.dir:
    # rounded up to the next multiple, said once; only rank 0 makes a run directory
    res = launch(n, "dist=ddp", "lattice.shape=[4,4]", "train.steps=2", "train.eval_samples=0",
                 "dist.device=cpu", "dist.timeout_s=120", "train.progress=false", cwd=tmp_path)
    assert all(rc == 0 for rc, _, _ in res), [se for _, _, se in res][:2]
    want = -(-256 // n) * n
    out0 = res[0][1]
    assert out0.count(f"global batch of {want}") == 1 and all(o == "" for _, o, _ in res[1:])
    runs = [p for p in (tmp_path / "outputs" / "train").glob("*/*") if p.is_dir()]
    assert len(runs) == 1, runs
    assert sorted(p.name for p in tmp_path.iterdir()) == ["outputs"]
    saved = OmegaConf.create(load_checkpoint(runs[0]).config)
    assert saved.train.batch_size == want  # the effective global batch is what the run records


def test_fsdp_mixed_precision_reduces_gradients_in_float32_by_default(monkeypatch):
    import torch
    from hydra import compose, initialize_config_dir

    from gaugeflow.cli.common import CONFIG_DIR
    from gaugeflow.cli.train import _param_dtype
    from gaugeflow.distributed import fsdp
    from gaugeflow.distributed.parallel import Parallel

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=["dist=fsdp", "dist.param_dtype=bfloat16"])
    assert cfg.dist.reduce_dtype == "float32"

    class Ctx:  # a two-rank layout without a process group: only the arguments are checked
        is_distributed, rank, world_size = True, 0, 2

    seen = {}
    monkeypatch.setattr(fsdp, "shard_flow_model", lambda model, **kw: seen.update(kw) or model)
    par = Parallel(Ctx(), [4, 4], None, "fsdp")
    monkeypatch.setattr(par, "broadcast_parameters", lambda model: None)
    par.prepare(torch.nn.Linear(2, 2), False, _param_dtype(cfg.dist.param_dtype),
                True, _param_dtype(cfg.dist.reduce_dtype, "dist.reduce_dtype"))
    assert seen["param_dtype"] == torch.bfloat16 and seen["reduce_dtype"] == torch.float32
    par.prepare(torch.nn.Linear(2, 2), False, None, True, torch.float32)  # no mixed precision: the model's dtype
    assert seen["param_dtype"] is None and seen["reduce_dtype"] is None


@pytest.mark.slow  # old-checkpoint compatibility (~16 s): python -m pytest -m slow
def test_a_run_written_before_resolved_architectures_and_cycles_resumes(tmp_path):
    ok(gaugeflow(*SMALL, "model.hidden=null", "train.stop_after=2", "hydra.run.dir=run", cwd=tmp_path))
    path = load_checkpoint(tmp_path / "run").path
    with h5py.File(path, "r+") as f:  # as an older gaugeflow wrote it
        f.attrs["config"] = f.attrs["config"].replace("hidden:\n  - 8\n  - 8\n", "hidden: null\n")
        state = read_tree(f["sched"])
        old = {k: state[k] for k in ("lambda_lr", "total", "horizon")}  # before cycles existed
        del f["sched"]
        write_tree(f.create_group("sched"), old)
    assert "hidden: null" in load_checkpoint(path).config
    metrics = tmp_path / "run" / "metrics.csv"
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join(line.rsplit(",", 1)[0] for line in lines) + "\n")  # no restart column
    ok(gaugeflow(*SMALL, "model.hidden=null", "resume=run", "train.stop_after=1", "hydra.run.dir=x", cwd=tmp_path))
    got = rows(tmp_path / "run")
    assert [x["step"] for x in got] == ["1", "2", "3"] and [x["restart"] for x in got] == ["", "", "0"]
    # a checkpoint whose weights do not fit names what is missing, in one line
    with h5py.File(load_checkpoint(tmp_path / "run").path, "r+") as f:
        del f["model"]["flow.layers.0.net.net.0.weight"]
    line = one_line_error(gaugeflow(*SMALL, "model.hidden=null", "resume=run", "hydra.run.dir=x", cwd=tmp_path))
    assert "flow.layers.0.net.net.0.weight" in line


@pytest.mark.parametrize("job", ["train", "sample", "score"])
def test_allow_targets_is_a_key_of_every_job_that_reads_checkpoints(job):
    from hydra import compose, initialize_config_dir

    import gaugeflow.cli.sample  # noqa: F401  (registers the sample and score schemas)
    import gaugeflow.cli.score  # noqa: F401
    import gaugeflow.cli.train  # noqa: F401
    from gaugeflow.cli.common import CONFIG_DIR
    from gaugeflow.cli.restore import check_targets
    from gaugeflow.cli.common import UsageError

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(job, overrides=["allow_targets=[mypkg]"])
    assert list(cfg.allow_targets) == ["mypkg"]
    allowed = ("gaugeflow.", "torch.", *cfg.allow_targets)
    check_targets({"a": {"_target_": "mypkg.Flow"}, "b": [{"_target_": "torch.optim.Adam"}]}, allowed, "x")
    with pytest.raises(UsageError, match="mypkgx.Flow"):
        check_targets({"a": [{"_target_": "mypkgx.Flow"}]}, allowed, "x")  # a prefix is a package, not a string
    with pytest.raises(UsageError, match="os.system"):
        check_targets({"_target_": "os.system"}, ("gaugeflow.", "torch."), "x")
