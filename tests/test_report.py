"""The one report formatter (``gaugeflow.cli.report``) and the one exact-reference path: a job and
``gaugeflow analyze`` of the file it wrote print the same rows, exact values included."""

import json
import math

import pytest
from omegaconf import OmegaConf

from gaugeflow import exact
from gaugeflow.cli.report import (MIN_WIDTH, Row, estimate_rows, estimate_text, ess_row, khat_row, log_z_row,
                                  susceptibility_note, table)
from gaugeflow.sampling.statistics import Estimate


def test_table_pads_every_label_to_one_column():
    rows = [Row("plaquette", "0.5 +- 0.01"), Row("ESS (proposals)", "0.5000   (50.0 effective of 100)")]
    assert table(rows) == [f"  {'plaquette':<{MIN_WIDTH}} 0.5 +- 0.01",
                           f"  {'ESS (proposals)':<{MIN_WIDTH}} 0.5000   (50.0 effective of 100)"]
    # a longer label widens the column for every row
    lines = table([Row("topological_charge_squared", "1"), Row("a", "2")])
    assert lines == ["  topological_charge_squared 1", "  a" + " " * 25 + " 2"]
    assert table([Row("a", "1")], width=3) == ["  a   1"]


def test_estimate_rows_names_numbers_exact_values_and_notes():
    est = {"accepted": {"mean": 0.9, "err": 0.072, "tau_int": 0.55},
           "exp_minus_delta_h": Estimate(1.03355, 0.046, 0.67, 0.1),
           "action": {"mean": -20.0, "err": 1.0, "tau_int": 2.0},
           "plaquette": {"mean": 0.722684, "err": 0.056, "tau_int": 2.47},
           "topological_susceptibility": {"mean": 0.0, "err": 0.0, "tau_int": 0.5}}
    rows = estimate_rows(est, {"plaquette": 0.699252, "log_z": 13.19, "topological_susceptibility": 0.0181648},
                         ndim=2)
    assert rows == [
        Row("acceptance", "0.9 +- 0.072   tau_int 0.55"),
        Row("<exp(-dH)>", "1.03355 +- 0.046   tau_int 0.67   (must be 1 within errors)"),
        Row("plaquette", "0.722684 +- 0.056   tau_int 2.47   exact 0.699252"),
        Row("topological_susceptibility", "0 +- 0   tau_int 0.50   exact 0.0181648   (= <Q^2>/V)"),
    ]
    assert estimate_rows(est, hide=())[2] == Row("action", "-20 +- 1   tau_int 2.00")
    assert susceptibility_note(4, 0.5) == "(= <Q^2>/V, clover charge at flow time t=0.5)"
    assert susceptibility_note(4) == "(= <Q^2>/V, clover charge)"
    assert estimate_text(1.0, math.nan, None) == "1 +- nan"


def test_weight_rows():
    assert ess_row(0.64473, 12894.6, 20000) == Row("ESS (proposals)", "0.6447   (12894.6 effective of 20000)")
    assert ess_row(0.6, 600.0, 1000, "forward").label == "ESS (forward)"
    assert khat_row(0.119) == Row("Pareto k-hat", "0.119   (> 0.7: weights unreliable)")
    assert khat_row(math.nan).text.startswith("n/a (too few draws)")
    assert khat_row(-math.inf).text.startswith("-inf (no tail")
    assert log_z_row(15.1152, 0.0052, 15.0985) == Row("log Z", "15.1152 +- 0.0052   exact 15.0985")
    assert log_z_row(4.0, 0.3) == Row("log Z", "4 +- 0.3")


# ----------------------------------------------------------------------------- hmc, then analyze of its file


def _hmc(tmp_path, *overrides):
    from hydra import compose, initialize_config_dir

    from gaugeflow.cli.common import CONFIG_DIR
    from gaugeflow.cli.hmc import run_hmc

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("hmc", overrides=["hmc.progress=false", "hmc.n_therm=2", "hmc.n_traj=12", "seed=2",
                                        f"out={tmp_path / 'e.h5'}", *overrides])
    run_hmc(cfg)
    return cfg


def _rows(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("  ")]


@pytest.mark.parametrize("overrides,exact_names", [
    (["theory=u1_2d", "theory.beta=2.0", "lattice.shape=[4,4]"],
     {"plaquette", "topological_charge", "topological_charge_squared", "topological_susceptibility"}),
    (["theory=su2_2d", "lattice.shape=[4,4]"], {"plaquette"}),
    (["theory=su3_2d", "lattice.shape=[4,4]"], {"plaquette"}),
    (["theory=phi4_2d", "lattice.shape=[4,4]"], set()),
    (["theory=su2_4d", "lattice.shape=[2,2,2,2]", "hmc.n_traj=4"], set()),
])
def test_hmc_and_analyze_of_its_file_print_the_same_rows(tmp_path, capsys, overrides, exact_names):
    from gaugeflow.cli.analyze import AnalyzeJob, run_analyze
    from gaugeflow.cli.build import theory_from_config

    cfg = _hmc(tmp_path, *overrides)
    hmc_rows = _rows(capsys.readouterr().out)
    res = run_analyze(OmegaConf.merge(OmegaConf.structured(AnalyzeJob),
                                      {"ensemble": str(tmp_path / "e.h5"), "plots": False}), tmp_path / "a")
    analyze_rows = _rows(capsys.readouterr().out)
    # save_every = 1: the file holds every trajectory the job summarised, so every row is the same
    assert hmc_rows and hmc_rows == analyze_rows, (hmc_rows, analyze_rows)
    assert {line.split()[0] for line in hmc_rows if "   exact " in line} == exact_names
    # one exact-reference path: the job's theory and the file's attributes give the same numbers
    ref = exact.reference_values(theory_from_config(cfg))
    assert res["summary"].get("_exact", {}) == ref
    for name in exact_names:
        line = next(x for x in hmc_rows if x.split()[0] == name)
        assert line.endswith(f"exact {ref[name]:.6g}") or f"exact {ref[name]:.6g}   (" in line, line
    if "su2_4d" in overrides[0]:
        assert hmc_rows[-1].endswith("(= <Q^2>/V, clover charge at flow time t=0.5)")
    json.dumps(res["summary"], allow_nan=False)
