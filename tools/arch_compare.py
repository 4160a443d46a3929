#!/usr/bin/env python
"""One row per trained flow: ESS, cost and the exactness checks the architectures are compared on.

For each ``gaugeflow train`` run directory (its latest checkpoint):

* ``ESS``: Kish ESS of ``--draws`` independent draws, drawn as a user draws them
  (``gaugeflow sample checkpoint=<run> sample=reweight``, float64);
* ``inverse``: the largest ``|log q(inverse pass) - log q(sampler)|`` over ``--check`` draws
  (the sampler's log q reproduced by the inverse pass, float64);
* ``gauge``: the largest change of log q under a Haar-random gauge transformation of the same
  draws (log q must be gauge invariant);
* seconds per step (median of metrics.csv), steps and training seconds, parameters, and the
  activation memory kept per configuration by a training step (saved tensors counted exactly,
  as ``tools/flow_memory.py`` does; batch 2, the training dtype).

Writes a JSON file and prints a Markdown table. Run it alone: draws time the machine too.

  python tools/arch_compare.py runs/spectral runs/residual --draws 16384 --json compare.json
"""

from __future__ import annotations

import argparse
import csv
import json
import pathlib
import statistics
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from ess_curve import ess_of_checkpoint, train_seconds
from flow_memory import step as memory_step


def architecture(cfg) -> str:
    """A short name: the builder plus the keys that select a variant."""
    m = cfg.model
    name = str(m._target_).rsplit(".", 1)[-1]
    extra = [f"{k}={m[k]}" for k, plain in (("active_loop", "plaquette"), ("context", "conv")) if k in m and m[k] != plain]
    return " ".join([name, *extra])


def checks(ck: pathlib.Path, n: int, seed: int) -> dict:
    from gaugeflow.cli.build import theory_from_config
    from gaugeflow.cli.restore import restore_model, training_dtype
    from gaugeflow.io.checkpoint import load_checkpoint
    from gaugeflow.theories.gauge import gauge_transform
    from omegaconf import OmegaConf

    c = load_checkpoint(ck)
    cfg = OmegaConf.create(c.config)
    theory = theory_from_config(cfg)
    model = restore_model(cfg, theory, c, torch.device("cpu"), dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        links, log_q = model.sample(n, gen)
        inv = (model.log_prob(links) - log_q).abs().max().item()
        omega = theory.group.random((n, *links.shape[2:-2]), gen, links.dtype)
        gauge = (model.log_prob(gauge_transform(links, omega)) - log_q).abs().max().item()
    # activation memory of one training step in the training dtype
    train_model = restore_model(cfg, theory, c, torch.device("cpu")).train()
    for p in train_model.parameters():
        p.requires_grad_(True)
    saved, _, _ = memory_step(train_model, theory, 2, seed)
    return {"architecture": architecture(cfg), "parameters": sum(p.numel() for p in model.parameters()),
            "inverse_max_abs": inv, "gauge_max_abs": gauge,
            "activation_mib_per_configuration": saved / 2 / 2.0**20,
            "dtype": str(training_dtype(c, "checkpoint")).removeprefix("torch.")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=pathlib.Path)
    ap.add_argument("--draws", type=int, default=16384)
    ap.add_argument("--check", type=int, default=64, help="draws for the inverse and gauge checks")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", type=pathlib.Path, default=None)
    args = ap.parse_args()
    rows = []
    for run in args.runs:
        ck = max((run / "checkpoints").glob("step_*.h5"), key=lambda p: int(p.stem.split("_")[1]))
        with open(run / "metrics.csv") as fh:
            per_step = [float(r["seconds_per_step"]) for r in csv.DictReader(fh)]
        seconds = train_seconds(run)
        row = {"run": str(run), "step": int(ck.stem.split("_")[1]), "train_seconds": round(seconds[max(seconds)], 1),
               "seconds_per_step": statistics.median(per_step), **checks(ck, args.check, args.seed)}
        res = ess_of_checkpoint(ck, args.draws, args.seed)
        row.update(ess=res["ess"], draws=res["n"])
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("\n| run | architecture | steps | s/step | parameters | activations MiB/config | ESS (draws) "
          "| inverse max abs diff of log q | gauge max abs diff of log q |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {pathlib.Path(r['run']).name} | {r['architecture']} | {r['step']} | {r['seconds_per_step']:.3f} "
              f"| {r['parameters']:,} | {r['activation_mib_per_configuration']:.2f} | {r['ess']:.3f} ({r['draws']}) "
              f"| {r['inverse_max_abs']:.1e} | {r['gauge_max_abs']:.1e} |")
    if args.json:
        tmp = args.json.with_suffix(".tmp")
        tmp.write_text(json.dumps(rows, indent=1))
        tmp.replace(args.json)


if __name__ == "__main__":
    main()
