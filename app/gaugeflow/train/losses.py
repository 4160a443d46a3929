"""Training objectives for flows q against an unnormalised target p = exp(-S).

Each returns the scalar loss to minimise and the per-sample ``log q`` and ``S`` of the
batch it drew, for metrics.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


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



class _LogProb(torch.nn.Module):
    """``model.log_prob`` as a module forward, so ``functional_call`` can swap in detached parameters."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model.log_prob(x)


def path_gradient(model, action, batch_size: int, generator: torch.Generator | None = None) -> LossOutput:
    """Reverse KL with the path-gradient estimator (Vaitl, Nicoli, Nakajima & Kessel 2206.09016).

    The score term of the reparametrised gradient has zero mean; dropping it leaves
    ``d/d theta [log q_{theta'}(x_theta) + S(x_theta)]`` with ``theta' = theta`` held fixed,
    whose variance vanishes as q approaches p. ``log q`` is re-evaluated by the inverse
    pass with detached parameters, so gradients reach the parameters only through x.
    """
    from torch.func import functional_call

    x, log_q_sample = model.sample(batch_size, generator)
    state = {f"model.{k}": v.detach() for k, v in model.named_parameters()}
    state.update({f"model.{k}": v for k, v in model.named_buffers()})
    log_q = functional_call(_LogProb(model), state, (x,))
    s = action(x)
    # the value is the usual free-energy bound: log_q equals log_q_sample up to round-off
    return LossOutput((log_q + s).mean(), log_q_sample.detach(), s.detach(), x.detach())
