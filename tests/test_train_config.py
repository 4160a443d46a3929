"""Training components built from the config groups: losses, optimizers, schedules, accumulation."""

import math

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException

import gaugeflow.cli.train  # noqa: F401  (registers the train job's config schema)
from gaugeflow.cli.common import CONFIG_DIR, UsageError
from gaugeflow.components import instantiate_node
from gaugeflow.flows import models
from helpers import theory_flow
from gaugeflow.components import build_theory
from gaugeflow.train import losses, schedules
from gaugeflow.train.trainer import accumulated_step


def composed(*overrides):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("train", overrides=list(overrides))


def params():
    return [torch.nn.Parameter(torch.zeros(3))]


@pytest.mark.parametrize("option, cls, extra", [
    ("adam", torch.optim.Adam, {"betas": (0.9, 0.999)}),
    ("adamw", torch.optim.AdamW, {"weight_decay": 0.01}),
    ("sgd", torch.optim.SGD, {"momentum": 0.9, "nesterov": False}),
])
def test_optimizers_from_config(option, cls, extra):
    cfg = composed(f"optim={option}", "train.lr=0.02")
    opt = instantiate_node(cfg.optim, "optim", params=params(), lr=cfg.train.lr)
    assert type(opt) is cls and opt.param_groups[0]["lr"] == 0.02
    for k, v in extra.items():
        assert opt.param_groups[0][k] == v


@pytest.mark.parametrize("option, cls", [("cosine", schedules.Cosine), ("constant", schedules.Constant),
                                         ("step", schedules.Step), ("plateau", schedules.Plateau)])
def test_schedules_from_config(option, cls):
    cfg = composed(f"sched={option}", "sched.warmup_steps=5")
    opt = torch.optim.SGD(params(), lr=1.0)
    s = instantiate_node(cfg.sched, "sched", optimizer=opt, total_steps=100)
    assert type(s) is cls and s.warmup == 5
    assert opt.param_groups[0]["lr"] == pytest.approx(1 / 5)  # the warm-up ramp starts at base / warmup


@pytest.mark.parametrize("option, cls", [("reverse_kl", losses.ReverseKL), ("path_gradient", losses.PathGradient),
                                         ("reinforce", losses.Reinforce), ("forward_kl", losses.ForwardKL)])
def test_losses_from_config(option, cls):
    extra = ["loss.ensemble=some.h5"] if option == "forward_kl" else []
    cfg = composed(f"loss={option}", *extra)
    assert type(instantiate_node(cfg.loss, "loss")) is cls


def test_bad_components_are_one_line_usage_errors():
    with pytest.raises(UsageError, match=r"loss.ensemble must name an ensemble file"):
        instantiate_node(composed("loss=forward_kl").loss, "loss")
    opt = torch.optim.SGD(params(), lr=1.0)
    with pytest.raises(UsageError, match=r"sched.min_lr must be in \[0, train.lr=1.0\], got 2.0"):
        instantiate_node(composed("sched.min_lr=2.0").sched, "sched", optimizer=opt, total_steps=10)
    with pytest.raises(UsageError, match=r"optim._target_='torch.optim.Nope' cannot be imported"):
        instantiate_node(composed("optim._target_=torch.optim.Nope").optim, "optim", params=params(), lr=1.0)
    with pytest.raises(UsageError, match=r"optim.momentum is not a key of optim=adam \(torch.optim.Adam\)"):
        instantiate_node(composed("+optim.momentum=0.5").optim, "optim", params=params(), lr=1.0)


def test_misspelt_keys_fail_at_composition():
    for bad in ("optim.betaz=[0.9,0.9]", "sched.warmup=3", "train.stepz=3", "loss.ensembel=x.h5"):
        with pytest.raises(ConfigCompositionException):
            composed(bad)


def test_experiment_presets_compose():
    for name, theory, shape in [("kanwar2020_u1", "u1_2d", [16, 16]), ("boyda2020_su3", "su3_2d", [8, 8]),
                                ("su3_4d_4444", "su3_4d", [4, 4, 4, 4])]:
        cfg = composed(f"experiment={name}")
        assert cfg.theory.name == theory and list(cfg.lattice.shape) == shape
    # a command-line override applies on top of the preset
    assert composed("experiment=su3_4d_4444", "theory.beta=2.5").theory.beta == 2.5


def lr_curve(sched_cls, n, **kw):
    opt = torch.optim.SGD(params(), lr=1.0)
    s = sched_cls(opt, n, **kw)
    out = []
    for _ in range(n):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        s.step(1.0)
    return out


def test_schedule_shapes():
    w = lr_curve(schedules.Cosine, 20, warmup_steps=4, min_lr=0.1)
    assert w[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    # after the warm-up: cosine from 1 down towards min_lr over the remaining 16 steps
    assert w[4:] == pytest.approx([0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * k / 16)) for k in range(16)])
    assert lr_curve(schedules.Step, 9, step_size=3, gamma=0.1) == pytest.approx([1, 1, 1, .1, .1, .1, .01, .01, .01])
    assert lr_curve(schedules.Constant, 5) == [1.0] * 5


def test_plateau_reduces_on_a_stalled_loss_only():
    opt = torch.optim.SGD(params(), lr=1.0)
    s = schedules.Plateau(opt, 1000, factor=0.5, patience=20, window=10)
    for i in range(200):  # steadily falling loss: no reduction
        s.step(-float(i))
    assert opt.param_groups[0]["lr"] == 1.0
    for _ in range(40):  # flat: the mean over each window stops improving
        s.step(-300.0)
    assert opt.param_groups[0]["lr"] == 0.5


@pytest.mark.parametrize("cls, kw", [(schedules.Cosine, {"warmup_steps": 3}), (schedules.Plateau, {"patience": 4,
                                                                                                    "window": 2})])
def test_schedule_state_round_trip(cls, kw):
    # a schedule restored from its state dict continues exactly like the original
    losses_ = [1.0, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9] * 3
    ref_opt = torch.optim.SGD(params(), lr=1.0)
    ref = cls(ref_opt, 24, **kw)
    for x in losses_[:10]:
        ref_opt.step()
        ref.step(x)
    opt = torch.optim.SGD(params(), lr=1.0)
    s = cls(opt, 24, **kw)
    opt.load_state_dict(ref_opt.state_dict())
    s.load_state_dict(ref.state_dict())
    for x in losses_[10:]:
        ref_opt.step()
        opt.step()
        ref.step(x)
        s.step(x)
        assert opt.param_groups[0]["lr"] == ref_opt.param_groups[0]["lr"]


@pytest.mark.parametrize("name, kind", [("u1_2d", "gauge"), ("phi4_2d", "phi4")])
def test_gradient_accumulation_equals_the_full_batch(name, kind):
    """Micro-batches draw the same samples as one batch, so gradients agree to float64 round-off."""
    cfg = dict(name=name, kind=kind, group="u1", dim=2, beta=1.5, m2=-4.0, lam=8.0)
    theory = build_theory(cfg, [4, 4])
    torch.manual_seed(0)
    model = theory_flow(theory, n_layers=4 if kind == "gauge" else 2, hidden=(8,), dtype=torch.float64)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    grads = {}
    for micro in (12, 4, 3):
        gen = torch.Generator().manual_seed(7)
        out, norm = accumulated_step(model, opt, losses.ReverseKL(), theory.action, 12, micro, gen, None)
        grads[micro] = (torch.cat([p.grad.flatten() for p in model.parameters()]), out.loss, norm)
    g, loss, norm = grads[12]
    assert norm > 0
    for micro in (4, 3):
        gm, lm, nm = grads[micro]
        scale = g.abs().max()
        assert (gm - g).abs().max() <= 1e-12 * scale
        assert abs(lm - loss) <= 1e-12 * abs(loss) and abs(nm - norm) <= 1e-12 * norm


def test_forward_kl_fits_a_known_gaussian():
    """Forward KL from exact samples of a Gaussian target learns its width: the affine flow
    with a zero-initialised coupling can represent N(0, s^2) exactly."""
    theory = build_theory(dict(name="phi4_2d", _target_="gaugeflow.theories.phi4_theory", dim=2, m2=1.0, lam=0.0), [2, 2])
    torch.manual_seed(1)
    model = models.affine(theory, n_layers=2, hidden=(4,), zero_init=True, dtype=torch.float64)
    n = 4096
    loss = losses.ForwardKL.from_tensor(
        0.5 * torch.randn(n, 2, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64))
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(3)
    first = None
    for _ in range(150):
        out, _ = accumulated_step(model, opt, loss, None, 256, 256, gen, None)
        opt.step()
        first = first if first is not None else out.loss.item()
    # exact E_p[-log q] at q = p: the entropy of 4 independent N(0, 1/4) = 4 * (0.5 log(2 pi e / 4))
    exact = 4 * 0.5 * math.log(2 * math.pi * math.e * 0.25)
    with torch.no_grad():
        final = -model.log_prob(loss.data).mean().item()
    # -log q at q = p has variance 4 * 1/2 per sample: 4 sigma of the n-sample mean
    assert first > exact + 0.5 and abs(final - exact) < 4 * math.sqrt(2 / n)


def _cosine_at(p):
    return 0.5 * (1 + math.cos(math.pi * p))


def test_time_horizon_replans_the_cosine_and_survives_a_round_trip():
    # planned for 10**6 steps, re-planned to 20 after 4: the lr does not jump, the progress
    # reached is kept and the rest of the cosine is stretched over steps 4..20; a schedule
    # restored from the state (a resume with a budget) keeps the plan
    opt = torch.optim.SGD(params(), lr=1.0)
    s = schedules.Cosine(opt, 10**6, horizon="time")
    for _ in range(4):
        opt.step()
        s.step()
    before = opt.param_groups[0]["lr"]
    s.plan(20)
    assert opt.param_groups[0]["lr"] == before == _cosine_at(4 / 10**6)
    state = s.state_dict()
    opt2 = torch.optim.SGD(params(), lr=1.0)
    s2 = schedules.Cosine(opt2, 10**6, horizon="time")
    s2.load_state_dict(state)
    assert s2.resolve(budget=True, resumed=True) == "time"
    p4 = 4 / 10**6
    for k in range(5, 22):
        opt.step()
        s.step()
        s2.step()
        want = _cosine_at(min(1.0, p4 + (1 - p4) * (k - 4) / 16))
        assert opt.param_groups[0]["lr"] == pytest.approx(want, abs=1e-12)
        assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    assert opt.param_groups[0]["lr"] == 0.0  # the floor when the plan ends
    # a plan never ends inside the warm-up
    w = schedules.Cosine(torch.optim.SGD(params(), lr=1.0), 100, warmup_steps=10, horizon="time")
    w.plan(3)
    assert w.total == 11
    with pytest.raises(ValueError, match="sched.horizon must be one of"):
        schedules.Cosine(torch.optim.SGD(params(), lr=1.0), 10, horizon="walltime")


def test_auto_horizon_resolves_from_the_budget_and_a_resumed_run_keeps_its_plan():
    def sched(h="auto", steps=10**6):
        return schedules.Cosine(torch.optim.SGD(params(), lr=1.0), steps, horizon=h)

    assert sched().resolve(budget=True, resumed=False) == "time"
    assert sched().resolve(budget=False, resumed=False) == "steps"
    assert sched("steps").resolve(budget=True, resumed=False) == "steps"
    with pytest.raises(ValueError, match="sched.horizon=time plans the schedule for train.max_time"):
        sched("time").resolve(budget=False, resumed=False)
    first = sched()
    first.resolve(budget=True, resumed=False)
    first.plan(40)
    state = first.state_dict()
    assert state["horizon"] == "time" and state["total"] == 40 and state["ended"] == 0
    again = sched()
    again.load_state_dict(state)
    assert again.resolve(budget=True, resumed=True) == "time" and again.total == 40
    # resumed without a budget: the rest of the plan stretches over the remaining train.steps
    nobudget = sched(steps=100)
    nobudget.load_state_dict(state)
    assert nobudget.resolve(budget=False, resumed=True) == "steps" and nobudget.total == 100
    steps_run = sched()
    steps_run.resolve(budget=False, resumed=False)
    later = sched()
    later.load_state_dict(steps_run.state_dict())
    assert later.resolve(budget=True, resumed=True) == "steps" and later.total == 10**6


def _run(s, opt, n):
    lrs = []
    for _ in range(n):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        s.step()
    return lrs


@pytest.mark.parametrize("restart_lr", [None, 0.25])
def test_a_time_plan_ended_by_max_time_restarts_a_new_cycle(restart_lr):
    opt = torch.optim.SGD(params(), lr=1.0)
    s = schedules.Cosine(opt, 10**6, horizon="auto", min_lr=0.01)
    s.resolve(budget=True, resumed=False)
    s.plan(10)
    _run(s, opt, 10)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01)  # the floor: the plan is spent
    s.end_plan()  # the trainer's train.max_time stop
    state, ostate = s.state_dict(), opt.state_dict()
    assert state["ended"] == 1
    opt2 = torch.optim.SGD(params(), lr=1.0)
    opt2.load_state_dict(ostate)
    s2 = schedules.Cosine(opt2, 10**6, min_lr=0.01, restart_lr=restart_lr)
    s2.load_state_dict(state)
    assert s2.resolve(budget=True, resumed=True) == "time" and s2.restarted
    start = 1.0 if restart_lr is None else restart_lr
    s2.plan(20)  # the new invocation's budget: 10 more steps
    lrs = _run(s2, opt2, 10)
    assert lrs[0] == pytest.approx(start)  # the first resumed step trains at the restart lr
    assert lrs == sorted(lrs, reverse=True) and opt2.param_groups[0]["lr"] == pytest.approx(0.01)
    assert s2.state_dict()["restarts"] == 1
    # without a budget, the new cycle spans the remaining train.steps
    s3 = schedules.Cosine(torch.optim.SGD(params(), lr=1.0), 30, min_lr=0.01)
    s3.load_state_dict(state)
    assert s3.resolve(budget=False, resumed=True) == "steps" and s3.restarted and s3.total == 30
    with pytest.raises(ValueError, match="sched.restart_lr"):
        bad = schedules.Cosine(torch.optim.SGD(params(), lr=1.0), 30, min_lr=0.01, restart_lr=0.001)
        bad.load_state_dict(state)
        bad.resolve(budget=False, resumed=True)


def test_a_time_plan_stopped_early_continues_with_the_lr_it_gives():
    # SIGTERM or stop_after inside a time plan: the first resumed step takes the lr the plan gives
    # it, and the rest of the plan is stretched over the new budget from there
    opt = torch.optim.SGD(params(), lr=1.0)
    s = schedules.Cosine(opt, 10**6)
    s.resolve(budget=True, resumed=False)
    s.plan(20)
    _run(s, opt, 8)
    expected = opt.param_groups[0]["lr"]  # what step 8 would train with
    state, ostate = s.state_dict(), opt.state_dict()
    opt2 = torch.optim.SGD(params(), lr=1.0)
    opt2.load_state_dict(ostate)
    s2 = schedules.Cosine(opt2, 10**6)
    s2.load_state_dict(state)
    assert s2.resolve(budget=True, resumed=True) == "time" and not s2.restarted
    assert opt2.param_groups[0]["lr"] == expected
    s2.plan(40)  # more time this invocation: a slower decay from the same point
    lrs = _run(s2, opt2, 32)
    assert lrs[0] == expected and lrs[-1] > 0 and opt2.param_groups[0]["lr"] == 0.0


def test_the_theory_chooses_the_default_batch_and_context_nets():
    from helpers import theory_flow
    from gaugeflow.components import build_theory

    # u1_2d trains with Kanwar et al.'s [8, 8] nets and batch 256 (the 10-minute beta=2 target);
    # other theories keep [32, 32] and 64; the command line and model=small win over both
    u1 = composed()
    assert u1.train.batch_size == 256 and list(u1.model.hidden) == [8, 8]
    su3 = composed("theory=su3_2d")
    assert su3.train.batch_size == 64 and list(su3.model.hidden) == [32, 32]
    widths = {name: [m.out_channels for m in theory_flow(build_theory(cfg, shape)).flow.layers[0].net.modules()
                     if hasattr(m, "out_channels")][:-1] for name, cfg, shape in [
        ("u1", dict(name="u1_2d", _target_="gaugeflow.theories.gauge_theory", group="u1", dim=2, beta=1.0), [4, 4]),
        ("su3", dict(name="su3_2d", _target_="gaugeflow.theories.gauge_theory", group="su3", dim=2, beta=1.0), [4, 4])]}
    assert widths == {"u1": [8, 8], "su3": [32, 32]}
    mine = composed("train.batch_size=32", "model.hidden=[4]")
    assert mine.train.batch_size == 32 and list(mine.model.hidden) == [4]
    assert list(composed("model_size=small").model.hidden) == [16, 16]
