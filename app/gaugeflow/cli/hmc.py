"""``gaugeflow hmc``: generate an ensemble with Hybrid Monte Carlo and write it as HDF5."""

from __future__ import annotations

import math
import os
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
from gaugeflow.cli.build import theory_from_config
from gaugeflow.cli.progress import progress_bar
from gaugeflow.cli.report import estimate_rows, table
from gaugeflow.cli.restore import sha256_file
from gaugeflow.cli.schema import register
from gaugeflow.exact import reference_values
from gaugeflow.io.ensemble import EnsembleWriter, parse_compression, read_chain_state, read_ensemble
from gaugeflow.sampling.hmc import HMC
from gaugeflow.sampling.statistics import gamma_method
from gaugeflow.theories.gauge import IMPROVEMENTS
from gaugeflow.theories.theory import MISSING_ATTR

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
    compression = h.get("compression")
    try:
        parse_compression(compression, "hmc.compression")
        theory = theory_from_config(cfg)
        generator = torch.Generator(device=device).manual_seed(int(cfg.seed))
        sampler = HMC(theory, h.n_steps, h.traj_length, h.integrator, h.force, generator)
    except ValueError as err:
        raise UsageError(str(err)) from None

    attrs = theory.attributes()
    offset = 0  # trajectories (after thermalization) of the chain before this file
    if h.continue_from:
        fields, offset = _continue_chain(str(h.continue_from), theory, generator)
        attrs.update(continued_from=os.path.abspath(str(h.continue_from)),
                     continued_from_sha256=sha256_file(h.continue_from))
    else:
        fields = theory.start(1, h.start, generator, precision)
        attrs.update(continued_from="", continued_from_sha256="")
    fields = fields.to(device=device, dtype=theory.field_dtype(precision))

    attrs.update(
        config=OmegaConf.to_yaml(cfg, resolve=True),
        seed=int(cfg.seed),
        sampler="hmc",
        integrator=h.integrator,
        n_steps=int(h.n_steps),
        traj_length=float(h.traj_length),
        save_every=int(h.save_every),
        flow_time=float(h.flow_time),
        trajectory_offset=offset,
    )
    field_name = "links" if theory.is_gauge else "phi"
    series: dict[str, list[float]] = {}
    n_done = n_therm_done = 0
    acc_sum = 0.0
    reason = "completed"
    t0 = time.monotonic()
    show = bool(h.progress) and sys.stdout.isatty()
    # plain values: an OmegaConf lookup (interpolations are re-resolved) costs ~1 ms per access
    save_every, n_therm, n_traj, flow_time = int(h.save_every), int(h.n_therm), int(h.n_traj), float(h.flow_time)
    # configurations this run will write (trajectory k of the chain, counted from 1, is written
    # when k is a multiple of save_every): sizes the file's chunks
    expected = (offset + n_traj) // save_every - offset // save_every
    try:
        writer = EnsembleWriter(cfg.out, field_name, fields.shape[1:], fields.dtype, attrs,
                                compression=compression, expected=expected)
    except ValueError as err:
        raise UsageError(str(err)) from None
    with writer, stop_on_sigterm() as sigterm, progress_bar(show, n_therm + n_traj, "hmc") as bar:
        for i in range(n_therm + n_traj):
            if sigterm():
                reason = "SIGTERM"
                break
            if max_time is not None and time.monotonic() - t0 > max_time:
                reason = "hmc.max_time"
                break
            res = sampler.trajectory(fields)
            fields = res.fields
            if i < n_therm:
                n_therm_done += 1
                bar.advance(f"therm dH={res.delta_h.item():+.3g}")
                continue
            for k, v in (("accepted", res.accepted), ("delta_h", res.delta_h),
                         ("exp_minus_delta_h", torch.exp(-res.delta_h))):
                series.setdefault(k, []).append(float(v.double().mean()))
            if (offset + n_done + 1) % save_every == 0:
                # measured on the configurations the file keeps: the summary is the file's analysis
                meas = {"action": res.action, **theory.measure(fields, flow_time)}
                for k, v in meas.items():
                    series.setdefault(k, []).append(float(v.double().mean()))
                if "topological_charge" in meas:
                    series.setdefault("topological_charge_squared", []).append(
                        float(meas["topological_charge"].double().square().mean()))
                writer.append(fields, accepted=res.accepted, delta_h=res.delta_h, **meas, log_p=-res.action)
            n_done += 1
            acc_sum += series["accepted"][-1]
            bar.advance(f"acc={acc_sum / n_done:.2f} plaq={series.get('plaquette', [math.nan])[-1]:.4f}")
        seconds = time.monotonic() - t0
        summary = _summarise(series, theory)
        writer.set_attrs(
            n_traj=n_done,
            n_therm=n_therm_done,
            stop_reason=reason,
            seconds=seconds,
            acceptance=summary.get("accepted", {}).get("mean", math.nan),
        )
        # the state after the last trajectory run: a continuation starts here, with this stream
        writer.set_chain_state(fields, generator.get_state(), rng_device=generator.device.type,
                               n_traj_chain=offset + n_done)
    _report(cfg, theory, summary, n_done, n_therm_done, seconds, reason, writer)
    return summary


def _continue_chain(path: str, theory, generator: torch.Generator) -> tuple[torch.Tensor, int]:
    """Fields and chain position to continue the chain of ensemble ``path``; sets ``generator``'s state.

    Every theory parameter and the lattice shape must equal the file's. The file's chain
    state (fields after its last trajectory and the random-number state) continues the chain
    exactly; a file without one (written before chain states existed) continues from its last
    stored configuration with a fresh stream from ``seed``, and says so.
    """
    where = f"hmc.continue_from={path}"
    ens = read_ensemble(path, load_fields=False)
    diffs = theory.differences(ens.attrs)
    if diffs:
        what = "; ".join(f"{k} {theirs!r}, not {mine!r}" if k == "theory" else f"{k}={theirs!r}, not {mine!r}"
                         for k, theirs, mine in diffs)
        hint = " ".join(f"{k}={_cli_value(theirs)}" for k, theirs, _ in diffs if _settable(k, theirs, ens.attrs))
        raise UsageError(f"{where}: ensemble of {what}" + (f" (to continue it, pass {hint})" if hint else ""))
    state = read_chain_state(path)
    if state is None:
        ens = read_ensemble(path, last_only=True)
        print(f"note: {path} holds no chain state (an older file): continuing from its last stored "
              f"configuration with a new random stream from seed", file=sys.stderr)
        return ens.tensor(), int(ens.attrs.get("n_traj", 0))
    want = theory.field_shape(state.fields.shape[0])[1:]
    if tuple(state.fields.shape[1:]) != tuple(want):
        raise UsageError(f"{where}: chain_state/fields has shape {tuple(state.fields.shape)}, "
                         f"the theory needs (batch, {', '.join(map(str, want))})")
    if state.rng_state is not None:
        dev = str(state.attrs.get("rng_device", "cpu"))
        if dev != generator.device.type:
            raise UsageError(f"{where}: its random stream is a {dev} generator's, this run's device is "
                             f"{generator.device.type} (continue with device={dev})")
        try:
            generator.set_state(torch.from_numpy(np.asarray(state.rng_state, dtype=np.uint8)))
        except RuntimeError as err:
            raise UsageError(f"{where}: unusable chain_state/rng_state ({str(err).splitlines()[0]})") from None
    return torch.from_numpy(np.asarray(state.fields)), int(state.attrs.get("n_traj_chain", 0))


def _settable(key: str, value, attrs) -> bool:
    """Whether ``key=value`` belongs in the hint of how to continue a file (keys a user sets)."""
    if value is MISSING_ATTR or key in ("theory", "theory.kind", "theory.group", "theory.c0"):
        return False
    if key == "theory.c1":  # implied by the action's name unless it was given explicitly
        return IMPROVEMENTS.get(str(attrs.get("action")), None) != value
    return True


def _cli_value(v) -> str:
    if isinstance(v, (list, tuple)):
        return "'[" + ",".join(str(x) for x in v) + "]'"
    return str(v)


def _summarise(series: dict[str, list[float]], theory) -> dict[str, dict[str, float]]:
    out = {k: gamma_method(v).as_dict() for k, v in series.items() if k != "delta_h"}
    if "topological_charge_squared" in out:
        # chi_t = <Q^2> / V: the Q^2 series' Gamma-method error and tau_int, divided by V
        vol = math.prod(theory.lattice.global_shape)
        q2 = out["topological_charge_squared"]
        out["topological_susceptibility"] = {**q2, "mean": q2["mean"] / vol, "err": q2["err"] / vol}
    return out


def _report(cfg, theory, summary, n_done, n_therm, seconds, reason, writer) -> None:
    params = ", ".join(f"{k}={v}" for k, v in theory.params.items() if k not in ("c0",))
    head = (f"hmc {theory.name} ({params}) shape={list(theory.lattice.shape)}: {n_done} trajectories after "
            f"{n_therm} thermalization in {seconds:.1f} s" + ("" if reason == "completed" else f" (stopped by {reason})"))
    # the rows `gaugeflow analyze` prints for the file: same names, same exact values, same column width
    rows = estimate_rows(summary, reference_values(theory), ndim=theory.lattice.ndim,
                         flow_time=float(cfg.hmc.flow_time))
    print("\n".join([head, *table(rows), f"wrote {writer.n} configurations to {writer.path}"]))


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="hmc")
def main(cfg: DictConfig) -> None:
    guarded(run_hmc)(cfg)
