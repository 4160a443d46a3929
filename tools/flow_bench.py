#!/usr/bin/env python
"""Flow quality and speed benchmarks (issue: flows quality targets).

  python tools/flow_bench.py quality --theory u1_2d --beta 2 --shape 8 8 --max-time 600
  python tools/flow_bench.py step --theory u1_2d --beta 1 --shape 8 8 --layers 16 --batch 1024

``quality`` trains the theory's default flow (reverse KL or path gradient) for a wall-clock
budget and prints the ESS of independent draws (not an IMH chain) against the step;
``step`` times training steps of a fixed architecture. Figures go to docs/flows.md.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch

from gaugeflow.flows import models
from gaugeflow.sampling.weights import effective_sample_size, log_z_estimate
from gaugeflow.theories import gauge_theory, phi4_theory
from gaugeflow.train.losses import PathGradient, ReverseKL
from gaugeflow.train.schedules import Constant, Cosine
from gaugeflow.train.trainer import Trainer, TrainSettings

#: theory presets (conf/theory) this benchmark knows: (group, dimension); phi^4 at the preset's couplings
PRESETS = {"u1_2d": ("u1", 2), "su2_2d": ("su2", 2), "su3_2d": ("su3", 2), "su3_4d": ("su3", 4), "phi4_2d": (None, 2)}


def make(args):
    group, _ = PRESETS[args.theory]
    theory = phi4_theory(args.shape, m2=-4.0, lam=8.0) if group is None else gauge_theory(args.shape, group, args.beta)
    theory.name = args.theory
    dtype = torch.float64 if args.float64 else torch.float32
    keys = dict(kernel_size=args.kernel)
    if args.layers is not None:
        keys["n_layers"] = args.layers
    if args.hidden is not None:
        keys["hidden"] = tuple(args.hidden)
    # each theory's own architecture, as its preset names it (conf/theory/*.yaml)
    if group is None:
        model = models.affine(theory, dtype, **keys)
    elif group == "u1":
        model = models.u1_equivariant(theory, dtype, n_bins=args.bins, transform=args.transform, n_mix=args.n_mix,
                                      rectangles=not args.no_rectangles, **keys)
    else:
        model = models.sun_spectral(theory, dtype, n_bins=args.bins, **keys)
    return theory, model


@torch.no_grad()
def evaluate(model, theory, n, batch, gen):
    lw = []
    for _ in range(max(1, n // batch)):
        x, log_q = model.sample(batch, gen)
        lw.append(-theory.action(x).double() - log_q.double())
    lw = torch.cat(lw)
    return effective_sample_size(lw).item(), log_z_estimate(lw)


def quality(args):
    torch.manual_seed(args.seed)
    theory, model = make(args)
    gen = torch.Generator().manual_seed(args.seed)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    loss_fn = PathGradient() if args.loss == "path_gradient" else ReverseKL()
    # --cosine: decay over the wall-clock budget (the trainer plans it for the steps that fit, from
    # the measured time per step): the budget, not a step count, is fixed
    sched = Cosine(opt, args.steps, horizon="time") if args.cosine else Constant(opt, args.steps)
    settings = TrainSettings(steps=args.steps, batch_size=args.batch, max_time=args.max_time,
                             stop_after=args.eval_every, log_every=args.eval_every, eval_samples=0, seed=args.seed)
    trainer = Trainer(theory, model, loss_fn, opt, sched, settings, generator=gen)
    t0, curve = time.monotonic(), []
    train_time = 0.0
    # one trainer call per evaluation interval, each given what is left of the budget: the
    # budget counts training only (evaluation excluded)
    while trainer.step < args.steps and train_time < args.max_time:
        before = trainer.step
        trainer.settings.max_time = args.max_time - train_time
        run = trainer.run()
        train_time += run["seconds"]
        step = trainer.step
        if step > before and step % args.eval_every == 0:
            ess, (lz, lz_err) = evaluate(model, theory, args.eval_n, args.batch, gen)
            row = dict(step=step, train_seconds=round(train_time, 1), loss=trainer.history.loss[-1], ess=ess, log_z=lz, log_z_err=lz_err)
            curve.append(row)
            print(json.dumps(row), flush=True)
        if run["stop_reason"] != "train.stop_after":
            break
    step = trainer.step
    ess, (lz, lz_err) = evaluate(model, theory, args.final_n, args.batch, gen)
    summary = dict(theory=args.theory, beta=args.beta, shape=args.shape, layers=args.layers, hidden=args.hidden,
                   batch=args.batch, lr=args.lr, loss=args.loss, cosine=args.cosine, steps=step, train_seconds=round(train_time, 1),
                   seconds_per_step=train_time / max(step, 1), final_ess=ess, log_z=lz, log_z_err=lz_err,
                   threads=torch.get_num_threads(), params=sum(p.numel() for p in model.parameters()),
                   peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, wall=time.monotonic() - t0)
    print(json.dumps(summary))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(summary=summary, curve=curve), f, indent=1)


def step_timing(args):
    torch.manual_seed(args.seed)
    theory, model = make(args)
    gen = torch.Generator().manual_seed(args.seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    settings = TrainSettings(steps=args.warmup + args.repeats, batch_size=args.batch, log_every=1, eval_samples=0,
                             seed=args.seed)
    trainer = Trainer(theory, model, ReverseKL(), opt, settings=settings, generator=gen)
    trainer.run()
    # the trainer's own time of each step (sampling, backward, optimizer and schedule; not its logging)
    times = [row["seconds_per_step"] for row in trainer.history.rows[args.warmup:]]
    times.sort()
    med = times[len(times) // 2]
    bare = bare_nets_seconds(model, args)
    print(json.dumps(dict(theory=args.theory, shape=args.shape, layers=args.layers, hidden=args.hidden, batch=args.batch,
                          seconds_per_step=med, samples_per_second=args.batch / med, threads=torch.get_num_threads(),
                          bare_nets_seconds=bare, step_over_bare_nets=med / bare,
                          peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)))


def bare_nets_seconds(model, args) -> float:
    """Median time of the floor a training step cannot go below, measured in the same run: the
    context networks alone, forward and backward on random inputs of their shapes, plus the
    Adam update of their weights (no masks, loops, splines, Jacobians or action)."""
    nets = [layer.net for layer in model.flow.layers]
    params = [p for net in nets for p in net.parameters()]
    opt = torch.optim.Adam(params, lr=1e-3)
    dtype = params[0].dtype
    first = [next(m for m in net.modules() if hasattr(m, "in_channels")) for net in nets]
    inputs = [torch.randn(args.batch, f.in_channels, *args.shape, dtype=dtype) for f in first]
    times = []
    for i in range(args.warmup + args.repeats):
        ts = time.perf_counter()
        loss = sum(net(x).square().mean() for net, x in zip(nets, inputs))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i >= args.warmup:
            times.append(time.perf_counter() - ts)
    times.sort()
    return times[len(times) // 2]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["quality", "step"])
    p.add_argument("--theory", default="u1_2d", choices=sorted(PRESETS))
    p.add_argument("--beta", type=float, default=2.0)
    p.add_argument("--shape", type=int, nargs="+", default=[8, 8])
    p.add_argument("--layers", type=int, default=None, help="default: the model builder's choice")
    p.add_argument("--hidden", type=int, nargs="*", default=None, help="default: the model builder's choice")
    p.add_argument("--kernel", type=int, default=3)
    p.add_argument("--bins", type=int, default=8)
    p.add_argument("--transform", default="spline", choices=["spline", "ncp"], help="U(1) circle map")
    p.add_argument("--n-mix", type=int, default=6, help="NCP mixture components")
    p.add_argument("--no-rectangles", action="store_true", help="U(1): frozen plaquettes only in the context")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--loss", default="reverse_kl", choices=["reverse_kl", "path_gradient"])
    p.add_argument("--cosine", action="store_true", help="cosine learning-rate decay over --max-time")
    p.add_argument("--steps", type=int, default=10**9)
    p.add_argument("--max-time", type=float, default=600.0, help="training seconds (evaluation excluded)")
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--eval-n", type=int, default=2048)
    p.add_argument("--final-n", type=int, default=8192)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--float64", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    (quality if args.mode == "quality" else step_timing)(args)


if __name__ == "__main__":
    main()
