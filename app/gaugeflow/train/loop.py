"""A minimal reverse-KL training loop with Adam, used by tests and benchmarks.

The configurable application trainer (checkpoints, schedules, logging) builds on the same
losses.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from gaugeflow.sampling.weights import effective_sample_size
from gaugeflow.train.losses import path_gradient, reverse_kl

LOSSES = {"reverse_kl": reverse_kl, "path_gradient": path_gradient}


@dataclass
class History:
    step: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    ess: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)


def train_reverse_kl(
    model,
    action,
    steps: int,
    batch_size: int,
    lr: float = 1e-3,
    generator: torch.Generator | None = None,
    max_time: float | None = None,
    log_every: int = 10,
    callback=None,
    loss: str = "reverse_kl",
    cosine: bool = False,
) -> History:
    """Minimise ``E_q[log q + S]``; records loss and batch ESS every ``log_every`` steps.

    ``loss`` is ``reverse_kl`` or ``path_gradient``; ``cosine`` decays the learning rate to 0.
    """
    estimator = LOSSES[loss]
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps) if cosine else None
    hist = History()
    t0 = time.monotonic()
    for step in range(1, steps + 1):
        out = estimator(model, action, batch_size, generator)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        if step % log_every == 0 or step == steps:
            hist.step.append(step)
            hist.loss.append(out.loss.item())
            hist.ess.append(effective_sample_size(-out.action - out.log_q).item())
            hist.seconds.append(time.monotonic() - t0)
            if callback is not None:
                callback(step, hist)
        if max_time is not None and time.monotonic() - t0 > max_time:
            break
    return hist
