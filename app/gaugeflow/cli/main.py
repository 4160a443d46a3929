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


#: ``model=<size>`` words kept from before architectures became the model group's options
MODEL_SIZES = ("default", "small")


def model_aliases(args: list[str]) -> list[str]:
    """``model=small`` and ``model=default`` (sizes of the theory's architecture) as the
    ``model_size`` group's choices; the retired ``model.kind=<x>`` is a ``ValueError`` naming
    ``model=<x>``. Everything else passes unchanged."""
    out = []
    for a in args:
        key, eq, value = a.partition("=")
        if eq and key.lstrip("+~") == "model.kind":
            raise ValueError(f"{a} is now the group choice model={value or '<name>'} (conf/model/: "
                             "affine, spline, u1_equivariant, u1_spline, u1_ncp, sun_spectral or yours)")
        if eq and key == "model" and value in MODEL_SIZES:
            a = f"model_size={value}"
        out.append(a)
    return out


#: jobs whose theory and model come from a checkpoint: their composed presets are placeholders
FROM_CHECKPOINT = ("sample", "score")


def checkpoint_overrides(args: list[str]) -> list[str]:
    """``theory.<key>=v`` and ``model.<key>=v`` as Hydra's add-or-override ``++`` form: they apply
    to the checkpoint's theory and model (a phi^4 run's ``theory.m2``, a plug-in's own keys),
    which the placeholder preset composed by Hydra may not have. Keys the builder does not take
    still fail at start-up, naming the key (gaugeflow.components)."""
    out = []
    for a in args:
        key, eq, _ = a.partition("=")
        if eq and key.split(".", 1)[0] in ("theory", "model") and "." in key and key[0] not in "+~":
            a = "++" + a
        out.append(a)
    return out


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
    try:
        args = model_aliases(argv[1:])
        if argv[0] in FROM_CHECKPOINT:
            args = checkpoint_overrides(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    # ranks other than 0 of a multi-process launch stay out of the run directory
    from gaugeflow.distributed.env import LaunchError, detect_launch, main_only_hydra_overrides

    try:
        rank = detect_launch().rank
    except LaunchError as err:
        print(f"error: {str(err).splitlines()[0]}", file=sys.stderr)
        sys.exit(2)
    # Hydra parses sys.argv itself; it names the job after argv[0]
    sys.argv = [f"gaugeflow-{job}", *args, *main_only_hydra_overrides(rank)]
    importlib.import_module(JOBS[job][0]).main()


if __name__ == "__main__":  # pragma: no cover
    main()
