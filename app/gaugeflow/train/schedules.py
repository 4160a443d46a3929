"""Learning-rate schedules with an optional linear warm-up, planned for ``train.steps``.

Each is built from the ``sched`` config group (``_target_`` names a class here) and wraps
torch's schedulers, so its state is a plain state dict that checkpoints store. ``step(loss)``
is called once per optimizer step; only the on-plateau schedule uses the loss.

What a schedule is planned for is its *horizon* (``sched.horizon``):

* ``steps``: ``train.steps``;
* ``time``: the steps that fit in the wall-clock budget ``train.max_time``. The trainer re-plans
  with :meth:`Schedule.plan` after every step from the measured time per step, so a cosine has
  decayed to ``min_lr`` when the budget ends (budgeted training, Li, Yumer & Ramanan,
  arXiv:1905.04753);
* ``auto`` (default): ``time`` for a fresh run given a ``train.max_time``, else ``steps``; a
  resumed run keeps the horizon it started with.

The resolved horizon and the last plan are part of the state, so a resumed run continues them.
"""

from __future__ import annotations

import math

import torch


class Schedule:
    """Base: a multiplicative factor of the base lr per step, with ``warmup_steps`` of linear ramp."""

    HORIZONS = ("auto", "steps", "time")

    def __init__(self, optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0,
                 horizon: str = "auto"):
        if warmup_steps < 0:
            raise ValueError(f"sched.warmup_steps must be >= 0, got {warmup_steps}")
        if warmup_steps >= total_steps and warmup_steps > 0:
            raise ValueError(f"sched.warmup_steps={warmup_steps} must be below train.steps={total_steps}")
        if horizon not in self.HORIZONS:
            raise ValueError(f"sched.horizon must be one of {list(self.HORIZONS)}, got {horizon!r}")
        self.total = int(total_steps)
        self.warmup = int(warmup_steps)
        self.horizon = horizon
        self.resolved = None if horizon == "auto" else horizon
        self._saved: dict = {}
        self.lambda_lr = torch.optim.lr_scheduler.LambdaLR(optimizer, self._factor)

    def resolve(self, budget: bool, resumed: bool) -> str:
        """Fix the horizon (``steps`` or ``time``) of this run; ``budget``: a train.max_time is given.

        ``auto`` is ``time`` for a fresh run with a budget and, for a resumed run, the horizon
        the run started with. A ``time`` plan stored in the state is taken up again.
        """
        h = self.horizon
        if h == "auto":
            h = (self._saved.get("horizon") or "steps") if resumed else ("time" if budget else "steps")
        if h == "time" and not budget and not resumed:
            raise ValueError("sched.horizon=time plans the schedule for train.max_time: give train.max_time")
        if h == "time" and self._saved.get("horizon") == "time" and self._saved.get("total") is not None:
            self.plan(int(self._saved["total"]))
        self.resolved = h
        return h

    def plan(self, total_steps: int) -> None:
        """Re-plan the schedule to end after ``total_steps`` steps (never inside the warm-up).

        The lr of the next step follows at once: it is recomputed from the new plan.
        """
        self.total = max(int(total_steps), self.warmup + 1)
        step = self.lambda_lr.last_epoch
        for group, base in zip(self.lambda_lr.optimizer.param_groups, self.lambda_lr.base_lrs):
            group["lr"] = base * self._factor(step)

    def _warm(self, step: int) -> float:
        # lr ramps from base/warmup to base: step 0 (the first update) already moves the weights
        return min(1.0, (step + 1) / self.warmup) if self.warmup else 1.0

    def _factor(self, step: int) -> float:
        return self._warm(step) * self.decay(max(0, step - self.warmup), max(1, self.total - self.warmup))

    def decay(self, step: int, span: int) -> float:  # noqa: ARG002
        return 1.0

    def step(self, loss: float | None = None) -> None:  # noqa: ARG002
        self.lambda_lr.step()

    def state_dict(self) -> dict:
        return {"lambda_lr": self.lambda_lr.state_dict(), "total": self.total,
                "horizon": self.resolved or "steps"}

    def load_state_dict(self, state: dict) -> None:
        self.lambda_lr.load_state_dict(state["lambda_lr"])
        # the horizon and plan of the run being resumed: taken up by resolve()
        self._saved = {"horizon": state.get("horizon"), "total": state.get("total")}


class Constant(Schedule):
    """The base learning rate after the warm-up."""


class Cosine(Schedule):
    """Cosine decay from the base lr to ``min_lr`` over the steps after warm-up (Loshchilov & Hutter 1608.03983)."""

    def __init__(self, optimizer, total_steps: int, warmup_steps: int = 0, min_lr: float = 0.0,
                 horizon: str = "auto"):
        base = optimizer.param_groups[0]["lr"]
        if not 0.0 <= min_lr <= base:
            raise ValueError(f"sched.min_lr must be in [0, train.lr={base}], got {min_lr}")
        self.floor = min_lr / base
        super().__init__(optimizer, total_steps, warmup_steps, horizon)

    def decay(self, step: int, span: int) -> float:
        return self.floor + (1.0 - self.floor) * 0.5 * (1.0 + math.cos(math.pi * min(step, span) / span))


class Step(Schedule):
    """Multiply the lr by ``gamma`` every ``step_size`` steps after warm-up."""

    def __init__(self, optimizer, total_steps: int, warmup_steps: int = 0, step_size: int = 1000,
                 gamma: float = 0.5, horizon: str = "auto"):
        if step_size < 1:
            raise ValueError(f"sched.step_size must be >= 1, got {step_size}")
        if not 0.0 < gamma <= 1.0:
            raise ValueError(f"sched.gamma must be in (0, 1], got {gamma}")
        self.step_size, self.gamma = int(step_size), float(gamma)
        super().__init__(optimizer, total_steps, warmup_steps, horizon)

    def decay(self, step: int, span: int) -> float:  # noqa: ARG002
        return self.gamma ** (step // self.step_size)


class Plateau(Schedule):
    """Reduce the lr by ``factor`` when the training loss stalls for ``patience`` steps.

    The batch loss is noisy, so it is averaged over ``window`` steps before torch's
    ``ReduceLROnPlateau`` sees it (one plateau check per window).
    """

    def __init__(self, optimizer, total_steps: int, warmup_steps: int = 0, factor: float = 0.5,
                 patience: int = 500, window: int = 50, threshold: float = 1e-4, min_lr: float = 0.0,
                 horizon: str = "auto"):
        if not 0.0 < factor < 1.0:
            raise ValueError(f"sched.factor must be in (0, 1), got {factor}")
        if window < 1 or patience < 0:
            raise ValueError(f"sched.window must be >= 1 and sched.patience >= 0, got {window}, {patience}")
        super().__init__(optimizer, total_steps, warmup_steps, horizon)
        self.window = int(window)
        self.plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="min", factor=factor, patience=max(0, patience // self.window), threshold=threshold,
            threshold_mode="abs", min_lr=min_lr)
        self.n, self.acc, self.t = 0, 0.0, 0

    def step(self, loss: float | None = None) -> None:
        self.t += 1
        if self.t <= self.warmup:
            self.lambda_lr.step()
            return
        if loss is not None and math.isfinite(loss):
            self.acc += loss
            self.n += 1
        if self.n >= self.window:
            self.plateau.step(self.acc / self.n)
            self.n, self.acc = 0, 0.0

    def state_dict(self) -> dict:
        return {**super().state_dict(), "plateau": self.plateau.state_dict(), "n": self.n, "acc": self.acc,
                "t": self.t}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.plateau.load_state_dict(state["plateau"])
        self.n, self.acc, self.t = int(state["n"]), float(state["acc"]), int(state["t"])
