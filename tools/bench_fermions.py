#!/usr/bin/env python
"""Benchmark the Wilson–Dirac operator, CG and fermion HMC against the bare matrix-product floor.

For each workload (2d U(1) 16x16, 4d SU(3) 8^4 by default) this measures, in one process and
interleaved round by round (so load from other processes hits every figure alike):

* ``D psi`` through the public API (``WilsonDirac.apply``), as sites per second;
* the *floor*: the colour products D cannot avoid. Per site and direction mu, D multiplies one
  half spinor (spin/2 components after the spin projection) by ``U_mu(x)`` and one by
  ``U_mu(x-mu)^dagger``: ``2 d`` batched ``(N x N) (N x spin/2)`` products per site. Timed with
  the fastest of ``torch.matmul`` and a colour-major multiply-add expansion, on contiguous
  tensors: no shifts, projections or sums (those are D's overhead above the floor);
* CG solves of ``D^dagger D x = b`` per second with their iteration counts (random links at
  ``--kappa``, relative residual 1e-10);
* seconds per HMC trajectory of the Schwinger model with pseudofermions (``theory=schwinger_2d
  theory.fermions=pseudofermion``, 8x8, beta 2, kappa 0.276, the preset's integrator), one chain
  and per chain of ``--chains`` chains, through ``HMC.trajectory``.

Nothing here is a test; no timing is asserted. Example::

    python tools/bench_fermions.py --threads 2 --json fermions.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time

import torch

WORKLOADS = {"u1-2d": ("u1", [16, 16], 0.26), "su3-4d": ("su3", [8, 8, 8, 8], 0.15)}


def _time(fn, repeats: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def _interleaved(fns: dict, repeats: int, warmup: int) -> dict[str, float]:
    """Median seconds of each function, timed round by round."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def bench_operator(name: str, batch: int, repeats: int, warmup: int, seed: int) -> dict:
    from gaugeflow.fermions import WilsonDirac, cg, gaussian_fermion, n_spin
    from gaugeflow.groups import get_group

    group, shape, kappa = WORKLOADS[name]
    g = get_group(group)
    gen = torch.Generator().manual_seed(seed)
    d, n = len(shape), g.N
    links = g.random((batch, d, *shape), gen, torch.complex128)
    op = WilsonDirac(links, kappa)
    psi = gaussian_fermion(op.field_shape, gen)
    v = math.prod(shape)
    half = n_spin(d) // 2
    # the floor's operands: one colour matrix and one half spinor per site and direction
    u = torch.randn(batch, v, n, n, dtype=torch.complex128, generator=gen)
    h = torch.randn(batch, v, n, half, dtype=torch.complex128, generator=gen)
    uc = u.movedim((-2, -1), (1, 2)).contiguous()  # colour-major, as D keeps its links
    hc = h.movedim((-2, -1), (2, 1)).contiguous()  # (batch, half, N, V)

    def floor_matmul():
        for _ in range(2 * d):
            torch.matmul(u, h)

    def floor_expanded():
        for _ in range(2 * d):
            out = uc[:, None, :, 0] * hc[:, :, 0:1]
            for j in range(1, n):
                out = out.addcmul_(uc[:, None, :, j], hc[:, :, j : j + 1])

    med = _interleaved({"D": lambda: op.apply(psi), "floor_matmul": floor_matmul,
                        "floor_expanded": floor_expanded}, repeats, warmup)
    floor = min(med["floor_matmul"], med["floor_expanded"])
    # CG on D^dagger D, a few solves
    b = gaussian_fermion(op.field_shape, gen)
    t0 = time.perf_counter()
    res = cg(op.normal, b, tol=1e-10, maxiter=20_000)
    t_cg = time.perf_counter() - t0
    return {"workload": name, "shape": shape, "batch": batch, "kappa": kappa,
            "D_seconds": med["D"], "D_sites_per_second": batch * v / med["D"],
            "floor_seconds": floor, "floor_kind": min(("matmul", "expanded"),
                                                       key=lambda k: med[f"floor_{k}"]),
            "D_over_floor": med["D"] / floor, "cg_seconds": t_cg, "cg_solves_per_second": batch / t_cg,
            "cg_iterations": int(res.iterations.max().item())}


def bench_hmc(chains: int, trajectories: int, seed: int) -> dict:
    from gaugeflow.sampling.hmc import HMC, chain_generators
    from gaugeflow.theories import wilson_nf2_theory

    theory = wilson_nf2_theory([8, 8], "u1", 2.0, 0.276, fermions="pseudofermion")
    out = {}
    for c in (1, chains):
        gens = chain_generators(seed, c)
        hmc = HMC(theory, 10, 1.0, "omelyan", "analytic", gens)
        links = theory.start(c, "cold", gens[0])
        for _ in range(2):  # warm-up (and a little thermalisation)
            links = hmc.trajectory(links).fields
        theory.action.solver_stats()
        t0 = time.perf_counter()
        acc = 0.0
        for _ in range(trajectories):
            r = hmc.trajectory(links)
            links, acc = r.fields, acc + r.accepted.double().mean().item()
        dt = (time.perf_counter() - t0) / trajectories
        stats = theory.action.solver_stats()
        out[c] = {"seconds_per_trajectory": dt, "trajectories_per_second_summed": c / dt,
                  "acceptance": acc / trajectories, "cg_iterations_per_trajectory": stats["cg_iterations"] / trajectories}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    p.add_argument("--batch", type=int, nargs="+", default=[16, 1], help="configurations per call, per workload")
    p.add_argument("--repeats", type=int, default=11)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--chains", type=int, default=64, help="chains of the HMC figure against 1 (0: no HMC)")
    p.add_argument("--trajectories", type=int, default=5, help="timed HMC trajectories per chain count")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the figures here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    results = {"threads": args.threads, "torch": torch.__version__, "operators": [], "hmc": None}
    for i, name in enumerate(args.workloads):
        batch = args.batch[min(i, len(args.batch) - 1)]
        r = bench_operator(name, batch, args.repeats, args.warmup, args.seed)
        results["operators"].append(r)
        print(f"{name:7s} {str(r['shape']):14s} batch {batch:3d}: D {1e3 * r['D_seconds']:8.2f} ms "
              f"({r['D_sites_per_second']:.3g} sites/s), floor ({r['floor_kind']}) {1e3 * r['floor_seconds']:8.2f} ms, "
              f"D/floor {r['D_over_floor']:.2f}; CG {r['cg_solves_per_second']:.3g} solves/s, "
              f"{r['cg_iterations']} iterations")
    if args.chains:
        h = bench_hmc(args.chains, args.trajectories, args.seed)
        results["hmc"] = h
        for c, r in h.items():
            print(f"schwinger_2d pseudofermion 8x8, {c:3d} chain(s): {r['seconds_per_trajectory']:.3f} s per trajectory, "
                  f"{r['trajectories_per_second_summed']:.1f} trajectories/s summed over chains, acceptance "
                  f"{r['acceptance']:.2f}, {r['cg_iterations_per_trajectory']:.0f} CG iterations per trajectory")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main()
