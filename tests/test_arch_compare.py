"""tools/arch_compare.py and tools/ess_curve.py on a tiny trained SU(2) flow (end to end, as a user runs them)."""

import csv
import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HYDRA_FULL_ERROR": "0", "OMP_NUM_THREADS": "1"}


@pytest.mark.slow  # two tools' end-to-end runs (~40 s): python -m pytest -m slow
def test_arch_compare_and_ess_curve_on_a_residual_flow(tmp_path):
    r = subprocess.run([sys.executable, "-m", "gaugeflow.cli.main", "train", "theory=su2_2d", "model=residual",
                        "model_size=small", "train.steps=4", "train.checkpoint_every=2", "lattice.shape=[4,4]",
                        "train.batch_size=8", "train.eval_samples=8", "hydra.run.dir=run"],
                       cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    run = tmp_path / "run"
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "arch_compare.py"), str(run), "--draws", "64",
                        "--check", "4", "--json", str(tmp_path / "cmp.json")],
                       cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    (row,) = json.loads((tmp_path / "cmp.json").read_text())
    assert row["architecture"] == "residual" and row["step"] == 4 and row["draws"] == 64
    assert 0 < row["ess"] <= 1
    # float64 draws: the inverse pass and a gauge transformation reproduce log q to rounding
    assert row["inverse_max_abs"] < 1e-8 and row["gauge_max_abs"] < 1e-8
    assert row["parameters"] > 0 and row["activation_mib_per_configuration"] > 0
    assert "| run | architecture |" in r.stdout

    r = subprocess.run([sys.executable, str(ROOT / "tools" / "ess_curve.py"), str(run), "--draws", "32",
                        "--out", str(tmp_path / "curve.png")],
                       cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    with open(tmp_path / "curve.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(x["step"]) for x in rows] == [2, 4]
    assert all(0 < float(x["ess"]) <= 1 for x in rows) and float(rows[1]["train_seconds"]) > 0
    assert (tmp_path / "curve.png").stat().st_size > 0
