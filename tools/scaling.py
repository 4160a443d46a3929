#!/usr/bin/env python
"""Weak and strong scaling of one training step on 1, 2, 4 CPU processes (gloo).

    python tools/scaling.py                       # 4d SU(3), domain decomposition and data parallel
    python tools/scaling.py --ranks 1 2 --steps 3 --json scaling.json

For each strategy and rank count the tool starts the ranks itself (torchrun's environment
variables, one thread per rank), times reverse-KL training steps of the 4d SU(3) spectral flow
and counts the bytes each rank hands to torch.distributed per step (point-to-point halos,
all-reduces, all-gathers, broadcasts), and the peak resident memory per rank.

* ``domain`` strong: the global lattice (``--shape``) split along the leading axes;
  ``domain`` weak: each rank keeps a block of ``--shape``, the global lattice grows.
* ``ddp`` strong: the global batch split over replicas; weak: each rank keeps ``--batch``.
* ``fsdp`` (when gaugeflow.distributed.fsdp provides it): as ddp, parameters sharded per layer.

Figures go to docs/scaling.md. Ranks beyond the machine's cores oversubscribe it: the
seconds then measure contention, while bytes and memory stay meaningful.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time


def _grid(ranks: int, d: int) -> list[int]:
    """Ranks per axis: powers of two over the leading axes (2 -> [2,1,..], 4 -> [2,2,1,..])."""
    grid = [1] * d
    axis = 0
    while ranks > 1:
        grid[axis % d] *= 2
        ranks //= 2
        axis += 1
    return grid


class ByteCounter:
    """Bytes this rank passes to torch.distributed, by counting the tensors of each call."""

    NAMES = ("isend", "irecv", "send", "recv", "all_reduce", "all_gather", "all_gather_into_tensor",
             "reduce_scatter_tensor", "all_gather_single", "reduce_scatter_single", "broadcast",
             "batch_isend_irecv")  # the *_single ones are what FSDP2 calls in torch 2.13

    def __init__(self):
        import torch.distributed as dist

        self.bytes = 0
        self.dist = dist
        self.saved = {}
        for name in self.NAMES:
            fn = getattr(dist, name, None)
            if fn is not None:
                self.saved[name] = fn
                setattr(dist, name, self._wrap(name, fn))

    @staticmethod
    def _size(obj) -> int:
        import torch

        if isinstance(obj, torch.Tensor):
            return obj.numel() * obj.element_size()
        if isinstance(obj, (list, tuple)):
            return sum(ByteCounter._size(o) for o in obj)
        if hasattr(obj, "tensor"):  # a P2POp
            return ByteCounter._size(obj.tensor)
        return 0

    def _wrap(self, name, fn):
        def counted(*args, **kwargs):
            if name in ("isend", "send", "irecv", "recv", "all_reduce", "broadcast"):
                self.bytes += self._size(args[0] if args else kwargs.get("tensor"))
            elif name == "batch_isend_irecv":
                self.bytes += self._size(args[0])
            else:  # collectives: count the input this rank contributes
                self.bytes += self._size(args[1] if len(args) > 1 else kwargs.get("tensor", kwargs.get("input")))
            return fn(*args, **kwargs)

        return counted


def worker(args) -> dict:
    """One rank: build the model for its share, time training steps, report."""
    import torch

    torch.set_num_threads(1)
    from gaugeflow.distributed.init import init_distributed, rank_seed
    from gaugeflow.distributed.parallel import Parallel
    from gaugeflow.flows.models import sun_spectral
    from gaugeflow.theories import gauge_theory
    from gaugeflow.train.losses import reverse_kl

    ctx = init_distributed("cpu", None, 300)
    ranks = ctx.world_size
    d = len(args.shape)
    shape = list(args.shape)
    batch = args.batch
    grid = None
    if args.strategy == "domain":
        grid = _grid(ranks, d)
        if args.mode == "weak":
            shape = [s * g for s, g in zip(shape, grid)]
    elif args.mode == "strong":
        batch = args.batch // ranks
    par = Parallel(ctx, shape, grid, "fsdp" if args.strategy == "fsdp" else "ddp")
    counter = ByteCounter() if ctx.is_distributed else None
    with par.physics():
        torch.manual_seed(0)
        theory = gauge_theory(par.local_shape, "su3", args.beta)
        model = sun_spectral(theory, n_layers=args.layers, hidden=tuple(args.hidden), kernel_size=args.kernel)
        model = par.prepare(model)  # broadcast; FSDP2 sharding for fsdp
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)
        gen = torch.Generator().manual_seed(rank_seed(0, ctx.rank))
        times, per_step = [], []
        for step in range(args.warmup + args.steps):
            before = counter.bytes if counter else 0
            t0 = time.perf_counter()
            out = reverse_kl(model, theory.action, batch, gen)
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            par.reduce_gradients(model.parameters())  # no-op under fsdp (reduce-scatter in backward)
            opt.step()
            if ctx.is_distributed:
                ctx.barrier()
            if step >= args.warmup:
                times.append(time.perf_counter() - t0)
                per_step.append((counter.bytes if counter else 0) - before)
    n_params = sum(getattr(p, "to_local", lambda p=p: p)().numel() for p in model.parameters())
    ctx.shutdown()
    times.sort()
    return dict(rank=ctx.rank, ranks=ranks, strategy=args.strategy, mode=args.mode, global_shape=shape,
                lattice_grid=grid, local_shape=list(par.local_shape), batch_per_rank=batch,
                seconds_per_step=times[len(times) // 2], bytes_per_step=int(sum(per_step) / len(per_step)),
                peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, local_params=n_params)


def launch(args, strategy: str, mode: str, ranks: int) -> list[dict]:
    from torch.distributed.elastic.utils.distributed import get_free_port

    port = str(get_free_port())
    outs, procs = [], []
    tmp = tempfile.mkdtemp(prefix="gf-scaling-")
    for r in range(ranks):
        out = os.path.join(tmp, f"rank{r}.json")
        env = {**os.environ, "OMP_NUM_THREADS": "1", "RANK": str(r), "WORLD_SIZE": str(ranks),
               "LOCAL_RANK": str(r), "LOCAL_WORLD_SIZE": str(ranks), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": port}
        if ranks == 1:
            for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
                env.pop(k)
        cmd = [sys.executable, __file__, "--worker", "--strategy", strategy, "--mode", mode, "--out", out,
               "--shape", *map(str, args.shape), "--batch", str(args.batch), "--layers", str(args.layers),
               "--hidden", *map(str, args.hidden), "--kernel", str(args.kernel), "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--beta", str(args.beta)]
        procs.append(subprocess.Popen(cmd, env=env))
        outs.append(out)
    for p in procs:
        if p.wait() != 0:
            raise SystemExit(f"{strategy}/{mode} on {ranks} ranks failed (exit {p.returncode})")
    return [json.load(open(o)) for o in outs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--strategies", nargs="+", default=["domain", "ddp"], choices=["domain", "ddp", "fsdp"])
    ap.add_argument("--modes", nargs="+", default=["strong", "weak"], choices=["strong", "weak"])
    ap.add_argument("--ranks", nargs="+", type=int, default=[1, 2, 4])
    ap.add_argument("--shape", nargs="+", type=int, default=[4, 4, 4, 4])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", nargs="+", type=int, default=[16])
    ap.add_argument("--kernel", type=int, default=3, help="context-net kernel: halo depth (kernel - 1) / 2")
    ap.add_argument("--beta", type=float, default=2.0)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--json", help="write all rows here")
    # internal: one rank of a launch
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--strategy", default="domain", help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="strong", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        res = worker(args)
        with open(args.out, "w") as fh:
            json.dump(res, fh)
        return
    rows = []
    print(f"{'strategy':<8} {'mode':<6} {'ranks':>5} {'global shape':<14} {'grid':<12} {'batch/rank':>10} "
          f"{'s/step':>8} {'MB comm/step/rank':>18} {'peak RSS MB/rank':>17}")
    for strategy in args.strategies:
        for mode in args.modes:
            for ranks in args.ranks:
                if strategy != "domain" and mode == "strong" and args.batch % ranks:
                    continue
                res = launch(args, strategy, mode, ranks)
                row = dict(res[0], seconds_per_step=max(r["seconds_per_step"] for r in res),
                           bytes_per_step=max(r["bytes_per_step"] for r in res),
                           peak_rss_mb=max(r["peak_rss_mb"] for r in res))
                rows.append(row)
                print(f"{strategy:<8} {mode:<6} {ranks:>5} {'x'.join(map(str, row['global_shape'])):<14} "
                      f"{str(row['lattice_grid'] or '-'):<12} {row['batch_per_rank']:>10} "
                      f"{row['seconds_per_step']:>8.2f} {row['bytes_per_step'] / 2**20:>18.2f} "
                      f"{row['peak_rss_mb']:>17.0f}", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
