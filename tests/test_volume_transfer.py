"""tools/volume_transfer.py: a flow trained on 4x4 applied with the same weights on 8x8."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HYDRA_FULL_ERROR": "0", "OMP_NUM_THREADS": "1"}


@pytest.mark.slow  # a tool's end-to-end run (~20 s): python -m pytest -m slow
def test_volume_transfer_reports_ess_against_the_independent_blocks_prediction(tmp_path):
    r = subprocess.run([sys.executable, "-m", "gaugeflow.cli.main", "train", "model=small", "train.steps=3",
                        "lattice.shape=[4,4]", "train.batch_size=8", "train.eval_samples=8", "hydra.run.dir=run"],
                       cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "volume_transfer.py"), str(tmp_path / "run"),
                        "--shapes", "8,8", "--draws", "32", "--batch", "16", "--out", str(tmp_path / "vt")],
                       cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    rows = json.loads((tmp_path / "vt" / "volume_transfer.json").read_text())["rows"]
    assert [row["shape"] for row in rows] == [[4, 4], [8, 8]]
    base, big = rows
    assert 0 < big["ess"] <= 1 and big["predicted"] == base["ess"] ** 4
    assert (tmp_path / "vt" / "volume_transfer.png").stat().st_size > 0
