#!/usr/bin/env python
"""ESS against training wall time for one or more `gaugeflow train` runs, from their checkpoints.

  python tools/ess_curve.py RUN_DIR [RUN_DIR ...] --draws 4096 --label exact-det --out docs/figures/x.png

Every checkpoint of each run (``train.checkpoint_every``) is sampled as a user samples it,
``gaugeflow sample checkpoint=<file> sample=reweight`` with ``--draws`` independent draws in
float64, and its ESS (of the file's weights ``log_p - log_q``: the joint weight for a joint model)
is put against the training seconds up to that step, summed from the run's metrics.csv
(``seconds_per_step`` of the logged steps times the steps between them: the wall time the
optimiser steps took, without start-up or checkpoint writes). ``--phi-draws K`` adds, for joint
models, the links' marginal ESS with K pseudofermion draws per configuration
(:func:`gaugeflow.flows.joint.marginal_log_weights`). Writes a CSV beside the plot and prints a
table. Run it alone: draws time the machine too.
"""

from __future__ import annotations

import argparse
import csv
import pathlib
import subprocess
import sys
import tempfile

import h5py
import numpy as np


def train_seconds(run: pathlib.Path) -> dict[int, float]:
    """Training seconds up to every logged step (step -> seconds)."""
    out, last, total = {0: 0.0}, 0, 0.0
    with open(run / "metrics.csv") as fh:
        for row in csv.DictReader(fh):
            step = int(row["step"])
            total += float(row["seconds_per_step"]) * (step - last)
            last = step
            out[step] = total
    return out


def seconds_at(table: dict[int, float], step: int) -> float:
    steps = np.array(sorted(table))
    return float(np.interp(step, steps, [table[s] for s in steps]))


def ess_of_checkpoint(ck: pathlib.Path, draws: int, seed: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = pathlib.Path(tmp) / "ens.h5"
        cmd = [sys.executable, "-m", "gaugeflow.cli.main", "sample", f"checkpoint={ck}", "sample=reweight",
               f"sample.n={draws}", "sample.fermion_measurements=false", "sample.progress=false", f"seed={seed}",
               f"out={out}", f"hydra.run.dir={tmp}/run"]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(f"{ck}: gaugeflow sample failed: {r.stderr.strip().splitlines()[-1]}")
        with h5py.File(out) as f:
            lw = f["log_p"][()] - f["log_q"][()]
            w = np.exp(lw - lw.max())
            res = {"ess": float(w.sum() ** 2 / (w**2).sum() / w.size), "n": int(w.size)}
            for k in ("plaquette", "topological_charge"):
                if k in f:
                    res[k] = f[k][()]
            res["log_w"] = lw
    return res


def marginal_ess(ck: pathlib.Path, draws: int, phi_draws: int, seed: int) -> float:
    """The links' marginal ESS of a joint model from ``phi_draws`` pseudofermions per configuration."""
    import torch
    from omegaconf import OmegaConf

    from gaugeflow.cli.build import theory_from_config
    from gaugeflow.cli.restore import restore_model
    from gaugeflow.flows.joint import marginal_log_weights
    from gaugeflow.io.checkpoint import load_checkpoint
    from gaugeflow.sampling.weights import effective_sample_size

    c = load_checkpoint(ck)
    cfg = OmegaConf.create(c.config)
    theory = theory_from_config(cfg)
    model = restore_model(cfg, theory, c, torch.device("cpu"), dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    lws = []
    with torch.no_grad():
        for i in range(0, draws, 256):
            links, log_q = model.gauge.sample(min(256, draws - i), gen)
            lws.append(marginal_log_weights(model, theory.action, links, log_q, phi_draws, gen))
    return float(effective_sample_size(torch.cat(lws)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=pathlib.Path)
    ap.add_argument("--label", action="append", help="one per run (default: the run directory's name)")
    ap.add_argument("--draws", type=int, default=4096)
    ap.add_argument("--phi-draws", type=int, default=0, help="joint models: also the marginal ESS with K phi per U")
    ap.add_argument("--last-only", action="store_true", help="only each run's latest checkpoint")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", type=pathlib.Path, default=pathlib.Path("ess_curve.png"))
    args = ap.parse_args()
    labels = args.label or [r.name for r in args.runs]
    if len(labels) != len(args.runs):
        raise SystemExit("give one --label per run")
    rows = []
    for run, label in zip(args.runs, labels):
        table = train_seconds(run)
        cks = sorted((run / "checkpoints").glob("step_*.h5"))
        if args.last_only:
            cks = cks[-1:]
        for ck in cks:
            step = int(ck.stem.split("_")[1])
            res = ess_of_checkpoint(ck, args.draws, args.seed)
            row = {"run": label, "step": step, "train_seconds": round(seconds_at(table, step), 1),
                   "ess": round(res["ess"], 4), "draws": res["n"]}
            if args.phi_draws:
                row[f"marginal_ess_{args.phi_draws}phi"] = round(marginal_ess(ck, args.draws, args.phi_draws,
                                                                             args.seed), 4)
            rows.append(row)
            print(", ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out.with_suffix(".csv"), "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    from gaugeflow.plots import _pyplot, _save

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for label in labels:
        mine = [r for r in rows if r["run"] == label]
        ax.plot([r["train_seconds"] / 60 for r in mine], [r["ess"] for r in mine], "o-", label=label)
    ax.set_xlabel("training wall time [min]")
    ax.set_ylabel(f"ESS ({args.draws} independent draws)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, args.out)
    print(f"wrote {args.out} and {args.out.with_suffix('.csv')}")


if __name__ == "__main__":
    main()
