"""Training objectives for flows q against an unnormalised target p = exp(-S).

Each returns the scalar loss to minimise and the per-sample ``log q`` and ``S`` of the
batch it drew, for metrics.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gaugeflow.errors import UsageError

#: the baselines of :func:`reinforce` (``loss.baseline``)
BASELINES = ("loo", "none")


@dataclass
class LossOutput:
    loss: torch.Tensor
    log_q: torch.Tensor
    action: torch.Tensor
    samples: torch.Tensor | None = None  # the batch, detached


def reverse_kl(model, action, batch_size: int, generator: torch.Generator | None = None) -> LossOutput:
    """``E_q[log q + S]`` by the reparametrisation trick (Albergo et al. 1904.12072).

    Its value is the free-energy bound ``F_q >= -log Z`` (it estimates ``KL(q||p) - log Z``).
    """
    x, log_q = model.sample(batch_size, generator)
    s = action(x)
    return LossOutput((log_q + s).mean(), log_q.detach(), s.detach(), x.detach())



def path_gradient(model, action, batch_size: int, generator: torch.Generator | None = None) -> LossOutput:
    """Reverse KL with the path-gradient estimator (Vaitl, Nicoli, Nakajima & Kessel 2206.09016).

    The path gradient is the total derivative of ``log q_theta(x_theta) + S(x_theta)`` minus the
    score ``d/dtheta log q_theta(x)`` at fixed ``x``, whose expectation is zero and whose variance
    does not vanish as q approaches p. The score is subtracted explicitly:
    ``mean(log q + S - log q(x.detach()) + log q(x.detach()).detach())`` has the free-energy bound
    as its value and the path gradient as its gradient. One extra inverse pass; it needs no
    parameter swapping, so it works for FSDP-sharded models too.
    """
    x, log_q = model.sample(batch_size, generator)
    s = action(x)
    score = model.log_prob(x.detach())
    loss = (log_q + s - score + score.detach()).mean()
    return LossOutput(loss, log_q.detach(), s.detach(), x.detach())


def reinforce(model, action, batch_size: int, generator: torch.Generator | None = None,
              baseline: str = "loo") -> LossOutput:
    """Reverse KL by the score-function (REINFORCE) estimator (Białas, Korcyl & Stebel 2202.01314, 2308.13294).

    ``grad KL(q||p) = E_q[(log q(x) + S(x) - b) grad_theta log q_theta(x)]`` for any ``b`` that does
    not depend on the draw it multiplies. ``x`` is drawn without a graph, ``S`` is evaluated
    without one (nothing is back-propagated through the action: for fermion targets no
    determinant is differentiated), and one inverse pass ``model.log_prob(x)`` carries the graph.
    ``baseline="loo"``: ``b_i`` is the mean of ``f = log q + S`` over the other draws of the batch
    (leave-one-out: unlike the plain batch mean, which includes draw i and shrinks the gradient
    by (n-1)/n, it keeps the estimator unbiased; it needs ``batch_size >= 2``). It also removes
    any constant in S (an unknown log Z). ``"none"``: b = 0.

    The value is the free-energy bound ``mean(log q + S)``, as for :func:`reverse_kl`; only the
    gradient differs.
    """
    if baseline not in BASELINES:
        raise ValueError(f"loss.baseline must be one of {', '.join(BASELINES)}, got {baseline!r}")
    if baseline == "loo" and batch_size < 2:
        raise UsageError(f"loss=reinforce with loss.baseline=loo needs >= 2 draws per micro-batch for its "
                         f"leave-one-out baseline, got {batch_size} (raise train.micro_batch_size, or "
                         "train.batch_size when it is not set)")
    owner = getattr(action, "__self__", action)  # a bound method: the action object it belongs to
    if not getattr(action, "exact_value", getattr(owner, "exact_value", True)):
        # e.g. theory.logdet=stochastic: the value is S_G alone, only the gradient is the target's
        raise UsageError("loss=reinforce weights the score by the action's value, and this training action "
                         "gives only its gradient (theory.logdet=stochastic): use theory.logdet=dense, "
                         "theory.fermions=pseudofermion or another loss")
    with torch.no_grad():
        x, log_q = model.sample(batch_size, generator)
        s = action(x)
        f = log_q + s
        if baseline == "loo":
            # (sum_j f_j - f_i) / (n - 1): independent of draw i, so E[b_i grad log q(x_i)] = 0
            weight = f - (f.sum() - f) / (batch_size - 1)
        else:
            weight = f
    score = model.log_prob(x)
    surrogate = (weight.to(score.dtype) * score).mean()
    # the value is the bound (comparable with reverse_kl in logs); the gradient is the surrogate's
    loss = surrogate - surrogate.detach() + f.mean()
    return LossOutput(loss, log_q, s, x)


def forward_kl(model, data: torch.Tensor, batch_size: int, generator: torch.Generator | None = None) -> LossOutput:
    """``E_p[-log q]`` over configurations ``data`` drawn from p (e.g. an HMC ensemble).

    Minimising it minimises ``KL(p||q)`` (mass-covering, unlike the reverse KL); it needs
    no sampling from q but only as many independent targets as the ensemble holds.
    """
    idx = torch.randint(data.shape[0], (batch_size,), generator=generator, device=generator.device
                        if generator is not None else data.device)
    x = data[idx.to(data.device)]
    log_q = model.log_prob(x)
    return LossOutput(-log_q.mean(), log_q.detach(), torch.full_like(log_q, float("nan")).detach(), x)


class Loss:
    """A training objective configured from the ``loss`` group: ``loss(model, action, batch, gen)``.

    ``samples_from_model`` tells the trainer whether the returned ``log_q``/``action`` describe
    draws of q (so batch ESS and the free-energy bound can be logged from them).
    """

    samples_from_model = True

    def bind(self, theory, device: torch.device, dtype: torch.dtype) -> None:  # noqa: ARG002
        """Prepare for ``theory`` (e.g. load data); the default needs nothing."""

    def __call__(self, model, action, batch_size: int, generator=None) -> LossOutput:
        raise TypeError(f"{type(self).__name__} must define __call__")


class ReverseKL(Loss):
    """Reverse KL by reparametrisation (Albergo et al. 1904.12072); its value is ``F_q >= -log Z``."""

    def __call__(self, model, action, batch_size, generator=None):
        return reverse_kl(model, action, batch_size, generator)


class PathGradient(Loss):
    """Reverse KL with path gradients (Vaitl et al. 2206.09016, 2207.08219)."""

    def __call__(self, model, action, batch_size, generator=None):
        return path_gradient(model, action, batch_size, generator)


class Reinforce(Loss):
    """Reverse KL by the REINFORCE (score-function) estimator (Białas, Korcyl & Stebel 2202.01314, 2308.13294).

    No backward pass through the sampler or the action; ``baseline`` is ``"loo"`` (leave-one-out
    mean over the micro-batch, unbiased, >= 2 draws per micro-batch) or ``"none"``.
    """

    def __init__(self, baseline: str = "loo"):
        if baseline not in BASELINES:
            raise ValueError(f"loss.baseline must be one of {', '.join(BASELINES)}, got {baseline!r}")
        self.baseline = baseline

    def __call__(self, model, action, batch_size, generator=None):
        return reinforce(model, action, batch_size, generator, self.baseline)


class ForwardKL(Loss):
    """Forward KL from an ensemble file of the same theory and lattice (``loss.ensemble``).

    The first ``n_therm`` configurations of each chain are dropped (a file of several HMC chains
    has a ``chain`` dataset; :meth:`gaugeflow.io.ensemble.Ensemble.drop_therm`); the rest are held
    in memory.
    """

    samples_from_model = False

    def __init__(self, ensemble: str | None = None, n_therm: int = 0):
        if not ensemble:
            raise ValueError("loss.ensemble must name an ensemble file for the forward KL")
        if n_therm < 0:
            raise ValueError(f"loss.n_therm must be >= 0, got {n_therm}")
        self.ensemble, self.n_therm = str(ensemble), int(n_therm)
        self.data: torch.Tensor | None = None

    @classmethod
    def from_tensor(cls, data: torch.Tensor) -> "ForwardKL":
        """Forward KL from configurations already in memory (no file)."""
        loss = cls(ensemble="<tensor>")
        loss.data = data
        return loss

    def bind(self, theory, device, dtype):
        if self.ensemble == "<tensor>":
            return
        import numpy as np

        from gaugeflow.io.ensemble import read_ensemble

        ens = read_ensemble(self.ensemble)
        where = f"loss.ensemble={self.ensemble}"
        if ens.theory != theory.name:
            raise ValueError(f"{where}: ensemble of theory {ens.theory!r}, not {theory.name!r}")
        shape = [int(s) for s in np.atleast_1d(ens.attrs.get("shape", []))]
        if shape != list(theory.lattice.shape):
            raise ValueError(f"{where}: lattice shape {shape}, not {list(theory.lattice.shape)}")
        for k, v in theory.params.items():
            # an ensemble at other couplings samples another distribution
            if isinstance(v, float) and k in ens.attrs and not np.isclose(float(ens.attrs[k]), v, rtol=1e-12):
                raise ValueError(f"{where}: ensemble has {k}={float(ens.attrs[k])}, the theory {k}={v}")
        x = ens.drop_therm(self.n_therm).tensor()  # the first n_therm configurations of each chain
        if x.shape[0] == 0:
            raise ValueError(f"{where}: no configurations after loss.n_therm={self.n_therm}")
        self.data = x.to(device=device, dtype=theory.field_dtype(dtype))

    def __call__(self, model, action, batch_size, generator=None):  # noqa: ARG002
        if self.data is None:
            raise RuntimeError("ForwardKL.bind(theory, ...) must be called before training")
        return forward_kl(model, self.data, batch_size, generator)
