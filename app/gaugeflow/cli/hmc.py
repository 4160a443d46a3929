"""``gaugeflow hmc``: generate an ensemble with Hybrid Monte Carlo and write it as HDF5."""

from __future__ import annotations

import math
import json
import os
import sys
import time

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from gaugeflow.cli.analyze import HIDDEN_ROWS, correlator_rows, correlator_summary, solver_row
from gaugeflow.cli.build import theory_from_config
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
from gaugeflow.cli.report import estimate_rows, table
from gaugeflow.cli.restore import sha256_file
from gaugeflow.cli.schema import register
from gaugeflow.exact import reference_values
from gaugeflow.fermions import SolverNotConverged
from gaugeflow.io.ensemble import EnsembleWriter, parse_compression, read_chain_state, read_ensemble
from gaugeflow.sampling.correlators import correlator_analysis
from gaugeflow.sampling.hmc import HMC, chain_generators, has_parts
from gaugeflow.sampling.statistics import gamma_method, replicas
from gaugeflow.theories.gauge import IMPROVEMENTS
from gaugeflow.theories.theory import MISSING_ATTR

register()


#: the keys of runs with dynamical fermions, with their defaults (conf/hmc.yaml); a theory
#: without fermions refuses any of them set to another value
FERMION_KEYS = {"gauge_steps": 1, "cg_tol": 1e-10, "cg_maxiter": 10_000, "measure_logdet": False,
                "fermion_measurements": True}


class SolverFailure(RuntimeError):
    """A solve did not converge during the run: the file holds what came before; one line, exit 1."""


def is_fermionic(action) -> bool:
    """Whether ``action`` follows the fermionic interface (:mod:`gaugeflow.theories.fermionic`)."""
    return has_parts(action) and callable(getattr(action, "solver_stats", None))


def _fermion_setup(h, theory) -> dict:
    """Check the fermion keys against the theory and apply them to its action; what the loop needs."""
    act = theory.action
    if not is_fermionic(act):
        for key, default in FERMION_KEYS.items():
            value = h.get(key, default)
            if value != default:
                raise UsageError(f"hmc.{key}={value}: theory {theory.name} has no dynamical fermions (hmc.{key} is "
                                 f"for theories with fermions, e.g. theory=schwinger_2d); leave it at {default}")
        return {}
    require(int(h.gauge_steps) >= 1, f"hmc.gauge_steps must be >= 1, got {h.gauge_steps}")
    require(math.isfinite(float(h.cg_tol)) and float(h.cg_tol) > 0, f"hmc.cg_tol must be > 0, got {h.cg_tol}")
    require(int(h.cg_maxiter) >= 1, f"hmc.cg_maxiter must be >= 1, got {h.cg_maxiter}")
    if hasattr(act, "tol"):
        act.tol = float(h.cg_tol)
    if hasattr(act, "maxiter"):
        act.maxiter = int(h.cg_maxiter)
    pseudo = callable(getattr(act, "refresh", None))
    if pseudo and h.force == "autograd":
        raise UsageError("hmc.force=autograd: the pseudofermion force has no autograd path (its CG solve is not "
                         "differentiated); use hmc.force=analytic")
    logdet = not pseudo or bool(h.measure_logdet)
    if pseudo and logdet:
        from gaugeflow.fermions import MAX_DENSE_UNKNOWNS
        from gaugeflow.theories.fermionic import dense_unknowns

        n = dense_unknowns(theory.lattice.global_shape, theory.group.N)
        cap = int(getattr(act, "max_unknowns", MAX_DENSE_UNKNOWNS))
        if n > cap:
            raise UsageError(f"hmc.measure_logdet=true: lattice.shape={list(theory.lattice.global_shape)} needs a "
                             f"dense {n}x{n} Dirac matrix per configuration, above {cap}; use hmc.measure_logdet=false")
    return {"pseudo": pseudo, "logdet": logdet, "measure": bool(h.fermion_measurements)}


def measurement_generator(seed: int, traj: int, device) -> torch.Generator:
    """The generator of the stochastic fermion measurements of trajectory ``traj``: a function of
    ``(seed, traj)`` only (the file's ``measure_seed``), so the chains' own streams do not depend
    on what is measured, and a continuation measures what the uninterrupted run would."""
    hi, lo = np.random.SeedSequence([int(seed) % (1 << 64), int(traj), 0x6D656173]).generate_state(2, np.uint32)
    g = torch.Generator(device=device)
    return g.manual_seed(((int(hi) << 32) | int(lo)) & ((1 << 63) - 1))


def run_hmc(cfg: DictConfig) -> dict:
    """Run the job described by ``cfg``; returns the summary it printed.

    A solve that does not converge (``gaugeflow.fermions.SolverNotConverged``) ends the run after
    the file is written (the trajectories before it, and the chain state before the failed
    trajectory) and raises :class:`SolverFailure` with one line."""
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
        fermion = _fermion_setup(h, theory)
        # one generator per chain: chain c's stream depends on (seed, c) only, and chain 0's
        # generator is seeded with `seed` itself, so hmc.chains=1 is the single-chain run
        generators = chain_generators(int(cfg.seed), n_chains, device)
        sampler = HMC(theory, h.n_steps, h.traj_length, h.integrator, h.force,
                      generators[0] if n_chains == 1 else generators,
                      gauge_steps=int(h.get("gauge_steps", 1)) if fermion else 1)
    except ValueError as err:
        raise UsageError(str(err)) from None

    attrs = theory.attributes()
    offset = 0  # trajectories (after thermalization) of the chains before this file
    measure_seed = int(cfg.seed)
    if h.continue_from:
        fields, offset = _continue_chain(str(h.continue_from), theory, generators)
        attrs.update(continued_from=os.path.abspath(str(h.continue_from)),
                     continued_from_sha256=sha256_file(h.continue_from))
        if fermion:
            measure_seed = int(read_ensemble(str(h.continue_from), load_fields=False).attrs.get("measure_seed",
                                                                                               measure_seed))
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
    if fermion:
        attrs.update(gauge_steps=int(h.gauge_steps), cg_tol=float(h.cg_tol), cg_maxiter=int(h.cg_maxiter),
                     measure_logdet=bool(fermion["logdet"]), fermion_measurements=bool(fermion["measure"]),
                     measure_seed=measure_seed)
        options = getattr(theory.action, "options", None)
        if options is not None:
            # the pseudofermion algorithm (even/odd, Hasenbusch kappas, mixed precision): it does not
            # change the target, so it is not a theory parameter, but a file says how it was made
            attrs.update(pseudofermion_options=json.dumps(options))
    field_name = "links" if theory.is_gauge else "phi"
    # per key, one array of the chains' values per trajectory (acceptance, <exp(-dH)>) or per
    # stored configuration (measurements; NaN where not measured)
    series: dict[str, list[np.ndarray]] = {}
    n_done = n_therm_done = 0
    acc_sum = 0.0
    reason = "completed"
    failure = None
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
    action = theory.action
    solver = {"cg_iterations": [], "solve_seconds": [], "seconds": [], "measure_seconds": 0.0}
    if fermion:
        action.solver_stats()  # counts from here
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
            traj = offset + n_done + 1  # the chains' trajectory number, continuations included
            # the streams before this trajectory: a failed solve puts them back, so the file's chain
            # state is the state before the failed trajectory and a continuation retries it
            states = [g.get_state() for g in generators] if fermion else None
            ts = time.monotonic() if fermion else 0.0  # (one clock reading per trajectory otherwise)
            try:
                res = sampler.trajectory(fields)
                if fermion:
                    stats = action.solver_stats()
                if i < n_therm or traj % save_every:
                    meas = None
                else:
                    meas = _measure(theory, res, traj, keys, save_every, measure_every, flow_time, fermion,
                                    measure_seed, generators[0].device)
                    if fermion:
                        solver["measure_seconds"] += float(action.solver_stats()["solve_seconds"])
            except SolverNotConverged as err:
                for g, st in zip(generators, states or []):
                    g.set_state(st)
                if fermion:
                    action.solver_stats()
                where = f"thermalization trajectory {i + 1}" if i < n_therm else f"trajectory {traj}"
                reason = f"SolverNotConverged at {where}"
                failure = (where, err)
                break
            fields = res.fields
            if i < n_therm:
                n_therm_done += 1
                bar.advance(f"therm dH={res.delta_h.double().mean().item():+.3g}")
                continue
            if fermion:
                solver["cg_iterations"].append(int(stats["cg_iterations"]))
                solver["solve_seconds"].append(float(stats["solve_seconds"]))
                solver["seconds"].append(time.monotonic() - ts)
            for k, v in (("accepted", res.accepted), ("exp_minus_delta_h", torch.exp(-res.delta_h))):
                series.setdefault(k, []).append(v.double().cpu().numpy())
            if meas is not None:
                # measured on the configurations the file keeps: the summary is the file's analysis
                if fermion:
                    meas["cg_iterations"] = torch.full((n_chains,), int(stats["cg_iterations"]), dtype=torch.int64)
                    meas["solve_seconds"] = torch.full((n_chains,), float(stats["solve_seconds"]),
                                                       dtype=torch.float64)
                for k, v in meas.items():
                    series.setdefault(k, []).append(v.double().cpu().numpy())
                if "topological_charge" in meas:
                    series.setdefault("topological_charge_squared", []).append(
                        meas["topological_charge"].double().square().cpu().numpy())
                # rows of one trajectory of every chain: a stop leaves chains of equal length
                index = {} if n_chains == 1 else {"chain": chain_ids, "trajectory": np.full(n_chains, traj)}
                log_p = {} if "action" not in meas else {"log_p": -meas["action"]}
                writer.append(res.fields, **index, accepted=res.accepted, delta_h=res.delta_h, **meas, **log_p)
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
        if fermion and solver["cg_iterations"]:
            summary["_solver"] = {"cg_iterations": float(np.mean(solver["cg_iterations"])),
                                  "solve_seconds": float(np.mean(solver["solve_seconds"])),
                                  "seconds": float(np.mean(solver["seconds"])),
                                  "measure_solve_seconds": solver["measure_seconds"]}
            writer.set_attrs(cg_iterations_per_trajectory=summary["_solver"]["cg_iterations"],
                             solve_seconds_per_trajectory=summary["_solver"]["solve_seconds"])
        # the state after the last trajectory run: a continuation starts here, with these streams
        rng = generators[0].get_state() if n_chains == 1 else torch.stack([g.get_state() for g in generators])
        writer.set_chain_state(fields, rng, rng_device=generators[0].device.type, n_traj_chain=offset + n_done)
    _report(cfg, theory, summary, n_done, n_therm_done, seconds, reason, writer, n_chains)
    summary.pop("_correlators", None)  # Estimate objects; the lists are under their own keys
    if failure is not None:
        where, err = failure
        worst = float(err.residual.max()) if err.residual.numel() else math.nan
        raise SolverFailure(
            f"hmc: {err.solver} did not converge at {where}: relative residual {worst:.3e} > hmc.cg_tol="
            f"{float(h.cg_tol):g} after hmc.cg_maxiter={int(h.cg_maxiter)} iterations; {writer.path} holds the "
            f"{writer.n} configurations before it and the chain state to continue from (hmc.continue_from="
            f"{writer.path} hmc.n_therm=0, with a larger hmc.cg_maxiter)")
    return summary


def _measure(theory, res, traj: int, keys, save_every: int, measure_every: int, flow_time: float, fermion: dict,
             measure_seed: int, device) -> dict[str, torch.Tensor]:
    """The per-configuration datasets of a stored trajectory (before the fields are committed: a
    failed solve here leaves nothing half-written)."""
    fields = res.fields
    full = keys is None or traj % (save_every * measure_every) == 0
    meas = theory.measure(fields, flow_time) if full else _cheap_measurements(theory, fields, keys)
    if not fermion:
        return {"action": res.action, **meas}
    act = theory.action
    out: dict[str, torch.Tensor] = {}
    sg = res.parts["gauge_action"]
    if not fermion["pseudo"]:
        out["action"] = res.action  # S_G - log det(D^dagger D): the Hamiltonian's, the marginal
        out["fermion_logdet"] = -res.parts["fermion_action"]
    elif fermion["logdet"]:
        logdet = act.fermion_logdet(fields).to(sg.dtype)
        out["action"] = sg - logdet  # the links' marginal, not the joint action of the Hamiltonian
        out["fermion_logdet"] = logdet
    out["gauge_action"] = sg
    if fermion["pseudo"]:
        out["pseudofermion_action"] = res.parts["fermion_action"]  # with this trajectory's pseudofermions
    out.update(meas)
    if fermion["measure"]:
        batch, t_len = fields.shape[0], int(theory.lattice.global_shape[-1])
        if full:
            fm = act.measurements(fields, measurement_generator(measure_seed, traj, device))
            out["pion_correlator"] = fm["pion_correlator"].to(torch.float64)
            out["chiral_condensate"] = fm["chiral_condensate"].to(torch.float64)
        else:
            out["pion_correlator"] = torch.full((batch, t_len), math.nan, dtype=torch.float64)
            out["chiral_condensate"] = torch.full((batch,), math.nan, dtype=torch.float64)
    return out


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
    measured configurations. A correlator (rows ``(chains, T)``) gives the folded correlator and
    its effective mass (:func:`gaugeflow.cli.analyze.correlator_summary`, as ``analyze`` does)."""
    out = {}
    correlators = {}
    for k, v in series.items():
        rows = np.stack(v)  # (trajectories or stored configurations, chains[, T])
        if rows.ndim == 3:
            reps = [r[~np.isnan(r).any(axis=1)] for r in rows.transpose(1, 0, 2)]
            correlators[k] = correlator_analysis([r for r in reps if len(r)])
            continue
        chain = np.repeat(np.arange(rows.shape[1]), rows.shape[0])
        out[k] = gamma_method(replicas(rows.T.reshape(-1), chain)).as_dict()
    if "topological_charge_squared" in out:
        # chi_t = <Q^2> / V: the Q^2 series' Gamma-method error and tau_int, divided by V
        vol = math.prod(theory.lattice.global_shape)
        q2 = out["topological_charge_squared"]
        out["topological_susceptibility"] = {**q2, "mean": q2["mean"] / vol, "err": q2["err"] / vol}
    if correlators:
        out["_correlators"] = correlators
        out.update(correlator_summary(correlators))
    return out


def _report(cfg, theory, summary, n_done, n_therm, seconds, reason, writer, n_chains=1) -> None:
    params = ", ".join(f"{k}={v}" for k, v in theory.params.items() if k not in ("c0",))
    chains = "" if n_chains == 1 else f"{n_chains} chains (replicas) x "
    head = (f"hmc {theory.name} ({params}) shape={list(theory.lattice.shape)}: {chains}{n_done} trajectories after "
            f"{n_therm} thermalization in {seconds:.1f} s" + ("" if reason == "completed" else f" (stopped by {reason})"))
    # the rows `gaugeflow analyze` prints for the file: same names, same exact values, same column width
    estimates = {k: v for k, v in summary.items() if not k.startswith("_") and "mean" in v
                 and not isinstance(v["mean"], list)}
    rows = estimate_rows(estimates, reference_values(theory), ndim=theory.lattice.ndim,
                         flow_time=float(cfg.hmc.flow_time), hide=HIDDEN_ROWS)
    rows += correlator_rows(summary.get("_correlators", {}))
    if "_solver" in summary:
        s = summary["_solver"]
        rows.append(solver_row(s["cg_iterations"], s["solve_seconds"], s["seconds"]))
    print("\n".join([head, *table(rows), f"wrote {writer.n} configurations to {writer.path}"]))


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="hmc")
def main(cfg: DictConfig) -> None:
    try:
        guarded(run_hmc)(cfg)
    except SolverFailure as err:
        # a runtime failure, not rejected input: what was written stays, exit code 1
        print(f"error: {str(err).splitlines()[0]}", file=sys.stderr)
        sys.exit(1)
