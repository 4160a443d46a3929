#!/usr/bin/env python
"""Benchmark the gauge action, its force and HMC against the bare matrix-product floor.

For each workload (4d SU(3) 8^4, 2d U(1) 32^2 by default) this measures, in one process:

* the gauge action ``S(U)`` (Wilson), the analytic force and one HMC trajectory, through the
  public API (``gauge_theory``, ``Theory.action``, ``Theory.force``, ``HMC.trajectory``);
* the *floor*: the bare arithmetic the Wilson action cannot avoid, timed with the fastest
  plain-torch expression found in this run (see ``docs/benchmarks.md``). Per site and plane
  ``mu < nu`` the action needs two full N x N complex products
  (``A = U_mu(x) U_nu(x+mu)`` and ``B = U_nu(x) U_mu(x+nu)``) and one trace-of-product
  contraction ``sum_x Re tr(A B^dagger)`` (N^2 multiply-adds per site, summed over the lattice).
  So ``floor = n_planes * (2 * t_product + t_contraction)`` with ``n_planes = d (d - 1) / 2``;
  neighbour shifts, layout changes and temporaries are *not* in the floor. For U(1) (N = 1) the
  "product" is an elementwise complex multiply. Candidates: ``torch.matmul``, ``torch.einsum``,
  a broadcast-and-sum expression and a colour-major multiply-add expansion for the product
  (also each applied chunk by chunk over the batch, as the action does); a complex product-sum,
  ``linalg.vecdot``, a real-view product-sum and ``einsum`` for the contraction.

It also measures **many HMC chains at once** (``--chains``, default 64; ``gaugeflow hmc
hmc.chains=C``): trajectories per second of one chain against trajectories per second *per chain*
of a batch of 64 independent chains, U(1) on 8x8 with the ``u1_2d`` preset's integrator, both
through the sampler (``HMC.trajectory`` with one generator per chain, timed round by round,
interleaved) and through the job (``run_hmc``: measurements and file writing included; the
file's ``seconds``).

Every timing is the median (and min) of ``--repeats`` rounds after ``--warmup`` calls; the
action, the force and all floor candidates are timed interleaved, round by round, so that
load from other processes hits them alike. Nothing here is a test; no timing is asserted.

Example::

    python tools/bench.py --threads 1 --dtype complex128 complex64 --json bench.json
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch

WORKLOADS = {
    # name: (group, shape, default batch)
    "su3-4d": ("su3", (8, 8, 8, 8), 4),
    "u1-2d": ("u1", (32, 32), 64),
}
DTYPES = {"complex64": torch.complex64, "complex128": torch.complex128}
REAL = {torch.complex64: torch.float32, torch.complex128: torch.float64}


# ----------------------------------------------------------------------------- floor kernels
# Candidates for one batched N x N complex product C = A @ B over all sites of the batch.
# The "aos" ones take the library layout (..., N, N); "colour-major" takes (B, N, N, *L)
# (the colour indices outside the site axes), the layout the product is vectorised best in.


def prod_matmul(a, b):
    return torch.matmul(a, b)


def prod_einsum(a, b):
    return torch.einsum("...ij,...jk->...ik", a, b)


def prod_broadcast(a, b):
    return (a.unsqueeze(-1) * b.unsqueeze(-3)).sum(-2)


def prod_colour_major(a, b):
    # (B, N, N, *L): C[:, i, k] = sum_j A[:, i, j] B[:, j, k], one broadcast multiply-add per j
    c = a[:, :, 0:1] * b[:, 0:1]
    for j in range(1, a.shape[1]):
        c.addcmul_(a[:, :, j : j + 1], b[:, j : j + 1])
    return c


def prod_elementwise(a, b):
    return a * b


def chunked(fn, size):
    """``fn`` applied to slices of ``size`` configurations (the cache blocking the action uses)."""

    def run(a, b):
        return [fn(x, y) for x, y in zip(a.split(size), b.split(size))]

    return run


# Candidates for the per-configuration contraction sum_x Re tr(A B^dagger) = Re sum A conj(B).
def contr_mul_sum(a, b):
    return (a * b.conj()).real.flatten(1).sum(1)


def contr_vecdot(a, b):
    return torch.linalg.vecdot(b.flatten(1), a.flatten(1)).real  # vecdot conjugates its first argument


def contr_real_view(a, b):
    return (torch.view_as_real(a) * torch.view_as_real(b)).flatten(1).sum(1)


def contr_einsum(a, b):
    return torch.einsum("bi,bi->b", a.flatten(1), b.flatten(1).conj()).real


# ----------------------------------------------------------------------------- allocator


def tune_malloc(mode: str) -> str:
    """Keep freed CPU tensors in the heap instead of returning them to the OS.

    torch's CPU allocator is glibc malloc. By default blocks above a (dynamic) threshold
    are mmap-ed and heap tops above 128 KiB are trimmed, so every large temporary is
    page-faulted in afresh; on the benchmark VM that costs several times the arithmetic
    on it. ``tuned`` does what ``MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824``
    in the environment would do. Returns the mode in effect.
    """
    if mode == "default":
        return "default"
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        ok = libc.mallopt(m_mmap_threshold, 32 << 20) and libc.mallopt(m_trim_threshold, 1 << 30)
    except (OSError, AttributeError):
        ok = False
    return "tuned (mmap 32 MiB, trim 1 GiB)" if ok else "default (mallopt unavailable)"


# ----------------------------------------------------------------------------- timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(fns: dict[str, Callable[[], object]], repeats: int, warmup: int, device) -> dict:
    """Median and min seconds of every function, timed round-robin (one call each per round)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    _sync(device)
    samples: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            _sync(device)
            c = time.process_time()
            t = time.perf_counter()
            fn()
            _sync(device)
            samples[name].append(time.perf_counter() - t)
            cpu[name].append(time.process_time() - c)
    return {
        k: {
            "median_s": statistics.median(v),
            "min_s": min(v),
            # CPU seconds of all threads of this process; with --threads 1 it excludes time
            # the thread waited for a core held by another process
            "cpu_median_s": statistics.median(cpu[k]),
            "n": len(v),
        }
        for k, v in samples.items()
    }


# ----------------------------------------------------------------------------- one workload


def colour_major(x: torch.Tensor) -> torch.Tensor:
    """(B, *L, N, N) -> contiguous (B, N, N, *L)."""
    n = x.dim()
    return x.permute(0, n - 2, n - 1, *range(1, n - 2)).contiguous()


def bench_workload(name: str, dtype: torch.dtype, args, device: torch.device) -> dict:
    from gaugeflow.lattice import shift
    from gaugeflow.sampling.hmc import HMC
    from gaugeflow.theories import gauge_theory

    group, shape, default_batch = WORKLOADS[name]
    batch = args.batch if args.batch is not None else default_batch
    d = len(shape)
    volume = math.prod(shape)
    n_planes = d * (d - 1) // 2
    theory = gauge_theory(list(shape), group, args.beta)
    n = theory.group.N
    gen = torch.Generator().manual_seed(args.seed)
    links = theory.start(batch, "hot", gen, REAL[dtype]).to(device)

    # operands of the floor: real link fields of the same size as one direction of the lattice
    a = links[:, 0].contiguous()
    b = links[:, 1].contiguous()
    # batch chunk the library's Wilson action uses (one chunk = whole configurations)
    try:
        from gaugeflow.theories.gauge import CHUNK_ELEMENTS
    except ImportError:  # a version without batch chunking: no chunked candidates
        CHUNK_ELEMENTS = batch * volume * n * n
    chunk = max(1, CHUNK_ELEMENTS // (volume * n * n))
    if n == 1:
        a1, b1 = a[..., 0, 0].contiguous(), b[..., 0, 0].contiguous()
        ew_chunked = chunked(prod_elementwise, chunk)
        prod = {
            "elementwise": lambda: prod_elementwise(a1, b1),
            f"elementwise/chunk{chunk}": lambda: ew_chunked(a1, b1),
            "matmul": lambda: prod_matmul(a, b),
        }
        # 1x1 "matmul" is reported for reference only: the floor is the elementwise multiply
        eligible = {"elementwise", f"elementwise/chunk{chunk}"}
        if chunk >= batch:
            del prod[f"elementwise/chunk{chunk}"]
    else:
        acm, bcm = colour_major(a), colour_major(b)
        mm_chunked, cm_chunked = chunked(prod_matmul, chunk), chunked(prod_colour_major, chunk)
        prod = {
            "matmul": lambda: prod_matmul(a, b),
            "einsum": lambda: prod_einsum(a, b),
            "broadcast-sum": lambda: prod_broadcast(a, b),
            "colour-major": lambda: prod_colour_major(acm, bcm),
            f"matmul/chunk{chunk}": lambda: mm_chunked(a, b),
            f"colour-major/chunk{chunk}": lambda: cm_chunked(acm, bcm),
        }
        if chunk >= batch:
            del prod[f"matmul/chunk{chunk}"], prod[f"colour-major/chunk{chunk}"]
        eligible = set(prod)
    contr = {
        "mul-sum": lambda: contr_mul_sum(a, b),
        "vecdot": lambda: contr_vecdot(a, b),
        "real-view": lambda: contr_real_view(a, b),
        "einsum": lambda: contr_einsum(a, b),
    }
    shift_op = {"shift": lambda: shift(links[:, 1], 0, 1)}  # one neighbour shift of a link site field

    with torch.no_grad():
        # correctness of the floor candidates against each other (cheap, once)
        if n > 1:
            ref = prod_matmul(a, b)
            got = prod_colour_major(acm, bcm).permute(0, *range(3, 3 + d), 1, 2)
            assert torch.allclose(ref, got, atol=1e-5 if dtype == torch.complex64 else 1e-12)
            for fn in (prod_einsum, prod_broadcast):
                assert torch.allclose(ref, fn(a, b), atol=1e-5 if dtype == torch.complex64 else 1e-12)
        c_ref = contr_mul_sum(a, b)
        # sums of |terms| <= 1 (unitary links): rounding bounded by eps x terms per configuration
        atol = 4 * torch.finfo(REAL[dtype]).eps * a[0].numel()
        for fn in (contr_vecdot, contr_real_view, contr_einsum):
            assert torch.allclose(c_ref, fn(a, b), rtol=0, atol=atol)

        fns = {}
        fns.update({f"product/{k}": v for k, v in prod.items()})
        fns.update({f"contraction/{k}": v for k, v in contr.items()})
        fns.update({f"shift/{k}": v for k, v in shift_op.items()})
        fns["action"] = lambda: theory.action(links)
        fns["force"] = lambda: theory.force(links, "analytic")
        t = time_interleaved(fns, args.repeats, args.warmup, device)

        hmc_res = None
        if args.hmc_trajectories > 0:
            hmc_gen = torch.Generator(device=device).manual_seed(args.seed)
            hmc = HMC(theory, args.hmc_steps, args.hmc_length, "leapfrog", "analytic", hmc_gen)
            state = {"u": links}

            def traj():
                state["u"] = hmc.trajectory(state["u"]).fields

            hmc_t = time_interleaved({"trajectory": traj}, args.hmc_trajectories, 1, device)
            hmc_res = hmc_t["trajectory"]

    def pick(kind, allowed):
        cands = {}
        for key, v in t.items():
            k, _, kernel = key.partition("/")
            if k == kind and kernel in allowed:
                cands[kernel] = v
        best = min(cands, key=lambda k: cands[k]["median_s"])
        return best, cands[best]

    p_name, p_t = pick("product", eligible)
    c_name, c_t = pick("contraction", set(contr))
    floor_med = n_planes * (2 * p_t["median_s"] + c_t["median_s"])
    floor_min = n_planes * (2 * p_t["min_s"] + c_t["min_s"])
    act, frc = t["action"], t["force"]
    sites = batch * volume
    out = {
        "workload": name,
        "group": theory.group.name,
        "shape": list(shape),
        "batch": batch,
        "dtype": str(dtype).replace("torch.", ""),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "count_per_site": {
            "planes": n_planes,
            "products": 2 * n_planes,
            "contractions": n_planes,
            "shifts_in_action": 2 * n_planes,
        },
        "timings": t,
        "floor": {
            "product_kernel": p_name,
            "contraction_kernel": c_name,
            "product_s": p_t["median_s"],
            "contraction_s": c_t["median_s"],
            "floor_s": floor_med,
            "floor_min_s": floor_min,
        },
        "action": {
            "median_s": act["median_s"],
            "min_s": act["min_s"],
            "evals_per_s": 1.0 / act["median_s"],
            "sites_per_s": sites / act["median_s"],
            "ratio_to_floor": act["median_s"] / floor_med,
            "ratio_to_floor_min": act["min_s"] / floor_min,
        },
        "force": {
            "median_s": frc["median_s"],
            "min_s": frc["min_s"],
            "evals_per_s": 1.0 / frc["median_s"],
            "sites_per_s": sites / frc["median_s"],
            "in_products": frc["median_s"] / p_t["median_s"],
        },
    }
    if hmc_res is not None:
        out["hmc"] = {
            "n_steps": args.hmc_steps,
            "traj_length": args.hmc_length,
            "integrator": "leapfrog",
            "s_per_trajectory": hmc_res["median_s"],
            "min_s": hmc_res["min_s"],
            "s_per_trajectory_per_config": hmc_res["median_s"] / batch,
            "n": hmc_res["n"],
        }
    return out


# ----------------------------------------------------------------------------- many chains


def _hmc_config(*overrides: str):
    from gaugeflow.cli.common import CONFIG_DIR
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("hmc", overrides=["hmc.progress=false", *overrides])


def bench_chains(args, device: torch.device) -> dict:
    """Trajectories per second of 1 chain and per chain of ``args.chains`` chains (the ``u1_2d``
    preset on ``args.chains_shape``), through the sampler (interleaved) and through the job."""
    import contextlib
    import io
    import tempfile

    import h5py
    from gaugeflow.cli.build import theory_from_config
    from gaugeflow.cli.hmc import run_hmc
    from gaugeflow.sampling.hmc import HMC, chain_generators

    shape = "[" + ",".join(map(str, args.chains_shape)) + "]"
    dtype = DTYPES[args.dtype[0]]
    precision = str(REAL[dtype]).replace("torch.", "")
    common = ["theory=u1_2d", f"lattice.shape={shape}", f"hmc.precision={precision}", f"device={device}",
              f"seed={args.seed}"]
    cfg = _hmc_config(*common, "out=unused.h5")
    h = cfg.hmc
    theory = theory_from_config(cfg)
    counts = (1, args.chains)
    fns, state = {}, {}
    for c in counts:
        gens = chain_generators(args.seed, c, device)
        hmc = HMC(theory, h.n_steps, h.traj_length, h.integrator, h.force, gens[0] if c == 1 else gens)
        state[c] = torch.cat([theory.start(1, h.start, g, REAL[dtype]) for g in gens]).to(device)

        def traj(c=c, hmc=hmc):
            state[c] = hmc.trajectory(state[c]).fields

        fns[f"{c} chain" + ("s" if c > 1 else "")] = traj
    with torch.no_grad():
        t = time_interleaved(fns, args.chains_rounds, args.warmup, device)
    sampler = {}
    for (name, v), c in zip(t.items(), counts):
        sampler[str(c)] = {"chains": c, "s_per_batch_trajectory": v["median_s"], "min_s": v["min_s"],
                           "trajectories_per_s_per_chain": c / v["median_s"], "n": v["n"]}
    job: dict[str, dict] = {str(c): {"chains": c, "seconds": []} for c in counts}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.chains_job_repeats):
            for c in counts:  # interleaved, like the sampler's rounds
                out = os.path.join(tmp, f"c{c}_{r}.h5")
                with contextlib.redirect_stdout(io.StringIO()):
                    run_hmc(_hmc_config(*common, f"hmc.chains={c}", f"hmc.n_traj={args.chains_job_trajectories}",
                                        "hmc.n_therm=0", f"out={out}"))
                with h5py.File(out) as f:
                    job[str(c)]["seconds"].append(float(f.attrs["seconds"]))
    for v in job.values():
        sec = statistics.median(v["seconds"])
        v.update(n_traj=args.chains_job_trajectories, median_s=sec,
                 trajectories_per_s_per_chain=v["chains"] * args.chains_job_trajectories / sec)
    one, many = str(counts[0]), str(counts[1])
    return {
        "theory": "u1_2d",
        "shape": list(args.chains_shape),
        "beta": float(cfg.theory.beta),
        "integrator": str(h.integrator),
        "n_steps": int(h.n_steps),
        "traj_length": float(h.traj_length),
        "dtype": str(dtype).replace("torch.", ""),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "sampler": sampler,
        "job": job,
        "speedup_sampler": sampler[many]["trajectories_per_s_per_chain"] / sampler[one]["trajectories_per_s_per_chain"],
        "speedup_job": job[many]["trajectories_per_s_per_chain"] / job[one]["trajectories_per_s_per_chain"],
    }


def print_chains(r: dict, file=sys.stdout) -> None:
    counts = list(r["sampler"])
    shape = "x".join(map(str, r["shape"]))
    print(f"\n## HMC chains  U(1) {shape}  beta {r['beta']}  {r['n_steps']} {r['integrator']} steps, "
          f"tau = {r['traj_length']}  {r['dtype']}  {r['device']}  threads {r['threads']}", file=file)
    print("  chains   sampler traj/s per chain   job traj/s per chain (measurements and file included)", file=file)
    for c in counts:
        s, j = r["sampler"][c], r["job"][c]
        print(f"  {int(c):6d}   {s['trajectories_per_s_per_chain']:24.1f}   {j['trajectories_per_s_per_chain']:20.1f}",
              file=file)
    print(f"  {counts[-1]} chains / 1 chain: sampler x{r['speedup_sampler']:.1f}, job x{r['speedup_job']:.1f}",
          file=file)


# ----------------------------------------------------------------------------- reporting


def machine_info() -> dict:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
    }
    try:
        info["loadavg_1min_at_start"] = os.getloadavg()[0]
    except OSError:
        pass
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name(0)
    return info


def _ms(s: float) -> str:
    return f"{1e3 * s:9.3f}"


def print_report(results: list[dict], info: dict, file=sys.stdout) -> None:
    def out(line: str = "") -> None:
        print(line, file=file)

    out(
        f"# gaugeflow benchmark  torch {info['torch']}  {info['cpu']} ({info['logical_cpus']} logical CPUs)"
        f"  malloc {info.get('malloc', '?')}"
    )
    out(f"# load average {info.get('loadavg_1min_at_start', float('nan')):.2f} at start, "
        f"{info.get('loadavg_1min_at_end', float('nan')):.2f} at end")
    for r in results:
        t, f, c = r["timings"], r["floor"], r["count_per_site"]
        chosen = {"product": f["product_kernel"], "contraction": f["contraction_kernel"]}
        shape = "x".join(map(str, r["shape"]))
        out(
            f"\n## {r['workload']}  {r['group']} {shape}  batch {r['batch']}  {r['dtype']}  "
            f"{r['device']}  threads {r['threads']}"
        )
        out("  candidate                       median ms     min ms")
        for k, v in t.items():
            if "/" in k:
                kind, kernel = k.split("/", 1)
                mark = "  <- floor" if chosen.get(kind) == kernel else ""
                out(f"  {k:30s}{_ms(v['median_s'])}  {_ms(v['min_s'])}{mark}")
        out(
            f"  floor = {c['planes']} planes x (2 x {f['product_kernel']} product"
            f" + 1 {f['contraction_kernel']} contraction) = {1e3 * f['floor_s']:.3f} ms"
        )
        a, fo = r["action"], r["force"]
        out(
            f"  action  {1e3 * a['median_s']:8.3f} ms  {a['evals_per_s']:9.1f} evals/s  "
            f"{a['sites_per_s']:11.3e} sites/s  action/floor = {a['ratio_to_floor']:.2f}"
            f" (min-based {a['ratio_to_floor_min']:.2f})"
        )
        out(
            f"  force   {1e3 * fo['median_s']:8.3f} ms  {fo['evals_per_s']:9.1f} evals/s  "
            f"{fo['sites_per_s']:11.3e} sites/s  = {fo['in_products']:.1f} floor products"
        )
        if "hmc" in r:
            h = r["hmc"]
            out(
                f"  HMC     {h['s_per_trajectory']:.3f} s/trajectory ({h['n_steps']} leapfrog steps,"
                f" tau = {h['traj_length']}, {h['n']} trajectories;"
                f" {1e3 * h['s_per_trajectory_per_config']:.2f} ms per configuration)"
            )
    out("\n## summary (medians; sites/s = batch x volume / time)")
    out(
        f"{'workload':8s} {'dtype':10s} {'batch':>5s} {'thr':>3s} {'floor ms':>9s} {'action ms':>9s}"
        f" {'ratio':>5s} {'act sites/s':>11s} {'force ms':>9s} {'frc sites/s':>11s} {'s/traj':>7s}"
    )
    for r in results:
        h = r.get("hmc", {}).get("s_per_trajectory", float("nan"))
        a, fo = r["action"], r["force"]
        out(
            f"{r['workload']:8s} {r['dtype']:10s} {r['batch']:5d} {r['threads']:3d}"
            f" {_ms(r['floor']['floor_s'])} {_ms(a['median_s'])} {a['ratio_to_floor']:5.2f}"
            f" {a['sites_per_s']:11.3e} {_ms(fo['median_s'])} {fo['sites_per_s']:11.3e} {h:7.3f}"
        )


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    p.add_argument("--batch", type=int, default=None, help="configurations per call (su3-4d: 4, u1-2d: 64)")
    p.add_argument("--repeats", type=int, default=21, help="timed rounds; medians are reported (default 21)")
    p.add_argument("--warmup", type=int, default=3, help="untimed rounds first (default 3)")
    p.add_argument("--dtype", nargs="+", default=["complex128"], choices=list(DTYPES))
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all CPUs)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    p.add_argument("--beta", type=float, default=6.0)
    p.add_argument("--hmc-steps", type=int, default=10, help="leapfrog steps per trajectory (default 10)")
    p.add_argument("--hmc-length", type=float, default=1.0, help="trajectory length (default 1.0)")
    p.add_argument("--hmc-trajectories", type=int, default=3, help="timed trajectories; 0: no HMC (and no chains)")
    p.add_argument("--chains", type=int, default=64, help="chains of the many-chains figure against 1 (0: skip)")
    p.add_argument("--chains-shape", type=int, nargs="+", default=[8, 8], help="U(1) lattice of that figure")
    p.add_argument("--chains-rounds", type=int, default=50, help="timed sampler rounds of that figure")
    p.add_argument("--chains-job-trajectories", type=int, default=200, help="trajectories per job run")
    p.add_argument("--chains-job-repeats", type=int, default=3, help="job runs per chain count (median)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--malloc",
        choices=["tuned", "default"],
        default="tuned",
        help="glibc malloc: tuned (freed tensors stay in the heap; default) or glibc's own thresholds",
    )
    p.add_argument("--json", default=None, help="also write all figures to this JSON file")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads < 1:
        raise SystemExit("--threads must be >= 1")
    malloc = tune_malloc(args.malloc)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    info = machine_info()
    info["malloc"] = malloc
    info["torch_threads"] = torch.get_num_threads()
    results = []
    for name in args.workloads:
        for dt in args.dtype:
            results.append(bench_workload(name, DTYPES[dt], args, device))
    chains = bench_chains(args, device) if args.chains > 1 and args.hmc_trajectories > 0 else None
    try:
        info["loadavg_1min_at_end"] = os.getloadavg()[0]
    except OSError:
        pass
    print_report(results, info)
    if chains is not None:
        print_chains(chains)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "args": vars(args), "results": results, "chains": chains}, f, indent=2)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
