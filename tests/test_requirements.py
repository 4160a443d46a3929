"""An older torch is refused in one line before any job runs; the floor is the one pyproject declares."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

import pytest
import torch

from gaugeflow import requirements
from gaugeflow.cli import main as cli_main

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_pyproject_declares_the_floor_the_check_enforces():
    tomllib = pytest.importorskip("tomllib")
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    torch_req = [d for d in deps if re.match(r"torch\b", d)]
    assert torch_req == [f"torch>={requirements.TORCH_MIN}"]
    assert any(re.match(r"packaging\b", d) for d in deps)  # imported by gaugeflow.requirements
    # and the torch installed here meets it (the suite itself runs on a supported torch)
    assert requirements.torch_problem(torch.__version__) is None


@pytest.mark.parametrize("version, ok", [
    ("2.13.0+cpu", True), ("2.13.0", True), ("2.6.0", True), ("2.6", True), ("2.6.1+cu124", True),
    ("2.8.0a0+gitba56102", True),   # an HPC module's source build of 2.8
    ("2.10.0.dev20251001+xpu", True),
    ("3.0.0", True),
    ("2.5.1+cu121", False), ("2.4.1", False), ("2.1.0", False), ("1.13.1", False),
    ("2.5.99", False),
])
def test_versions_compare_by_release(version, ok):
    problem = requirements.torch_problem(version)
    assert (problem is None) == ok, problem
    if not ok:
        assert f"torch >= {requirements.TORCH_MIN}" in problem and version in problem and "\n" not in problem


def test_an_unreadable_version_is_let_through_and_a_missing_torch_is_named():
    assert requirements.torch_problem("weird-build") is None
    assert "not installed" in requirements.torch_problem(None)


@pytest.mark.parametrize("argv", [["hmc"], ["train", "theory=u1_2d"], ["--version"], []])
def test_gaugeflow_refuses_an_old_torch_in_one_line_before_the_job(monkeypatch, capsys, argv):
    monkeypatch.setattr(torch, "__version__", "2.4.1")
    ran = []
    monkeypatch.setattr(cli_main.importlib, "import_module", lambda name: ran.append(name))
    with pytest.raises(SystemExit) as exc:
        cli_main.main(argv)
    assert exc.value.code == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "2.4.1" in lines[0] and f"torch >= {requirements.TORCH_MIN}" in lines[0], err
    assert out == "" and ran == []  # no job module was even imported


def test_gaugeflow_runs_on_a_new_enough_torch(monkeypatch, capsys):
    monkeypatch.setattr(torch, "__version__", "2.6.0+cpu")
    with pytest.raises(SystemExit) as exc:
        cli_main.main(["--version"])
    assert exc.value.code == 0
    assert "torch 2.6.0+cpu" in capsys.readouterr().out


def test_python_dash_m_entry_point_checks_too(tmp_path):
    # as torchrun and the job templates start it: python -m gaugeflow.cli.main
    code = ("import runpy, torch; torch.__version__ = '2.5.1+cu121'; "
            "runpy.run_module('gaugeflow.cli.main', run_name='__main__')")
    r = subprocess.run([sys.executable, "-c", code, "hmc"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and r.stdout == ""
    assert len(r.stderr.strip().splitlines()) == 1 and "torch >= 2.6" in r.stderr and "2.5.1+cu121" in r.stderr


def test_the_templates_preflight(monkeypatch, capsys):
    """``python -m gaugeflow.requirements`` (run by the PBS templates before mpiexec)."""
    monkeypatch.setattr(requirements, "installed_torch_version", lambda: "2.3.0")
    with pytest.raises(SystemExit) as exc:
        requirements.main()
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "2.3.0" in err[0] and "torch >= 2.6" in err[0]
    monkeypatch.setattr(requirements, "installed_torch_version", lambda: "2.8.0a0+git1234")
    requirements.main()
    assert "torch 2.8.0a0+git1234" in capsys.readouterr().out
    for template in ("jobs/aurora/train.pbs", "jobs/aurora/sample.pbs", "jobs/polaris/train.pbs"):
        text = (ROOT / template).read_text()
        launch = re.search(r"^mpiexec ", text, re.MULTILINE)
        assert launch and text.index("\npython -m gaugeflow.requirements\n") < launch.start(), template
