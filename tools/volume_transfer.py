#!/usr/bin/env python
"""Volume transfer: a flow trained on one lattice, applied with the same weights on larger ones.

A translation-equivariant flow is a local map, so it applies unchanged on any lattice whose
extents the masks allow. If its errors were independent from region to region, the
importance weights of a lattice V times V0 would multiply, and the ESS would fall as
``ESS(V) ~ ESS(V0)^(V/V0)`` (a heuristic, exact for independent blocks). This tool measures
ESS(V) for each shape with the jobs a user runs:

* ``gaugeflow sample checkpoint=<run> lattice.shape=[...] sample=reweight`` (independent draws;
  the file's ``ess`` attribute), at the trained shape and at every ``--shapes`` entry;
* with ``--finetune-steps K``, ``gaugeflow train init_from=<run> lattice.shape=[...]
  train.steps=K`` on each larger shape, then the same sampling of the fine-tuned run,

and writes ``volume_transfer.json`` and ``volume_transfer.png`` (ESS against V, with the
prediction from the trained shape) into ``--out``. Example::

    python tools/volume_transfer.py outputs/train/2026-12-07/12-00-00 --shapes 16,16 32,32 \\
        --draws 4096 --finetune-steps 200 --out transfer
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import subprocess
import sys

import h5py
import yaml


def _shape(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def _gaugeflow(*args: str, cwd: pathlib.Path) -> None:
    r = subprocess.run([sys.executable, "-m", "gaugeflow.cli.main", *args], cwd=cwd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"volume_transfer: gaugeflow {' '.join(args[:2])} failed: {r.stderr.strip().splitlines()[-1:]}")


def trained_shape(run: pathlib.Path) -> list[int]:
    from gaugeflow.cli.restore import load_any_checkpoint

    ck = load_any_checkpoint(str(run), "run", sections=())
    return [int(x) for x in yaml.safe_load(ck.config)["lattice"]["shape"]]


def ess_at(run: pathlib.Path, shape: list[int], draws: int, batch: int, seed: int, out: pathlib.Path,
           tag: str, extra: tuple[str, ...] = ()) -> dict:
    f = out / f"{tag}_{'x'.join(map(str, shape))}.h5"
    _gaugeflow("sample", f"checkpoint={run}", "sample=reweight", f"sample.n={draws}", f"sample.batch_size={batch}",
               f"lattice.shape=[{','.join(map(str, shape))}]", f"seed={seed}", f"out={f}", "sample.progress=false",
               f"hydra.run.dir={out / ('run_' + f.stem)}", *extra, cwd=out)
    with h5py.File(f) as h:
        return {"shape": shape, "volume": math.prod(shape), "ess": float(h.attrs["ess"]), "draws": draws,
                "khat": float(h.attrs.get("khat", float("nan")))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a training run directory or checkpoint")
    p.add_argument("--shapes", type=_shape, nargs="+", required=True, help="larger lattices, e.g. 16,16 32,32")
    p.add_argument("--draws", type=int, default=4096)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--finetune-steps", type=int, default=0, help="steps of init_from= training per shape (0: none)")
    p.add_argument("--finetune-args", nargs="*", default=[], help="more train overrides for the fine-tuning")
    p.add_argument("--allow-targets", nargs="*", default=[], help="packages of a plug-in's _target_s")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="volume_transfer")
    args = p.parse_args()
    run = pathlib.Path(args.run).resolve()
    out = pathlib.Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    extra = (f"allow_targets=[{','.join(args.allow_targets)}]",) if args.allow_targets else ()

    v0 = trained_shape(run)
    base = ess_at(run, v0, args.draws, args.batch, args.seed, out, "trained", extra)
    rows = [dict(base, transferred=True, predicted=base["ess"])]
    print(f"trained {v0}: ESS {base['ess']:.4f}")
    for shape in args.shapes:
        r = ess_at(run, shape, args.draws, args.batch, args.seed, out, "transfer", extra)
        r.update(transferred=True, predicted=base["ess"] ** (r["volume"] / base["volume"]))
        rows.append(r)
        line = f"transfer {shape}: ESS {r['ess']:.4f}  (ESS(V0)^(V/V0) = {r['predicted']:.4f})"
        if args.finetune_steps:
            tuned = out / f"finetune_{'x'.join(map(str, shape))}"
            _gaugeflow("train", f"init_from={run}", f"lattice.shape=[{','.join(map(str, shape))}]",
                       f"train.steps={args.finetune_steps}", "train.progress=false", f"seed={args.seed}",
                       f"hydra.run.dir={tuned}", *extra, *args.finetune_args, cwd=out)
            t = ess_at(tuned, shape, args.draws, args.batch, args.seed + 1, out, "finetuned", extra)
            t.update(transferred=False, finetune_steps=args.finetune_steps)
            rows.append(t)
            line += f"; after {args.finetune_steps} fine-tuning steps: ESS {t['ess']:.4f}"
        print(line)
    (out / "volume_transfer.json").write_text(json.dumps({"run": str(run), "rows": rows}, indent=1))
    plot(rows, out / "volume_transfer.png")
    print(f"wrote {out / 'volume_transfer.json'} and {out / 'volume_transfer.png'}")


def plot(rows: list[dict], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    t = [r for r in rows if r["transferred"]]
    v0, e0 = t[0]["volume"], t[0]["ess"]
    vs = sorted({r["volume"] for r in rows})
    ax.plot(vs, [e0 ** (v / v0) for v in vs], "k--", label="ESS(V0)^(V/V0)")
    ax.plot([r["volume"] for r in t], [r["ess"] for r in t], "o-", label="same weights")
    f = [r for r in rows if not r["transferred"]]
    if f:
        ax.plot([r["volume"] for r in f], [r["ess"] for r in f], "s", label=f"fine-tuned ({f[0]['finetune_steps']} steps)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("lattice volume V")
    ax.set_ylabel("ESS")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
