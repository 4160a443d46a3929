#!/usr/bin/env python
"""Benchmark the d >= 4 periodic-convolution algorithms of ``gaugeflow.flows.conv``.

Torch has no conv4d; ``periodic_conv`` builds it from ``conv3d`` in one of several ways
(``METHODS``: fold, slices, outfold, im2col; see the module docstring of
``gaugeflow.flows.conv``), and ``auto`` is what it picks by default (``default_method``), so
the table shows whether that rule still picks the fastest. For each workload this times, in
one process:

* ``fwd``: the forward pass under ``torch.no_grad()`` (sampling);
* ``fwd+bwd``: forward and backward with gradients for input, weight and bias (training);

each including the periodic halo (``gaugeflow.lattice.pad``), as a layer pays it. All methods
are timed interleaved, round by round, so that load from other processes hits them alike; the
figure is the median (and min) over ``--repeats`` rounds after ``--warmup`` calls. On a shared
machine wall-clock figures swing by 2x when other processes take the cores; ``--clock cpu`` with
``--threads 1`` times the CPU time of the one working thread instead, which preemption does
not inflate (use it to rank methods; use wall clock for what a run will see). Before
timing, every method is checked against ``fold`` (the outputs must agree), so a fast but wrong
variant cannot win. Nothing here is a test; no timing is asserted.

Example::

    python tools/bench_conv.py --threads 1 --clock cpu --workloads all --dtype float32 float64
    python tools/bench_conv.py --threads 2
    python tools/bench_conv.py --workloads 4d-hidden --dtype float64 --json conv.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from gaugeflow.flows.conv import METHODS, periodic_conv

WORKLOADS = {
    # name: (batch, C_in, C_out, lattice shape, kernel)
    "4d-hidden": (8, 32, 32, (8, 8, 8, 8), 3),  # a hidden layer of a 4d context net
    "4d-first": (8, 2, 32, (8, 8, 8, 8), 3),  # the first layer: few input channels
    "4d-c8": (8, 8, 32, (8, 8, 8, 8), 3),  # in-channel sweep between first and hidden layer
    "4d-c16": (8, 16, 32, (8, 8, 8, 8), 3),
    "4d-small": (16, 32, 32, (4, 4, 4, 4), 3),  # small lattice, halo-dominated
    "4d-k5": (4, 16, 16, (8, 8, 8, 8), 5),  # wider kernel
    "5d": (4, 16, 16, (6, 6, 6, 6, 6), 3),  # m = 2 leading axes
    "5d-first": (4, 2, 16, (6, 6, 6, 6, 6), 3),
}
DTYPES = {"float32": torch.float32, "float64": torch.float64}


def bench(name: str, dtype: torch.dtype, methods, repeats: int, warmup: int, device: str, clock) -> dict:
    batch, cin, cout, shape, k = WORKLOADS[name]
    d = len(shape)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, cin, *shape, generator=gen, dtype=dtype).to(device)
    w = (torch.rand(cout, cin, *([k] * d), generator=gen, dtype=dtype) - 0.5).to(device)
    b = torch.randn(cout, generator=gen, dtype=dtype).to(device)
    g = torch.randn(batch, cout, *shape, generator=gen, dtype=dtype).to(device)

    ref = periodic_conv(x, w, b, "fold")
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    for m in methods:
        err = (periodic_conv(x, w, b, m) - ref).abs().max().item()
        if err > tol * ref.abs().max().item():
            raise RuntimeError(f"{name}: method {m} disagrees with fold by {err:.3g}")

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    def fwd(m):
        with torch.no_grad():
            periodic_conv(x, w, b, m)
        sync()

    xg, wg, bg = (t.clone().requires_grad_() for t in (x, w, b))

    def fwdbwd(m):
        y = periodic_conv(xg, wg, bg, m)
        y.backward(g)
        xg.grad = wg.grad = bg.grad = None
        sync()

    times = {(m, kind): [] for m in methods for kind in ("fwd", "fwd+bwd")}
    for m in methods:
        for _ in range(warmup):
            fwd(m)
            fwdbwd(m)
    for _ in range(repeats):
        for m in methods:
            for kind, fn in (("fwd", fwd), ("fwd+bwd", fwdbwd)):
                t0 = clock()
                fn(m)
                times[(m, kind)].append(clock() - t0)
    res = {
        "workload": name,
        "batch": batch,
        "channels": [cin, cout],
        "shape": list(shape),
        "kernel": k,
        "dtype": str(dtype).replace("torch.", ""),
        "results": {},
    }
    for m in methods:
        res["results"][m] = {
            kind: {
                "median_ms": 1e3 * statistics.median(times[(m, kind)]),
                "min_ms": 1e3 * min(times[(m, kind)]),
            }
            for kind in ("fwd", "fwd+bwd")
        }
    return res


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--workloads", nargs="+", default=["4d-hidden", "4d-first", "4d-small"], choices=[*WORKLOADS, "all"]
    )
    p.add_argument("--dtype", nargs="+", default=["float32"], choices=list(DTYPES))
    p.add_argument(
        "--methods",
        nargs="+",
        default=[*METHODS, "auto"],
        choices=[*METHODS, "auto"],
        help="auto: what periodic_conv picks by default (default_method)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="wall: perf_counter; cpu: CPU time of this thread (needs --threads 1, CPU device)",
    )
    p.add_argument("--json", default=None, help="also write the results to this file")
    args = p.parse_args(argv)
    if "all" in args.workloads:
        args.workloads = list(WORKLOADS)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "cpu" and (torch.get_num_threads() != 1 or args.device != "cpu"):
        p.error("--clock cpu measures the calling thread only: use it with --threads 1 on the CPU")
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter

    out = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": args.device,
        "clock": args.clock,
        "machine": platform.processor() or platform.machine(),
        "runs": [],
    }
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}, "
        f"{args.clock} clock; ms, median (min), * = fastest median"
    )
    header = f"{'workload':<12}{'dtype':<9}{'pass':<9}" + "".join(f"{m:>18}" for m in args.methods)
    print(header)
    for dt in args.dtype:
        for name in args.workloads:
            r = bench(name, DTYPES[dt], args.methods, args.repeats, args.warmup, args.device, clock)
            out["runs"].append(r)
            for kind in ("fwd", "fwd+bwd"):
                cells = []
                best = min(r["results"][m][kind]["median_ms"] for m in args.methods)
                for m in args.methods:
                    t = r["results"][m][kind]
                    mark = "*" if t["median_ms"] == best else " "
                    cells.append(f"{t['median_ms']:9.1f} ({t['min_ms']:5.1f}){mark}")
                print(f"{name:<12}{dt:<9}{kind:<9}" + "".join(f"{c:>18}" for c in cells), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
