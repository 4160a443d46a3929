"""A user's flow architecture and a user's theory, added from outside gaugeflow (docs/extending.md).

Each lives in the user's own Python module plus a YAML in the user's own config directory, in a
temporary directory; the jobs run as a user runs them (``gaugeflow train ... hydra.searchpath=...``
with the module on ``PYTHONPATH``), then ``sample``, ``score`` and ``analyze`` the result.
"""

import json
import os
import subprocess
import sys
import textwrap

import h5py
import numpy as np
import pytest
import torch
import yaml

FLOWS = '''
"""A user's flow architecture."""

from gaugeflow.flows import ConvNet, Flow, FlowModel, GaussianPrior
from gaugeflow.flows.scalar import AffineCoupling


def shallow_affine(theory, dtype, n_pairs: int = 1, width: int = 4):
    """Checkerboard affine couplings in pairs, one hidden layer of ``width`` channels."""
    shape = theory.lattice.shape
    layers = [AffineCoupling(shape, i % 2, ConvNet(1, 2, (width,), 3, theory.lattice.ndim))
              for i in range(2 * n_pairs)]
    return FlowModel(GaussianPrior(shape, dtype=dtype), Flow(layers)).to(dtype)
'''

THEORY = '''
"""A user's theory: phi^4 in an external field, S = S_phi4 - h sum_x phi(x)."""

from gaugeflow.lattice import Lattice
from gaugeflow.theories import Phi4Action, Theory


class Phi4InField:
    def __init__(self, m2, lam, h):
        self.base, self.h = Phi4Action(m2, lam), float(h)

    def __call__(self, phi):
        return self.base(phi) - self.h * phi.flatten(1).sum(1)

    def grad(self, phi):
        return self.base.grad(phi) - self.h


def phi4_in_field(shape, m2: float, lam: float, h: float = 0.0):
    return Theory("phi4_field", "scalar", Lattice(shape), Phi4InField(m2, lam, h), None,
                  {"m2": float(m2), "lam": float(lam), "h": float(h)})
'''

CHAIN = '''
"""A user's chain over flow proposals: Barker's acceptance min -> w'/(w + w'), also exact."""

import math

import torch


class BarkerChain:
    def __init__(self, generator=None):
        self.generator, self.n_seen, self.n_accepted = generator, 0, 0
        self.current, self.current_log_w = -1, -math.inf

    def step(self, log_w):
        lw = log_w.detach().double().cpu().tolist()
        u = torch.rand(len(lw), generator=self.generator, dtype=torch.float64).tolist()
        accepted, current = [], []
        for i, (w, r) in enumerate(zip(lw, u)):
            # accept with probability w' / (w + w') = sigmoid(log w' - log w)
            take = self.current < 0 or r < 1.0 / (1.0 + math.exp(min(700.0, self.current_log_w - w)))
            if take:
                self.current, self.current_log_w = self.n_seen + i, w
            accepted.append(take)
            current.append(self.current)
        self.n_seen += len(lw)
        self.n_accepted += sum(accepted)
        return torch.tensor(accepted), torch.tensor(current, dtype=torch.int64)

    @property
    def acceptance(self):
        return self.n_accepted / self.n_seen
'''

SAMPLE_YAML = """\
# a user's sampler: gaugeflow sample sample=barker
defaults:
  - imh
  - _self_
method: barker
sampler:
  _target_: mychain.BarkerChain
"""

MODEL_YAML = """\
# a user's architecture: gaugeflow train model=shallow
_target_: myflows.shallow_affine
n_pairs: 1
width: 4
"""

THEORY_YAML = """\
# a user's theory preset: gaugeflow train theory=phi4_field
defaults:
  - /model@_global_.model: affine
_target_: mytheory.phi4_in_field
name: phi4_field
dim: 2
default_shape: [4, 4]
m2: -1.0
lam: 1.0
h: 0.5
"""

TRAIN = ["train.steps=4", "train.batch_size=16", "train.eval_samples=32", "train.progress=false"]


@pytest.fixture(scope="module")
def user(tmp_path_factory):
    """The user's directory: two modules and a config directory; nothing inside gaugeflow."""
    root = tmp_path_factory.mktemp("user")
    (root / "myflows.py").write_text(textwrap.dedent(FLOWS))
    (root / "mytheory.py").write_text(textwrap.dedent(THEORY))
    (root / "mychain.py").write_text(textwrap.dedent(CHAIN))
    (root / "conf" / "sample").mkdir(parents=True)
    (root / "conf" / "sample" / "barker.yaml").write_text(SAMPLE_YAML)
    (root / "conf" / "model").mkdir()
    (root / "conf" / "theory").mkdir()
    (root / "conf" / "model" / "shallow.yaml").write_text(MODEL_YAML)
    (root / "conf" / "theory" / "phi4_field.yaml").write_text(THEORY_YAML)
    return root


def gaugeflow(user, *args, ok=True):
    env = {**os.environ, "PYTHONPATH": str(user), "HYDRA_FULL_ERROR": "0", "WANDB_MODE": "disabled",
           "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "gaugeflow.cli.main", *args], cwd=user, env=env,
                       capture_output=True, text=True, timeout=300)
    if ok:
        assert r.returncode == 0, (r.stdout, r.stderr)
    return r


def search(user):
    return f"hydra.searchpath=[file://{user / 'conf'}]"


def saved_config(run):
    ck = sorted((run / "checkpoints").glob("step_*.h5"))[-1]
    with h5py.File(ck) as f:
        return yaml.safe_load(f.attrs["config"]), ck


def test_a_users_model_trains_samples_scores_and_analyzes(user):
    run = user / "run_model"
    gaugeflow(user, "train", "theory=phi4_2d", "model=shallow", "model.width=6", "lattice.shape=[4,4]", *TRAIN,
              search(user), f"hydra.run.dir={run}")
    cfg, ck = saved_config(run)
    # the checkpoint names the builder and every key: it rebuilds the run alone
    assert cfg["model"] == {"_target_": "myflows.shallow_affine", "n_pairs": 1, "width": 6}
    # a checkpoint naming a callable outside gaugeflow is refused unless the user allows it
    r = gaugeflow(user, "sample", f"checkpoint={run}", "sample.n=64", "out=x.h5", ok=False)
    assert r.returncode == 2 and "allow_targets" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (user / "x.h5").exists()
    gaugeflow(user, "sample", f"checkpoint={run}", "sample.n=64", "out=model.h5", "allow_targets=[myflows]",
              f"hydra.run.dir={user / 'sample_model'}")
    with h5py.File(user / "model.h5") as f:
        assert f.attrs["theory"] == "phi4_2d" and f["phi"].shape == (64, 4, 4)
        phi, log_p = torch.from_numpy(f["phi"][...]), f["log_p"][...]
    from gaugeflow.theories import phi4_theory

    np.testing.assert_allclose(log_p, -phi4_theory([4, 4], m2=-4.0, lam=8.0).action(phi).numpy(), rtol=1e-12)
    gaugeflow(user, "score", f"checkpoint={run}", "ensemble=model.h5", "allow_targets=[myflows]",
              f"hydra.run.dir={user / 'score_model'}")
    assert (user / "score_model" / "scores.h5").exists()
    gaugeflow(user, "analyze", "ensemble=model.h5", f"hydra.run.dir={user / 'analyze_model'}")
    summary = json.loads((user / "analyze_model" / "summary.json").read_text())
    assert "phi2" in json.dumps(summary)


def test_a_users_theory_trains_samples_and_analyzes(user):
    run = user / "run_theory"
    gaugeflow(user, "train", "theory=phi4_field", "model=small", *TRAIN, search(user), f"hydra.run.dir={run}")
    cfg, _ = saved_config(run)
    assert cfg["theory"]["_target_"] == "mytheory.phi4_in_field" and cfg["theory"]["h"] == 0.5
    assert cfg["model"]["_target_"] == "gaugeflow.flows.models.affine" and cfg["model"]["n_layers"] == 8
    # a coupling of the user's theory changes on the command line like any other
    gaugeflow(user, "sample", f"checkpoint={run}", "theory.h=0.25", "sample.n=64", "out=theory.h5",
              "allow_targets=[mytheory]", f"hydra.run.dir={user / 'sample_theory'}")
    with h5py.File(user / "theory.h5") as f:
        assert f.attrs["theory"] == "phi4_field" and f.attrs["h"] == 0.25 and f.attrs["lam"] == 1.0
        phi, log_p = f["phi"][...], f["log_p"][...]
    # the ensemble's log p is the user's action: S_phi4 - h sum phi
    phi_t = torch.from_numpy(phi)
    from gaugeflow.theories import phi4_theory

    s = phi4_theory([4, 4], m2=-1.0, lam=1.0).action(phi_t).numpy() - 0.25 * phi.reshape(64, -1).sum(1)
    np.testing.assert_allclose(log_p, -s, rtol=1e-12, atol=1e-12)
    gaugeflow(user, "analyze", "ensemble=theory.h5", f"hydra.run.dir={user / 'analyze_theory'}")


def test_a_users_sampler_runs_the_chain(user):
    run = user / "run_model"
    if not run.exists():
        gaugeflow(user, "train", "theory=phi4_2d", "model=shallow", "lattice.shape=[4,4]", *TRAIN, search(user),
                  f"hydra.run.dir={run}")
    r = gaugeflow(user, "sample", "sample=barker", f"checkpoint={run}", "sample.n=64", "out=barker.h5",
                  "allow_targets=[myflows]", search(user), f"hydra.run.dir={user / 'sample_barker'}")
    assert "barker chain steps" in r.stdout
    with h5py.File(user / "barker.h5") as f:
        assert f.attrs["sampler"] == "barker"
        accepted, proposal = f["accepted"][...], f["proposal"][...]
        phi = f["phi"][...]
    # a rejected step repeats the previous configuration; an accepted one is its own proposal
    assert accepted[0] and 0 < accepted.mean() < 1
    for i in range(1, 64):
        if not accepted[i]:
            assert np.array_equal(phi[i], phi[i - 1]) and proposal[i] == proposal[i - 1]
        else:
            assert proposal[i] == i


def test_a_misspelt_plugin_key_fails_at_start_naming_it(user):
    r = gaugeflow(user, "train", "theory=phi4_field", "theory.hh=1.0", *TRAIN, search(user),
                  f"hydra.run.dir={user / 'bad'}", ok=False)
    assert r.returncode != 0 and "theory.hh" in r.stderr
    # a key the YAML has but the builder does not take: the builder's signature decides
    r = gaugeflow(user, "train", "theory=phi4_2d", "model=shallow", "+model.depth=3", *TRAIN, search(user),
                  f"hydra.run.dir={user / 'bad2'}", ok=False)
    assert r.returncode == 2 and "model.depth is not a key of" in r.stderr and "n_pairs, width" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (user / "bad2" / "checkpoints").exists()
