"""``gaugeflow <job> [key=value ...]``: the first word picks the job, the rest goes to Hydra."""

from __future__ import annotations

import importlib
import sys

JOBS = {
    "train": ("gaugeflow.cli.train", "fit a normalizing flow to a theory (checkpoints, resume)"),
    "hmc": ("gaugeflow.cli.hmc", "generate an ensemble with Hybrid Monte Carlo"),
    "sample": ("gaugeflow.cli.sample", "draw an ensemble from a trained flow (IMH chain or reweighting)"),
    "score": ("gaugeflow.cli.score", "evaluate a trained flow's log q on an existing ensemble"),
    "analyze": ("gaugeflow.cli.analyze", "estimates with Gamma-method errors and plots of an ensemble or training run"),
}

USAGE = "usage: gaugeflow <job> [key=value ...] [group=option ...] [--help]\n\njobs:\n" + "\n".join(
    f"  {name:<10} {doc}" for name, (_, doc) in JOBS.items()
) + "\n\n`gaugeflow <job> --help` lists the job's config groups and keys; `--cfg job` prints the composed config."


def main(argv: list[str] | None = None) -> None:
    # first of all: an older torch (an HPC module's, say) ends here with one line, before Hydra,
    # the launch detection or any job imports what that torch lacks
    from gaugeflow.requirements import require_torch

    require_torch()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        sys.exit(0 if argv else 2)
    if argv[0] in ("-V", "--version"):
        import torch

        from gaugeflow import __version__

        print(f"gaugeflow {__version__} (torch {torch.__version__})")
        sys.exit(0)
    job = argv[0]
    if job not in JOBS:
        print(f"gaugeflow: unknown job {job!r}; choose one of {', '.join(JOBS)}", file=sys.stderr)
        sys.exit(2)
    # ranks other than 0 of a multi-process launch stay out of the run directory
    from gaugeflow.distributed.env import LaunchError, detect_launch, main_only_hydra_overrides

    try:
        rank = detect_launch().rank
    except LaunchError as err:
        print(f"error: {str(err).splitlines()[0]}", file=sys.stderr)
        sys.exit(2)
    # Hydra parses sys.argv itself; it names the job after argv[0]
    sys.argv = [f"gaugeflow-{job}", *argv[1:], *main_only_hydra_overrides(rank)]
    importlib.import_module(JOBS[job][0]).main()


if __name__ == "__main__":  # pragma: no cover
    main()
