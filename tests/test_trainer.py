"""The trainer as a library: no Hydra, no files unless asked; accumulation, stops, non-finite steps, resume."""

import copy
import csv
import math
import pathlib
import re

import pytest
import torch

from gaugeflow.errors import Diverged
from gaugeflow.flows import models
from gaugeflow.io.checkpoint import load_checkpoint
from gaugeflow.theories import gauge_theory, phi4_theory
from gaugeflow.train import Trainer, TrainSettings
from gaugeflow.train.losses import ReverseKL
from gaugeflow.train.schedules import Cosine
from gaugeflow.train.trainer import METRICS

DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs" / "train.md"


def phi4(dtype=torch.float64, seed=0):
    theory = phi4_theory([4, 4], m2=-4.0, lam=8.0)
    torch.manual_seed(seed)
    return theory, models.affine(theory, dtype, n_layers=2, hidden=(8,))


def u1(dtype=torch.float64, seed=0):
    theory = gauge_theory([4, 4], "u1", 1.0)
    torch.manual_seed(seed)
    return theory, models.u1_equivariant(theory, dtype, n_layers=2, hidden=(4,))


def weights(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_trains_without_files_and_keeps_the_history(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    theory, model = phi4(torch.float32)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    settings = TrainSettings(steps=60, batch_size=64, log_every=10, eval_samples=256)
    trainer = Trainer(theory, model, ReverseKL(), opt, Cosine(opt, 60), settings)
    summary = trainer.run()
    assert summary["step"] == 60 and summary["stop_reason"] == "completed" and summary["checkpoint"] is None
    assert summary["eval_samples"] == 256 and math.isfinite(summary["log_z"]) and 0 < summary["ess"] <= 1
    h = trainer.history
    assert h.step == [10, 20, 30, 40, 50, 60] and len(h.loss) == len(h.ess) == len(h.seconds) == len(h.rows) == 6
    assert list(h.rows[-1]) == METRICS and trainer.last_metrics == h.rows[-1]
    assert all(b >= a for a, b in zip(h.seconds, h.seconds[1:]))
    # the free-energy bound falls from the prior's (a Gaussian against a double well)
    assert sum(h.loss[-2:]) < sum(h.loss[:2]) - 20, h.loss
    assert list(tmp_path.iterdir()) == []  # no run_dir: nothing written


@pytest.mark.parametrize("make", [phi4, u1], ids=["phi4", "u1"])
def test_accumulation_over_micro_batches_is_the_full_batch_step(make):
    # micro-batches draw the same samples as one batch: after one SGD step the weights agree
    # to float64 round-off
    theory, model = make()
    after = {}
    for micro in (None, 4, 3):
        m = copy.deepcopy(model)
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        settings = TrainSettings(steps=1, batch_size=12, micro_batch_size=micro, eval_samples=0, seed=7)
        Trainer(theory, m, ReverseKL(), opt, settings=settings).run()
        after[micro] = weights(m)
    moved = (after[None] - weights(model)).abs().max()
    assert moved > 1e-6
    for micro in (4, 3):
        assert (after[micro] - after[None]).abs().max() <= 1e-12 * after[None].abs().max()


def test_a_micro_batch_that_does_not_divide_is_a_usage_error():
    theory, model = phi4()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="train.micro_batch_size=5 must divide the per-replica batch 12"):
        Trainer(theory, model, ReverseKL(), opt, settings=TrainSettings(steps=1, batch_size=12, micro_batch_size=5))
    with pytest.raises(ValueError, match="train.steps must be >= 1"):
        TrainSettings(steps=0)


def test_runs_in_pieces_equal_one_run_bitwise():
    # stop_after ends a call; the next call continues the same streams and schedule
    def trained(pieces):
        theory, model = phi4()
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        settings = TrainSettings(steps=9, batch_size=16, log_every=1, eval_samples=0, stop_after=pieces)
        trainer = Trainer(theory, model, ReverseKL(), opt, Cosine(opt, 9), settings)
        reasons = []
        while trainer.step < 9:
            reasons.append(trainer.run()["stop_reason"])
        return weights(model), reasons, trainer.history.loss

    w_full, reasons_full, loss_full = trained(None)
    w_parts, reasons_parts, loss_parts = trained(4)
    assert reasons_full == ["completed"] and reasons_parts == ["train.stop_after", "train.stop_after", "completed"]
    assert torch.equal(w_full, w_parts) and loss_full == loss_parts


def test_consecutive_nonfinite_steps_raise_diverged():
    class NaNAfter(ReverseKL):
        calls = 0

        def __call__(self, *a, **k):
            out = super().__call__(*a, **k)
            self.calls += 1
            if self.calls in (2,) or self.calls > 4:
                out.loss = out.loss * float("nan")
            return out

    theory, model = phi4()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    trainer = Trainer(theory, model, NaNAfter(), opt,
                      settings=TrainSettings(steps=20, batch_size=8, max_nonfinite=3, log_every=1, eval_samples=0))
    with pytest.raises(Diverged, match=re.escape("training stopped at step 7: 3 consecutive steps with a non-finite "
                                                 "loss or gradient (train.max_nonfinite); last good checkpoint: none")):
        trainer.run()
    # step 2 was skipped alone and counted; the run went on
    assert [r["nonfinite_skipped"] for r in trainer.history.rows] == [0, 1, 1, 1, 2, 3]


def test_checkpoints_metrics_and_resume_from_a_run_directory(tmp_path):
    def setup(steps=8):
        theory, model = phi4()
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        settings = TrainSettings(steps=steps, batch_size=16, log_every=2, checkpoint_every=4, eval_samples=0)
        return theory, model, opt, Cosine(opt, steps), settings

    theory, model, opt, sched, settings = setup()
    Trainer(theory, model, ReverseKL(), opt, sched, settings, run_dir=tmp_path / "full").run()
    theory, model, opt, sched, settings = setup()
    settings.stop_after = 5
    summary = Trainer(theory, model, ReverseKL(), opt, sched, settings, run_dir=tmp_path / "part",
                      config="note: written by a test\n").run()
    assert summary["stop_reason"] == "train.stop_after" and summary["checkpoint"].endswith("step_00000005.h5")
    ck = load_checkpoint(tmp_path / "part")
    assert ck.step == 5 and ck.theory == theory.name and ck.config == "note: written by a test\n"
    # continue as the job does: state dicts and the sampling stream from the checkpoint
    theory, model, opt, sched, settings = setup()
    model.load_state_dict(ck.model)
    opt.load_state_dict(ck.optim)
    sched.load_state_dict(ck.sched)
    gen = torch.Generator().manual_seed(0)
    gen.set_state(ck.rng["sampler"])
    Trainer(theory, model, ReverseKL(), opt, sched, settings, generator=gen, step=ck.step, resumed=True,
            run_dir=tmp_path / "part").run()
    a, b = load_checkpoint(tmp_path / "full"), load_checkpoint(tmp_path / "part")
    assert a.step == b.step == 8 and all(torch.equal(torch.as_tensor(a.model[k]), torch.as_tensor(b.model[k]))
                                         for k in a.model)
    rows = list(csv.reader(open(tmp_path / "part" / "metrics.csv")))
    assert rows[0] == METRICS and [int(r[0]) for r in rows[1:]] == [2, 4, 6, 8]


def test_the_documented_example_runs(capsys):
    text = DOCS.read_text()
    section = text.split("## Training from Python", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    exec(compile(code, f"{DOCS}:Training from Python", "exec"), {"__name__": "docs_example"})
    out = capsys.readouterr().out
    assert "log Z" in out


def test_a_step_plan_resumed_with_more_train_steps_is_not_left_at_its_floor():
    """Resuming with a larger train.steps: a finished plan starts a new cycle (SGDR), a plan still
    running is stretched from the progress reached (its lr does not jump)."""
    from gaugeflow.train.schedules import Cosine

    def run(total, steps, state=None):
        w = torch.nn.Parameter(torch.zeros(1))
        opt = torch.optim.SGD([w], lr=1.0)
        sched = Cosine(opt, total)
        if state is not None:  # as the trainer resumes: optimizer and schedule from the checkpoint
            opt.load_state_dict(state[1])
            sched.load_state_dict(state[0])
        sched.resolve(budget=False, resumed=state is not None)
        lrs = []
        for _ in range(steps):
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        sched.opt_state = opt.state_dict()
        return sched, lrs

    def saved(sched):
        return sched.state_dict(), sched.opt_state

    done, lrs = run(3, 3)
    assert lrs[-1] > 0 and done.state_dict()["total"] == 3
    again, more = run(6, 3, saved(done))
    assert again.restarted and again.restart_reason == "steps" and more[0] == 1.0 and more == lrs
    half, first = run(6, 2)
    longer, rest = run(10, 8, saved(half))
    assert longer.replanned == (6, 10) and not longer.restarted
    # continuous at the join, monotone down to the new end
    uninterrupted = run(6, 3)[1]
    assert rest[0] == pytest.approx(uninterrupted[2], rel=1e-12)
    assert all(a > b for a, b in zip(rest, rest[1:])) and rest[-1] > 0
    # the same train.steps: the uninterrupted schedule, step for step
    same, tail = run(6, 4, saved(half))
    assert same.replanned is None and tail == pytest.approx(run(6, 6)[1][2:], rel=1e-12)
