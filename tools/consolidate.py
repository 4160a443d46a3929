#!/usr/bin/env python
"""Export a sharded checkpoint (an FSDP run's ``checkpoints/step_<8 digits>/``) as one HDF5 file
in the single-file layout (``model/``, ``optim/``, ``sched/``, ``rng/``; docs/train.md), for small
models and for tools that read weights with plain h5py.

    python tools/consolidate.py outputs/train/<run>/checkpoints/step_00001000           # -> step_00001000.h5 beside it
    python tools/consolidate.py outputs/train/<run> -o weights.h5                       # the run's latest
"""

from __future__ import annotations

import argparse
import sys

from gaugeflow.io.checkpoint import CheckpointError
from gaugeflow.io.sharded import export_consolidated, resolve_any_checkpoint


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="a step_*/ directory, or a run directory (its latest sharded checkpoint)")
    ap.add_argument("-o", "--out", help="output file (default: <step dir>.h5 beside the directory)")
    args = ap.parse_args(argv)
    try:
        path = resolve_any_checkpoint(args.checkpoint, "checkpoint")
        if not path.is_dir():
            raise CheckpointError(f"checkpoint={path}: already a single-file checkpoint")
        out = export_consolidated(path, args.out)
    except CheckpointError as err:
        print(f"error: {str(err).splitlines()[0]}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
