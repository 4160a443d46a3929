"""tools/submit renders job scripts: placeholders filled, shell syntax valid, overrides quoted.

Nothing is submitted: --submit runs against a fake qsub on PATH. The strongest check runs a
rendered script under bash with fake module/conda/mpiexec commands and compares the argument
vector mpiexec receives with what Hydra must get.
"""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
SUBMIT = ROOT / "tools" / "submit"
TEMPLATES = ["jobs/aurora/train.pbs", "jobs/aurora/sample.pbs", "jobs/polaris/train.pbs"]
LEFTOVER = re.compile(r"@[A-Z][A-Z0-9_]*@")
BASH = shutil.which("bash")

pytestmark = pytest.mark.skipif(BASH is None, reason="needs bash")


def submit(*args: str, env: dict | None = None, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SUBMIT), *args], capture_output=True, text=True, timeout=60,
                          env=env, cwd=cwd)


def render(template: str, *overrides: str, nodes: str = "2", queue: str = "debug", extra=()) -> str:
    out = submit("--template", template, "--nodes", nodes, "--queue", queue, "--walltime", "00:30:00",
                 "--account", "PROJ", *extra, "--", *overrides)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_submit_is_an_executable_script_whose_help_names_the_default_template():
    assert os.access(SUBMIT, os.X_OK)
    out = subprocess.run([str(SUBMIT), "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "default: jobs/aurora/train.pbs" in out.stdout


@pytest.mark.parametrize("template", TEMPLATES)
def test_each_template_renders_to_valid_bash(template, tmp_path):
    text = render(template, "theory=su3_4d")
    assert not LEFTOVER.search(text)
    assert text.startswith("#!/bin/bash -l\n")
    for line in ("#PBS -A PROJ", "#PBS -q debug", "#PBS -l place=scatter", "#PBS -l walltime=00:30:00"):
        assert line in text
    assert re.search(r"^#PBS -l select=2(:system=polaris)?$", text, re.MULTILINE)
    assert re.search(r"^#PBS -l filesystems=home:(flare|eagle)$", text, re.MULTILINE)
    assert "WANDB_MODE=offline" in text and "PBS_JOBID" in text
    script = tmp_path / "job.pbs"
    script.write_text(text)
    check = subprocess.run([BASH, "-n", str(script)], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr


def test_aurora_template_pins_module_and_binds_one_rank_per_tile():
    text = render("jobs/aurora/train.pbs")
    assert re.search(r"^module load frameworks/\d{4}\.\d+\.\d+$", text, re.MULTILINE)
    assert "PPN=12" in text and "CCL_" in text and "--cpu-bind=" in text
    binding = re.search(r'CPU_BIND="list:([0-9:-]+)"', text).group(1).split(":")
    assert len(binding) == 12  # one core range per tile
    assert "gaugeflow train dist=ddp dist.device=xpu" in text


def _fake_bin(tmp_path: pathlib.Path) -> pathlib.Path:
    """module, conda and mpiexec stand-ins: mpiexec writes its arguments one per line."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("module", "conda"):
        (bin_dir / name).write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "mpiexec").write_text('#!/bin/sh\nfor a in "$@"; do printf "%s\\n" "$a"; done > "$MPIEXEC_ARGS"\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    return bin_dir


@pytest.mark.parametrize("template, launch", [
    ("jobs/aurora/train.pbs", ["--pmi=pmix", "-n", "24", "--ppn", "12"]),
    ("jobs/polaris/train.pbs", ["-n", "8", "--ppn", "4", "--depth=8", "--cpu-bind", "depth"]),
])
def test_overrides_reach_the_command_exactly(template, launch, tmp_path):
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "activate").write_text("")
    overrides = ["theory=su3_4d", "lattice.shape=[8,8,8,8]", "model.hidden=[32, 32]",
                 "train.lr=${oc.env:LR,0.001}", "+note=it's $HOME; `x`"]
    text = render(template, *overrides, extra=("--venv", str(venv)))
    script = tmp_path / "job.pbs"
    script.write_text(text)
    nodefile = tmp_path / "nodes"
    nodefile.write_text("x1000c0s0b0n0\nx1000c0s1b0n0\n")
    env = dict(os.environ, PATH=f"{_fake_bin(tmp_path)}:{os.environ['PATH']}", PBS_O_WORKDIR=str(tmp_path),
               PBS_NODEFILE=str(nodefile), PBS_JOBID="4242.aurora-pbs-0001", MPIEXEC_ARGS=str(tmp_path / "args"))
    done = subprocess.run([BASH, str(script)], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    args = (tmp_path / "args").read_text().splitlines()
    assert args[:len(launch)] == launch
    cmd = args[args.index("gaugeflow"):]
    assert cmd[:5] == ["gaugeflow", "train", "dist=ddp", cmd[3], "hydra.run.dir=outputs/train/4242"]
    # the walltime less a margin ends the run cleanly before PBS kills it, the schedule stays
    # planned for train.steps (later jobs resume the run); then the overrides verbatim
    assert cmd[5:] == ["train.max_time=00:25:00", "sched.horizon=steps", *overrides]


def test_user_max_time_replaces_the_default_and_sample_gets_one():
    text = render("jobs/aurora/train.pbs", "train.max_time=00:10:00")
    assert text.count("train.max_time=") == 1 and "train.max_time=00:10:00" in text
    assert "sched.horizon" not in text  # a budget the user gives is the training's length
    mine = render("jobs/aurora/train.pbs", "sched.horizon=time")
    assert mine.count("sched.horizon=") == 1 and "sched.horizon=time" in mine
    # sampling ends cleanly (ensemble file and summary written) before the walltime, as training does
    sample = render("jobs/aurora/sample.pbs", "checkpoint=outputs/train/1", "sample.n=1000")
    command = sample.split("gaugeflow sample", 1)[1]
    assert "gaugeflow sample dist=ddp" in sample and "outputs/sample/" in sample
    assert command.count("max_time") == 1 and "sample.max_time=00:25:00 checkpoint=outputs/train/1" in command
    assert "train.max_time" not in command and "sched.horizon" not in command
    given = render("jobs/aurora/sample.pbs", "sample.max_time=600").split("gaugeflow sample", 1)[1]
    assert given.count("max_time") == 1 and "sample.max_time=600" in given


@pytest.mark.parametrize("args, message", [
    (["--walltime", "30"], "--walltime must be HH:MM:SS"),
    (["--walltime", "00:61:00"], "--walltime must be HH:MM:SS"),
    (["--nodes", "0"], "--nodes must be >= 1"),
    (["--queue", "debug; rm -rf ~"], "--queue"),
    (["--job-name", "1abc"], "--job-name"),
    (["--venv", "$(touch x)"], "--venv"),
    (["--template", "jobs/nope.pbs"], "no such file"),
    (["--", "--cfg", "job"], "command-line flag"),
    (["--", "theory"], "not a Hydra override"),
])
def test_bad_input_is_one_line_and_exit_2(args, message):
    out = submit("--account", "PROJ", *args)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.startswith("error: ") and message in out.stderr and out.stderr.count("\n") == 1


def test_account_is_required():
    out = submit("--nodes", "1")
    assert out.returncode == 2 and "--account" in out.stderr


def test_unknown_placeholder_in_a_template_is_refused(tmp_path):
    template = tmp_path / "t.pbs"
    template.write_text("#!/bin/bash\n#PBS -A @ACCOUNT@\necho @SOMETHING_ELSE@\n")
    out = submit("--template", str(template), "--account", "PROJ")
    assert out.returncode == 2 and "SOMETHING_ELSE" in out.stderr


def test_queue_limits_warn(tmp_path):
    out = submit("--account", "PROJ", "--nodes", "4", "--queue", "debug")
    assert out.returncode == 0 and "warning: queue debug takes 1-2 nodes" in out.stderr
    out = submit("--account", "PROJ", "--nodes", "8", "--queue", "prod", "--walltime", "02:00:00")
    assert "warning: queue prod takes 256- nodes" in out.stderr
    out = submit("--account", "PROJ", "--nodes", "2", "--queue", "debug", "--walltime", "02:00:00")
    assert "at most 60 min" in out.stderr
    assert submit("--account", "PROJ", "--nodes", "2", "--queue", "debug").stderr == ""


def test_out_writes_the_file_and_nothing_to_stdout(tmp_path):
    target = tmp_path / "job.pbs"
    out = submit("--account", "PROJ", "--out", str(target), "--", "theory=u1_2d")
    assert out.returncode == 0 and out.stdout == ""
    assert target.read_text() == render("jobs/aurora/train.pbs", "theory=u1_2d", nodes="1")


def _fake_qsub(tmp_path: pathlib.Path) -> dict:
    bin_dir = tmp_path / "qbin"
    bin_dir.mkdir()
    qsub = bin_dir / "qsub"
    # records its arguments and the script it was given (a file argument, or stdin)
    qsub.write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$QSUB_LOG.args"\n'
                    'if [ $# -gt 0 ]; then cat "$1"; else cat; fi > "$QSUB_LOG.script"\necho 4242.fake-pbs\n')
    qsub.chmod(0o755)
    return dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", QSUB_LOG=str(tmp_path / "qsub"))


def test_submit_pipes_the_script_to_qsub_and_prints_the_job_id(tmp_path):
    env = _fake_qsub(tmp_path)
    out = submit("--account", "PROJ", "--submit", "--", "theory=u1_2d", env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "4242.fake-pbs\n"
    assert (tmp_path / "qsub.script").read_text() == render("jobs/aurora/train.pbs", "theory=u1_2d", nodes="1")
    target = tmp_path / "job.pbs"
    out = submit("--account", "PROJ", "--submit", "--out", str(target), env=env)
    assert out.stdout == "4242.fake-pbs\n"
    assert (tmp_path / "qsub.args").read_text().strip() == str(target)


def test_submit_without_qsub_says_so(tmp_path):
    env = dict(os.environ, PATH=str(tmp_path))  # no qsub anywhere
    out = subprocess.run([sys.executable, str(SUBMIT), "--account", "PROJ", "--submit"], capture_output=True,
                         text=True, env=env, timeout=60)
    assert out.returncode == 2 and "qsub" in out.stderr


def test_local_torchrun_script_is_valid_bash():
    script = ROOT / "jobs" / "local" / "train_torchrun.sh"
    assert os.access(script, os.X_OK)
    check = subprocess.run([BASH, "-n", str(script)], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    assert "torchrun --standalone" in script.read_text() and "dist=ddp" in script.read_text()
