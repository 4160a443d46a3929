"""Sampling paths take their device from the generator or the fields, never from torch's default.

On a GPU (or XPU) a factory call without ``device=`` allocates on the CPU while the
generator and fields live on the accelerator: ``gaugeflow hmc device=cuda`` once crashed
that way in ``Theory.start``. The same class of bug shows on a CPU-only machine when
torch's *default* device is ``meta`` while every real tensor and generator is on the CPU:
a forgetful factory call then makes a meta tensor, which either fails when it meets a CPU
tensor or comes out on the wrong device (each test checks the devices of its results).
"""

from __future__ import annotations

import pathlib

import h5py
import numpy as np
import pytest
import torch
import yaml
from gaugeflow.components import build_theory
from gaugeflow.sampling.hmc import HMC
from helpers import theory_flow

CONF = pathlib.Path(__file__).resolve().parents[1] / "conf"
PRESETS = sorted(p.stem for p in (CONF / "theory").glob("*.yaml"))


def preset(name: str, **changes) -> dict:
    cfg = yaml.safe_load((CONF / "theory" / f"{name}.yaml").read_text())
    cfg.update(changes)
    return cfg


def tiny_shape(cfg: dict) -> list[int]:
    return [4, 4] if cfg["dim"] == 2 else [2] * cfg["dim"]




def on_cpu(*tensors: torch.Tensor) -> bool:
    return all(t.device.type == "cpu" for t in tensors)


def test_the_harness_can_fail(meta_default):
    # a factory call that forgets its device lands on meta here, as it would on the CPU
    # next to a GPU generator
    assert torch.zeros(2).device.type == "meta"
    with pytest.raises(RuntimeError):
        torch.ones(2, device="cpu") + torch.zeros(2)


@pytest.mark.parametrize("how", ["hot", "cold"])
@pytest.mark.parametrize("name", PRESETS)
def test_start_on_the_generators_device(name, how, meta_default):
    cfg = preset(name)
    theory = build_theory(cfg, tiny_shape(cfg))
    g = torch.Generator().manual_seed(1)
    x = theory.start(2, how, g, torch.float64)
    assert on_cpu(x) and x.dtype == theory.field_dtype(torch.float64)
    assert tuple(x.shape) == theory.field_shape(2)
    assert torch.isfinite(torch.view_as_real(x) if x.is_complex() else x).all()


@pytest.mark.parametrize(
    "name,changes,force",
    [(n, {}, "analytic") for n in PRESETS]
    + [("su3_4d", {"action": "iwasaki"}, "analytic"), ("su2_2d", {}, "autograd"), ("phi4_2d", {}, "autograd")],
)
def test_hmc_trajectory_on_the_fields_device(name, changes, force, meta_default):
    cfg = preset(name, **changes)
    theory = build_theory(cfg, tiny_shape(cfg))
    g = torch.Generator().manual_seed(2)
    x = theory.start(2, "hot", g)
    hmc = HMC(theory, 2, 0.5, cfg["hmc"]["integrator"], force, g)
    res = hmc.trajectory(x)
    assert on_cpu(res.fields, res.accepted, res.delta_h, res.action)
    assert torch.isfinite(res.delta_h).all()


@pytest.mark.parametrize("name", PRESETS)
def test_measure_on_the_fields_device(name, meta_default):
    cfg = preset(name)
    theory = build_theory(cfg, tiny_shape(cfg))
    x = theory.start(2, "hot", torch.Generator().manual_seed(3))
    # the preset's own flow time (the hmc default) exercises the 4d gradient flow
    out = theory.measure(x, float(cfg.get("default_flow_time", 0.0)))
    assert out and on_cpu(*out.values())


@pytest.mark.parametrize("name", ["u1_2d", "su2_2d", "su3_2d", "phi4_2d"])
def test_flow_model_sample_and_log_prob(name, meta_default):
    cfg = preset(name)
    theory = build_theory(cfg, [4, 4])
    # the model is built before a job moves it to its device: build it on the CPU
    torch.set_default_device("cpu")
    model = theory_flow(theory, n_layers=2, hidden=[4], dtype=torch.float64)
    with torch.no_grad():
        for p in model.parameters():  # not the identity map: every layer does work
            p.add_(0.1 * torch.randn(p.shape, dtype=p.dtype, generator=torch.Generator().manual_seed(4)))
    torch.set_default_device("meta")
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        x, log_q = model.sample(3, g)
        log_q2 = model.log_prob(x)
    assert on_cpu(x, log_q, log_q2)
    assert torch.allclose(log_q, log_q2, atol=1e-8)


def hmc_config(*overrides: str):
    from gaugeflow.cli.common import CONFIG_DIR
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("hmc", overrides=list(overrides))


@pytest.mark.parametrize("name", ["u1_2d", "su3_4d", "phi4_2d"])
def test_hmc_job_under_meta_default(name, tmp_path, meta_default, capsys):
    from gaugeflow.cli.hmc import run_hmc

    shape = "[2,2,2,2]" if name.endswith("4d") else "[4,4]"
    torch.set_default_device("cpu")  # Hydra's composition is not a sampling path
    common = [f"theory={name}", f"lattice.shape={shape}", "hmc.n_therm=1", "hmc.progress=false",
              "hmc.compression=gzip"]
    first = hmc_config(*common, "hmc.n_traj=3", f"out={tmp_path / 'a.h5'}")
    second = hmc_config(*common, "hmc.n_traj=2", f"hmc.continue_from={tmp_path / 'a.h5'}", f"out={tmp_path / 'b.h5'}")
    torch.set_default_device("meta")
    run_hmc(first)
    summary = run_hmc(second)
    assert "plaquette" in summary or "phi2" in summary
    with h5py.File(tmp_path / "b.h5") as f:
        field = f["links" if "links" in f else "phi"]
        assert field.shape[0] == 2 and np.isfinite(np.abs(field[()])).all()
        assert f.attrs["continued_from"] == str(tmp_path / "a.h5")


@pytest.mark.parametrize("name", ["u1_2d", "su2_2d", "phi4_2d"])
def test_training_step_metrics_and_evaluation_on_the_generators_device(name, meta_default):
    # the train job's loop pieces: a step with gradient accumulation, its metrics row and the
    # end-of-run evaluation (the model is built on the CPU first, as a job builds it before .to(device))
    from gaugeflow.distributed.init import DistContext
    from gaugeflow.distributed.parallel import Parallel
    from gaugeflow.train.losses import ReverseKL
    from gaugeflow.train.trainer import accumulated_step, batch_metrics, evaluate

    cfg = preset(name)
    with torch.device("cpu"):
        theory = build_theory(cfg, tiny_shape(cfg))
        model = theory_flow(theory, n_layers=2, hidden=(4,), dtype=torch.float64)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        ctx = DistContext(0, 1, 0, 1, torch.device("cpu"), None, "single", 60.0)
        par = Parallel(ctx, theory.lattice.shape, None, "none")
    gen = torch.Generator(device="cpu").manual_seed(1)
    out, norm = accumulated_step(model, opt, ReverseKL(), theory.action, 4, 2, gen, None, par)
    assert out.log_q.device.type == "cpu" and torch.isfinite(norm)
    row = batch_metrics(1, out, ReverseKL(), model, theory, par, gen.device, 0, 4)
    assert np.isfinite(row["free_energy"]) and np.isfinite(row["ess"])
    ev = evaluate(model, theory, par, 8, 4, 0, torch.device("cpu"))
    assert ev["eval_samples"] == 8 and np.isfinite(ev["log_z"])
