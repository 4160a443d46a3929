"""``gaugeflow hmc``: generate an ensemble with Hybrid Monte Carlo and write it as HDF5."""

from __future__ import annotations

import math
import sys
import time

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from gaugeflow.cli.common import (
    CONFIG_DIR,
    UsageError,
    guarded,
    parse_duration,
    require,
    resolve_device,
    resolve_dtype,
    stop_on_sigterm,
)
from gaugeflow.cli.progress import progress_bar
from gaugeflow.cli.schema import register
from gaugeflow.exact import reference_values
from gaugeflow.io.ensemble import EnsembleWriter, read_ensemble
from gaugeflow.sampling.hmc import HMC
from gaugeflow.sampling.statistics import gamma_method
from gaugeflow.theories import build_theory

register()


def run_hmc(cfg: DictConfig) -> dict:
    """Run the job described by ``cfg``; returns the summary it printed."""
    h = cfg.hmc
    require(h.n_traj >= 0, f"hmc.n_traj must be >= 0, got {h.n_traj}")
    require(h.n_therm >= 0, f"hmc.n_therm must be >= 0, got {h.n_therm}")
    require(h.save_every >= 1, f"hmc.save_every must be >= 1, got {h.save_every}")
    require(h.n_steps >= 1, f"hmc.n_steps must be >= 1, got {h.n_steps}")
    require(h.traj_length > 0, f"hmc.traj_length must be > 0, got {h.traj_length}")
    require(h.start in ("hot", "cold"), f"hmc.start must be hot or cold, got {h.start!r}")
    require(h.flow_time >= 0, f"hmc.flow_time must be >= 0, got {h.flow_time}")
    max_time = parse_duration(h.max_time, "hmc.max_time")
    precision = resolve_dtype(h.precision, "hmc.precision")
    device = resolve_device(cfg.device)
    try:
        theory = build_theory(OmegaConf.to_container(cfg.theory, resolve=True), cfg.lattice.shape)
        generator = torch.Generator(device=device).manual_seed(int(cfg.seed))
        sampler = HMC(theory, h.n_steps, h.traj_length, h.integrator, h.force, generator)
    except ValueError as err:
        raise UsageError(str(err)) from None

    if h.continue_from:
        fields = _last_configuration(h.continue_from, theory)
    else:
        fields = theory.start(1, h.start, generator, precision)
    fields = fields.to(device=device, dtype=theory.field_dtype(precision))

    attrs = theory.attributes()
    attrs.update(
        config=OmegaConf.to_yaml(cfg, resolve=True),
        seed=int(cfg.seed),
        sampler="hmc",
        integrator=h.integrator,
        n_steps=int(h.n_steps),
        traj_length=float(h.traj_length),
        save_every=int(h.save_every),
        continued_from=str(h.continue_from or ""),
    )
    field_name = "links" if theory.is_gauge else "phi"
    series: dict[str, list[float]] = {}
    n_done = n_therm_done = 0
    reason = "completed"
    t0 = time.monotonic()
    show = bool(h.progress) and sys.stdout.isatty()
    writer = EnsembleWriter(cfg.out, field_name, fields.shape[1:], fields.dtype, attrs)
    with writer, stop_on_sigterm() as sigterm, progress_bar(show, h.n_therm + h.n_traj, "hmc") as bar:
        for i in range(h.n_therm + h.n_traj):
            if sigterm():
                reason = "SIGTERM"
                break
            if max_time is not None and time.monotonic() - t0 > max_time:
                reason = "hmc.max_time"
                break
            res = sampler.trajectory(fields)
            fields = res.fields
            if i < h.n_therm:
                n_therm_done += 1
                bar.advance(f"therm dH={res.delta_h.item():+.3g}")
                continue
            meas = {
                "action": res.action,
                "accepted": res.accepted,
                "delta_h": res.delta_h,
                "exp_minus_delta_h": torch.exp(-res.delta_h),
                **theory.measure(fields, h.flow_time),
            }
            for k, v in meas.items():
                series.setdefault(k, []).append(float(v.double().mean()))
            if (n_done + 1) % h.save_every == 0:
                cols = {k: v for k, v in meas.items() if k != "exp_minus_delta_h"}
                cols["log_p"] = -res.action
                writer.append(fields, **cols)
            n_done += 1
            bar.advance(f"acc={np.mean(series['accepted']):.2f} plaq={series.get('plaquette', [math.nan])[-1]:.4f}")
        seconds = time.monotonic() - t0
        summary = _summarise(series)
        writer.set_attrs(
            n_traj=n_done,
            n_therm=n_therm_done,
            stop_reason=reason,
            seconds=seconds,
            acceptance=summary.get("accepted", {}).get("mean", math.nan),
        )
    _report(cfg, theory, summary, n_done, n_therm_done, seconds, reason, writer)
    return summary


def _last_configuration(path: str, theory) -> torch.Tensor:
    ens = read_ensemble(path, last_only=True)
    if ens.theory != theory.name:
        raise UsageError(f"hmc.continue_from={path}: ensemble of theory {ens.theory!r}, not {theory.name!r}")
    shape = [int(s) for s in np.atleast_1d(ens.attrs["shape"])]
    if shape != list(theory.lattice.shape):
        raise UsageError(f"hmc.continue_from={path}: lattice shape {shape}, not {list(theory.lattice.shape)}")
    if theory.is_gauge and ens.fields.shape[-1] != theory.group.N:
        raise UsageError(f"hmc.continue_from={path}: links are {ens.fields.shape[-1]}x{ens.fields.shape[-1]}, "
                         f"the theory needs {theory.group.N}x{theory.group.N}")
    return ens.tensor()


def _summarise(series: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    return {k: gamma_method(v).as_dict() for k, v in series.items() if k != "delta_h"}


def _report(cfg, theory, summary, n_done, n_therm, seconds, reason, writer) -> None:
    params = ", ".join(f"{k}={v}" for k, v in theory.params.items() if k not in ("c0",))
    lines = [
        f"hmc {theory.name} ({params}) shape={list(theory.lattice.shape)}: {n_done} trajectories after "
        f"{n_therm} thermalization in {seconds:.1f} s" + ("" if reason == "completed" else f" (stopped by {reason})")
    ]
    exact = reference_values(theory).get("plaquette")
    for name, est in summary.items():
        if name in ("action",):
            continue
        label = {"accepted": "acceptance", "exp_minus_delta_h": "<exp(-dH)>"}.get(name, name)
        line = f"  {label:<22} {est['mean']:.6g} +- {est['err']:.2g}   tau_int {est['tau_int']:.2f}"
        if name == "exp_minus_delta_h":
            line += "   (must be 1 within errors)"
        if name == "plaquette" and exact is not None:
            line += f"   exact {exact:.6g}"
        lines.append(line)
    lines.append(f"wrote {writer.n} configurations to {writer.path}")
    print("\n".join(lines))


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="hmc")
def main(cfg: DictConfig) -> None:
    guarded(run_hmc)(cfg)
