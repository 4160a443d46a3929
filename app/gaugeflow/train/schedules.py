"""Learning-rate schedules with an optional linear warm-up, planned for a horizon.

Each is built from the ``sched`` config group (``_target_`` names a class here) and wraps
torch's schedulers, so its state is a plain state dict that checkpoints store. ``step(loss)``
is called once per optimizer step; only the on-plateau schedule uses the loss.

What a schedule is planned for is its *horizon* (``sched.horizon``):

* ``steps``: ``train.steps``;
* ``time``: the steps that fit in this invocation's wall-clock budget ``train.max_time``. The
  trainer re-plans with :meth:`Schedule.plan` after every step from the measured time per step,
  so a cosine has decayed to ``min_lr`` when the budget ends (budgeted training, Li, Yumer &
  Ramanan, arXiv:1905.04753);
* ``auto`` (default): ``time`` for a fresh run given a ``train.max_time``, else ``steps``; a
  resumed run keeps the horizon it started with.

A schedule is a function of the *progress* through its cycle, 0 at the start (after warm-up)
and 1 at the planned end. Re-planning keeps the progress reached and stretches the rest over the
new end, so the lr never jumps. A ``train.max_time`` stop ends a time plan (:meth:`end_plan`);
resuming such a run starts a new cycle, a warm restart from ``sched.restart_lr`` (SGDR,
Loshchilov & Hutter 1608.03983) over the new invocation's budget (:meth:`resolve`). A time plan
stopped early (SIGTERM, ``train.stop_after``) continues from where it was. A step-planned
schedule resumed after any stop is the uninterrupted schedule, step for step.
"""

from __future__ import annotations

import math

import torch


def _base_lr(optimizer: torch.optim.Optimizer) -> float:
    # an optimizer restored from a state dict carries its current lr; the base is initial_lr
    group = optimizer.param_groups[0]
    return float(group.get("initial_lr", group["lr"]))


class Schedule:
    """Base: a multiplicative factor of the base lr per step, with ``warmup_steps`` of linear ramp."""

    HORIZONS = ("auto", "steps", "time")

    def __init__(self, optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0,
                 horizon: str = "auto", restart_lr: float | None = None):
        if warmup_steps < 0:
            raise ValueError(f"sched.warmup_steps must be >= 0, got {warmup_steps}")
        if warmup_steps >= total_steps and warmup_steps > 0:
            raise ValueError(f"sched.warmup_steps={warmup_steps} must be below train.steps={total_steps}")
        if horizon not in self.HORIZONS:
            raise ValueError(f"sched.horizon must be one of {list(self.HORIZONS)}, got {horizon!r}")
        if restart_lr is not None and not restart_lr > 0:
            raise ValueError(f"sched.restart_lr must be > 0, got {restart_lr}")
        self.base_lr = _base_lr(optimizer)
        self.steps = int(total_steps)  # train.steps
        self.total = int(total_steps)  # the planned end of the current cycle
        self.warmup = int(warmup_steps)
        self.horizon = horizon
        self.restart_lr = restart_lr
        self.resolved = None if horizon == "auto" else horizon
        # the current cycle: starts at ``cycle_start`` with lr ``scale`` x base; its progress is
        # ``anchor_p`` at step ``anchor`` and grows linearly to 1 at ``total``
        self.cycle_start, self.anchor, self.anchor_p, self.scale = 0, self.warmup, 0.0, 1.0
        self.ended = False  # a train.max_time stop ended the time plan
        self.restarts = 0
        self.restarted = False  # this invocation started a new cycle (see resolve)
        self.replanned = None  # (old end, new end) when a resumed step plan was re-planned for train.steps
        self.restart_reason = None  # why this invocation restarted: "time" (plan ended) or "steps" (raised)
        self._saved: dict = {}
        self.lambda_lr = torch.optim.lr_scheduler.LambdaLR(optimizer, self._factor)

    # -- planning ---------------------------------------------------------------------------
    def resolve(self, budget: bool, resumed: bool) -> str:
        """Fix this invocation's horizon (``steps`` or ``time``); ``budget``: a train.max_time is given.

        ``auto`` is ``time`` for a fresh run with a budget and, for a resumed run, the horizon the
        run started with. A resumed run whose time plan ended starts a new cycle (see
        :attr:`restarted`); one stopped inside its time plan continues it, planned over this
        invocation's budget, or without one over the remaining ``train.steps``.
        """
        saved = self._saved.get("horizon")
        h = self.horizon
        if h == "auto":
            h = (saved or "steps") if resumed else ("time" if budget else "steps")
        if h == "time" and not budget and not resumed:
            raise ValueError("sched.horizon=time plans the schedule for train.max_time: give train.max_time")
        self.restarted, self.replanned = False, None
        step = self.lambda_lr.last_epoch
        steps_plan = resumed and (saved or "steps") == "steps" and h == "steps"
        self.restart_reason = "time" if self.ended else None
        if steps_plan and self.steps > self.total and step >= self.total:
            # a step plan that ran to its end, resumed with a larger train.steps: without a new
            # cycle the added steps would train at the floor lr
            self.ended, self.restart_reason = True, "steps"
        if resumed and self.ended:
            # the plan ended with the previous invocation's budget: a warm restart
            self.cycle_start, self.anchor, self.anchor_p = step, step, 0.0
            self.scale = (self.restart_lr if self.restart_lr is not None else self.base_lr) / self.base_lr
            self.ended, self.restarted = False, True
            self.restarts += 1
            self.total = max(self.steps, step + 1)
            self._check_scale()
            self._apply(step)
        elif resumed and saved == "time":
            # inside its plan: the next step takes the lr the plan gives it; the rest of the cycle
            # is stretched over this invocation's budget (re-planned once steps are timed) or over
            # the remaining train.steps
            self.plan(self.total if budget else self.steps)
        elif steps_plan and self.steps != self.total:
            # train.steps changed inside the plan: the rest of the cycle is stretched (or squeezed)
            # over the new train.steps, from the progress reached (the lr does not jump)
            self.replanned = (self.total, self.steps)
            self.plan(self.steps)
        self.resolved = "time" if (h == "time" and budget) else "steps"
        return self.resolved

    def plan(self, total_steps: int) -> None:
        """Re-plan the current cycle to end after ``total_steps`` steps (never inside the warm-up).

        The progress reached so far is kept; the lr of the next step follows from the new plan.
        """
        step = self.lambda_lr.last_epoch
        if step > self.anchor:
            self.anchor_p, self.anchor = self._progress(step), step
        self.total = max(int(total_steps), self.anchor + 1)
        self._apply(step)

    def end_plan(self) -> None:
        """A train.max_time stop: this time plan is over (a resumed run starts a new cycle)."""
        if self.resolved == "time":
            self.ended = True

    def _check_scale(self) -> None:
        pass

    def _apply(self, step: int) -> None:
        for group, base in zip(self.lambda_lr.optimizer.param_groups, self.lambda_lr.base_lrs):
            group["lr"] = base * self._factor(step)

    # -- the factor ---------------------------------------------------------------------------
    def _progress(self, step: int) -> float:
        if step <= self.anchor:
            return self.anchor_p
        frac = min(1.0, (step - self.anchor) / max(1, self.total - self.anchor))
        return self.anchor_p + (1.0 - self.anchor_p) * frac

    def _warm(self, step: int) -> float:
        # lr ramps from base/warmup to base: step 0 (the first update) already moves the weights
        # (only the first cycle warms up; a restart jumps to its lr)
        return min(1.0, (step + 1) / self.warmup) if self.warmup and self.cycle_start == 0 else 1.0

    def _factor(self, step: int) -> float:
        first = self.warmup if self.cycle_start == 0 else 0
        return self._warm(step) * self.decay(self._progress(step), max(0, step - self.cycle_start - first))

    def decay(self, progress: float, steps: int) -> float:  # noqa: ARG002
        """The lr factor at ``progress`` in [0, 1] of the cycle, ``steps`` after its start (warm-up excluded)."""
        return self.scale

    def step(self, loss: float | None = None) -> None:  # noqa: ARG002
        self.lambda_lr.step()

    # -- state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"lambda_lr": self.lambda_lr.state_dict(), "total": self.total,
                "horizon": self.resolved or "steps", "cycle_start": self.cycle_start, "anchor": self.anchor,
                "anchor_p": self.anchor_p, "scale": self.scale, "ended": int(self.ended),
                "restarts": self.restarts}

    def load_state_dict(self, state: dict) -> None:
        self.lambda_lr.load_state_dict(state["lambda_lr"])
        self._saved = {"horizon": state.get("horizon"), "total": state.get("total")}
        if state.get("total") is not None:
            self.total = int(state["total"])
        # checkpoints written before cycles existed: one cycle from the warm-up on
        self.cycle_start = int(state.get("cycle_start", 0))
        self.anchor = int(state.get("anchor", self.warmup))
        self.anchor_p = float(state.get("anchor_p", 0.0))
        self.scale = float(state.get("scale", 1.0))
        self.ended = bool(int(state.get("ended", 0)))
        self.restarts = int(state.get("restarts", 0))


class Constant(Schedule):
    """The base learning rate after the warm-up."""


class Cosine(Schedule):
    """Cosine decay from the base lr to ``min_lr`` over the steps after warm-up (Loshchilov & Hutter 1608.03983)."""

    def __init__(self, optimizer, total_steps: int, warmup_steps: int = 0, min_lr: float = 0.0,
                 horizon: str = "auto", restart_lr: float | None = None):
        base = _base_lr(optimizer)
        if not 0.0 <= min_lr <= base:
            raise ValueError(f"sched.min_lr must be in [0, train.lr={base}], got {min_lr}")
        self.floor = min_lr / base
        super().__init__(optimizer, total_steps, warmup_steps, horizon, restart_lr)

    def _check_scale(self) -> None:
        if self.scale < self.floor:
            raise ValueError(f"sched.restart_lr={self.scale * self.base_lr} must be >= sched.min_lr="
                             f"{self.floor * self.base_lr}")

    def decay(self, progress: float, steps: int) -> float:  # noqa: ARG002
        return self.floor + (self.scale - self.floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


class Step(Schedule):
    """Multiply the lr by ``gamma`` every ``step_size`` steps after warm-up."""

    def __init__(self, optimizer, total_steps: int, warmup_steps: int = 0, step_size: int = 1000,
                 gamma: float = 0.5, horizon: str = "auto", restart_lr: float | None = None):
        if step_size < 1:
            raise ValueError(f"sched.step_size must be >= 1, got {step_size}")
        if not 0.0 < gamma <= 1.0:
            raise ValueError(f"sched.gamma must be in (0, 1], got {gamma}")
        self.step_size, self.gamma = int(step_size), float(gamma)
        super().__init__(optimizer, total_steps, warmup_steps, horizon, restart_lr)

    def decay(self, progress: float, steps: int) -> float:  # noqa: ARG002
        return self.scale * self.gamma ** (steps // self.step_size)


class Plateau(Schedule):
    """Reduce the lr by ``factor`` when the training loss stalls for ``patience`` steps.

    The batch loss is noisy, so it is averaged over ``window`` steps before torch's
    ``ReduceLROnPlateau`` sees it (one plateau check per window).
    """

    def __init__(self, optimizer, total_steps: int, warmup_steps: int = 0, factor: float = 0.5,
                 patience: int = 500, window: int = 50, threshold: float = 1e-4, min_lr: float = 0.0,
                 horizon: str = "auto", restart_lr: float | None = None):
        if not 0.0 < factor < 1.0:
            raise ValueError(f"sched.factor must be in (0, 1), got {factor}")
        if window < 1 or patience < 0:
            raise ValueError(f"sched.window must be >= 1 and sched.patience >= 0, got {window}, {patience}")
        super().__init__(optimizer, total_steps, warmup_steps, horizon, restart_lr)
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
