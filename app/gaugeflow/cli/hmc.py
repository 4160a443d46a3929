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
from gaugeflow.sampling.hmc import HMC, chain_generators
from gaugeflow.sampling.statistics import gamma_method, replicas
from gaugeflow.theories.gauge import IMPROVEMENTS
from gaugeflow.theories.theory import MISSING_ATTR

register()


def run_hmc(cfg: DictConfig) -> dict:
    """Run the job described by ``cfg``; returns the summary it printed."""
    h = cfg.hmc
    require(h.n_traj >= 0, f"hmc.n_traj must be >= 0, got {h.n_traj}")
    require(h.n_therm >= 0, f"hmc.n_therm must be >= 0, got {h.n_therm}")
    require(h.chains >= 1, f"hmc.chains must be >= 1, got {h.chains}")
    require(h.save_every >= 1, f"hmc.save_every must be >= 1, got {h.save_every}")
    require(h.measure_every >= 1, f"hmc.measure_every must be >= 1, got {h.measure_every}")
    require(h.n_steps >= 1, f"hmc.n_steps must be >= 1, got {h.n_steps}")
    require(h.traj_length > 0, f"hmc.traj_length must be > 0, got {h.traj_length}")
    require(h.start in ("hot", "cold"), f"hmc.start must be hot or cold, got {h.start!r}")
    require(h.flow_time >= 0, f"hmc.flow_time must be >= 0, got {h.flow_time}")
    max_time = parse_duration(h.max_time, "hmc.max_time")
    precision = resolve_dtype(h.precision, "hmc.precision")
    device = resolve_device(cfg.device)
    compression = h.get("compression")
    n_chains = int(h.chains)
    try:
        parse_compression(compression, "hmc.compression")
        theory = theory_from_config(cfg)
        # one generator per chain: chain c's stream depends on (seed, c) only, and chain 0's
        # generator is seeded with `seed` itself, so hmc.chains=1 is the single-chain run
        generators = chain_generators(int(cfg.seed), n_chains, device)
        sampler = HMC(theory, h.n_steps, h.traj_length, h.integrator, h.force,
                      generators[0] if n_chains == 1 else generators)
    except ValueError as err:
        raise UsageError(str(err)) from None

    attrs = theory.attributes()
    offset = 0  # trajectories (after thermalization) of the chains before this file
    if h.continue_from:
        fields, offset = _continue_chain(str(h.continue_from), theory, generators)
        attrs.update(continued_from=os.path.abspath(str(h.continue_from)),
                     continued_from_sha256=sha256_file(h.continue_from))
    else:
        fields = torch.cat([theory.start(1, h.start, g, precision) for g in generators])
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
        measure_every=int(h.measure_every),
        chains=n_chains,
        flow_time=float(h.flow_time),
        trajectory_offset=offset,
    )
    field_name = "links" if theory.is_gauge else "phi"
    # per key, one array of the chains' values per trajectory (acceptance, <exp(-dH)>) or per
    # stored configuration (measurements; NaN where not measured)
    series: dict[str, list[np.ndarray]] = {}
    n_done = n_therm_done = 0
    acc_sum = 0.0
    reason = "completed"
    t0 = time.monotonic()
    show = bool(h.progress) and sys.stdout.isatty()
    # plain values: an OmegaConf lookup (interpolations are re-resolved) costs ~1 ms per access
    save_every, n_therm, n_traj, flow_time = int(h.save_every), int(h.n_therm), int(h.n_traj), float(h.flow_time)
    measure_every = int(h.measure_every)
    # every measurement but the cheap ones is taken on every measure_every-th stored configuration
    keys = list(theory.measure(fields[:1], 0.0)) if measure_every > 1 else None
    # configurations this run will write per chain (trajectory k of the chain, counted from 1, is
    # written when k is a multiple of save_every): sizes the file's chunks
    expected = n_chains * ((offset + n_traj) // save_every - offset // save_every)
    chain_ids = np.arange(n_chains, dtype=np.int64)
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
                bar.advance(f"therm dH={res.delta_h.double().mean().item():+.3g}")
                continue
            for k, v in (("accepted", res.accepted), ("exp_minus_delta_h", torch.exp(-res.delta_h))):
                series.setdefault(k, []).append(v.double().cpu().numpy())
            traj = offset + n_done + 1  # the chains' trajectory number, continuations included
            if traj % save_every == 0:
                # measured on the configurations the file keeps: the summary is the file's analysis
                if keys is None or traj % (save_every * measure_every) == 0:
                    meas = theory.measure(fields, flow_time)
                else:
                    meas = _cheap_measurements(theory, fields, keys)
                meas = {"action": res.action, **meas}
                for k, v in meas.items():
                    series.setdefault(k, []).append(v.double().cpu().numpy())
                if "topological_charge" in meas:
                    series.setdefault("topological_charge_squared", []).append(
                        meas["topological_charge"].double().square().cpu().numpy())
                # rows of one trajectory of every chain: a stop leaves chains of equal length
                index = {} if n_chains == 1 else {"chain": chain_ids, "trajectory": np.full(n_chains, traj)}
                writer.append(fields, **index, accepted=res.accepted, delta_h=res.delta_h, **meas,
                              log_p=-res.action)
            n_done += 1
            acc_sum += float(series["accepted"][-1].mean())
            plaq = float(series["plaquette"][-1].mean()) if "plaquette" in series else math.nan
            bar.advance(f"acc={acc_sum / n_done:.2f} plaq={plaq:.4f}")
        seconds = time.monotonic() - t0
        summary = _summarise(series, theory)
        writer.set_attrs(
            n_traj=n_done,
            n_therm=n_therm_done,
            stop_reason=reason,
            seconds=seconds,
            acceptance=summary.get("accepted", {}).get("mean", math.nan),
        )
        # the state after the last trajectory run: a continuation starts here, with these streams
        rng = generators[0].get_state() if n_chains == 1 else torch.stack([g.get_state() for g in generators])
        writer.set_chain_state(fields, rng, rng_device=generators[0].device.type, n_traj_chain=offset + n_done)
    _report(cfg, theory, summary, n_done, n_therm_done, seconds, reason, writer, n_chains)
    return summary


def _cheap_measurements(theory, fields: torch.Tensor, keys: list[str]) -> dict[str, torch.Tensor]:
    """The measurements ``hmc.measure_every`` does not thin, on every stored configuration: the
    plaquette of a gauge theory, every moment of a scalar field; NaN for the other ``keys``."""
    from gaugeflow.observables.measure import measure_scalar
    from gaugeflow.observables.wilson import mean_plaquette

    cheap = {"plaquette": mean_plaquette(fields)} if theory.is_gauge else measure_scalar(fields)
    dtype = next(iter(cheap.values())).dtype
    nan = torch.full((fields.shape[0],), math.nan, dtype=dtype, device=fields.device)
    return {k: cheap.get(k, nan) for k in keys}


def _continue_chain(path: str, theory, generators: list[torch.Generator]) -> tuple[torch.Tensor, int]:
    """Fields and chain position to continue the chains of ensemble ``path``; sets the generators' states.

    Every theory parameter and the lattice shape must equal the file's, and the number of
    chains this run's (``hmc.chains``). The file's chain state (fields after its last
    trajectory and the random-number states) continues the chains exactly; a file without one
    (written before chain states existed) continues from the last stored configuration of
    each chain with fresh streams from ``seed``, and says so.
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
    n_file = int(state.fields.shape[0]) if state is not None else ens.n_chains
    if n_file != len(generators):
        raise UsageError(f"{where}: ensemble of {n_file} chain{'s' * (n_file != 1)}, this run has "
                         f"hmc.chains={len(generators)} (to continue it, pass hmc.chains={n_file})")
    if state is None:
        print(f"note: {path} holds no chain state (an older file): continuing from its last stored "
              f"configuration with a new random stream from seed", file=sys.stderr)
        if ens.chain is None:
            last = read_ensemble(path, last_only=True).tensor()
        else:
            full = read_ensemble(path)
            rows = [int(np.flatnonzero(full.chain == c)[-1]) for c in np.unique(full.chain)]
            last = full.tensor()[rows]
        return last, int(ens.attrs.get("n_traj", 0))
    want = theory.field_shape(state.fields.shape[0])[1:]
    if tuple(state.fields.shape[1:]) != tuple(want):
        raise UsageError(f"{where}: chain_state/fields has shape {tuple(state.fields.shape)}, "
                         f"the theory needs (batch, {', '.join(map(str, want))})")
    if state.rng_state is not None:
        dev = str(state.attrs.get("rng_device", "cpu"))
        if dev != generators[0].device.type:
            raise UsageError(f"{where}: its random stream is a {dev} generator's, this run's device is "
                             f"{generators[0].device.type} (continue with device={dev})")
        rng = np.asarray(state.rng_state, dtype=np.uint8)
        rng = rng.reshape(1, -1) if rng.ndim == 1 else rng
        if rng.shape[0] != len(generators):
            raise UsageError(f"{where}: chain_state/rng_state holds {rng.shape[0]} random streams for "
                             f"{len(generators)} chains")
        try:
            for g, r in zip(generators, rng):
                g.set_state(torch.from_numpy(np.ascontiguousarray(r)))
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


def _summarise(series: dict[str, list[np.ndarray]], theory) -> dict[str, dict[str, float]]:
    """Gamma-method estimates of the per-chain series, the chains as replicas; NaN rows (not
    measured, ``hmc.measure_every``) are skipped, so ``tau_int`` of such a series is in units of
    measured configurations."""
    out = {}
    for k, v in series.items():
        rows = np.stack(v)  # (trajectories or stored configurations, chains)
        chain = np.repeat(np.arange(rows.shape[1]), rows.shape[0])
        out[k] = gamma_method(replicas(rows.T.reshape(-1), chain)).as_dict()
    if "topological_charge_squared" in out:
        # chi_t = <Q^2> / V: the Q^2 series' Gamma-method error and tau_int, divided by V
        vol = math.prod(theory.lattice.global_shape)
        q2 = out["topological_charge_squared"]
        out["topological_susceptibility"] = {**q2, "mean": q2["mean"] / vol, "err": q2["err"] / vol}
    return out


def _report(cfg, theory, summary, n_done, n_therm, seconds, reason, writer, n_chains=1) -> None:
    params = ", ".join(f"{k}={v}" for k, v in theory.params.items() if k not in ("c0",))
    chains = "" if n_chains == 1 else f"{n_chains} chains (replicas) x "
    head = (f"hmc {theory.name} ({params}) shape={list(theory.lattice.shape)}: {chains}{n_done} trajectories after "
            f"{n_therm} thermalization in {seconds:.1f} s" + ("" if reason == "completed" else f" (stopped by {reason})"))
    # the rows `gaugeflow analyze` prints for the file: same names, same exact values, same column width
    rows = estimate_rows(summary, reference_values(theory), ndim=theory.lattice.ndim,
                         flow_time=float(cfg.hmc.flow_time))
    print("\n".join([head, *table(rows), f"wrote {writer.n} configurations to {writer.path}"]))


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="hmc")
def main(cfg: DictConfig) -> None:
    guarded(run_hmc)(cfg)
