"""Joint flows over gauge links and pseudofermions, ``q(U, phi) = q(U) q(phi | U)``.

The target is the joint ``p(U, phi) ∝ exp(-S_G(U) - phi^dagger (D^dagger D)^{-1} phi)``, whose
links' marginal is the Nf = 2 theory (Albergo et al. 2106.05934; Abbott et al. 2207.08945): the
gauge flow ``q(U)`` is any gauge architecture of :mod:`gaugeflow.flows.models`, the conditional
``q(phi | U)`` the gauge-equivariant pseudofermion flow of :mod:`gaugeflow.flows.pseudofermion`.
Training needs one CG solve per configuration (the joint action), never a determinant.

Configurations are :class:`gaugeflow.fermions.JointField` ``(links, phi)``; ``log q`` is the
joint density (Haar measure on the links, Lebesgue measure on ``C^n`` for ``phi``), so the
importance weight ``log p - log q = -S_joint - log q`` is the joint one. Several ``phi`` per ``U``
estimate the links' marginal weight: :func:`marginal_log_weights`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from gaugeflow.fermions.fields import JointField


class JointModel(nn.Module):
    """``q(U, phi) = q(U) q(phi | U)``: ``sample(n) -> (JointField, log q)`` and ``log_prob(JointField)``."""

    def __init__(self, gauge: nn.Module, pseudofermion: nn.Module):
        super().__init__()
        self.gauge = gauge
        self.pseudofermion = pseudofermion

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[JointField, torch.Tensor]:
        links, log_q = self.gauge.sample(n, generator)
        phi, log_q_phi = self.pseudofermion.sample(links, generator)
        return JointField(links, phi), log_q + log_q_phi

    def log_prob(self, fields: JointField) -> torch.Tensor:
        if not isinstance(fields, JointField):
            raise TypeError("a joint model's density needs the pseudofermions too: pass a JointField(links, phi)")
        return self.gauge.log_prob(fields.links) + self.pseudofermion.log_prob(fields.links, fields.phi)

    def forward(self, n: int, generator: torch.Generator | None = None):
        return self.sample(n, generator)


def n_components(phi: torch.Tensor) -> int:
    """Complex components ``n`` of one configuration's pseudofermion field."""
    return math.prod(phi.shape[1:])


@torch.no_grad()
def marginal_log_weights(model: JointModel, action, links: torch.Tensor, log_q_links: torch.Tensor, n_phi: int,
                         generator: torch.Generator | None = None) -> torch.Tensor:
    """Log weights of the links' marginal from ``n_phi`` pseudofermion draws per configuration
    (a pseudo-marginal estimate, Andrieu & Roberts 2009, as in Abbott et al. 2207.08945):

        w(U) = exp(-S_G(U)) / q(U) * (1/n_phi) sum_k exp(-S_pf(U, phi_k)) / q(phi_k | U) / pi^n,

    whose expectation over ``phi_k ~ q(phi | U)`` is the marginal weight ``exp(-S_G) det(D^dagger
    D) / q(U)`` (``action.joint_action`` gives ``S_G + S_pf``). As ``n_phi`` grows the estimate's
    ESS approaches that of the marginal. Returns ``(batch,)`` float64.
    """
    if n_phi < 1:
        raise ValueError(f"n_phi must be >= 1, got {n_phi}")
    terms = []
    for _ in range(int(n_phi)):
        phi, log_q_phi = model.pseudofermion.sample(links, generator)
        s = action.joint_action(JointField(links, phi))
        terms.append(-s.double() - log_q_phi.double())
    t = torch.stack(terms, 0)
    n = n_components(phi)
    return torch.logsumexp(t, 0) - math.log(n_phi) - n * math.log(math.pi) - log_q_links.double()


def _gauge_default(theory) -> str:
    from gaugeflow.components import legacy_kind

    return legacy_kind(theory.group.name)  # the presets' flow: u1_equivariant or sun_spectral


def _gauge_node(theory, gauge: str | None, gauge_keys) -> dict:
    """The links' model node: ``gauge`` a builder of :mod:`gaugeflow.flows.models` or a dotted path."""
    name = gauge or _gauge_default(theory)
    return {"_target_": name if "." in name else f"gaugeflow.flows.models.{name}", **dict(gauge_keys or {})}


def joint(theory, dtype: torch.dtype = torch.float32, *, gauge: str | None = None, gauge_keys: dict | None = None,
          n_layers: int = 4, hidden=(8, 8), kernel_size: int = 3, init_kappa: bool = True) -> JointModel:
    """The joint model of pseudofermion theories (``theory.fermions=pseudofermion``; Abbott et al.
    2207.08945): ``gauge`` names the links' architecture (a builder of :mod:`gaugeflow.flows.models`
    or a dotted path; null: ``u1_equivariant`` for U(1), ``sun_spectral`` for SU(N)) with its keys
    in ``gauge_keys``; ``n_layers``, ``hidden``, ``kernel_size`` shape the conditional pseudofermion
    flow, which starts from ``phi = D^dagger chi``'s hopping structure when ``init_kappa``."""
    from gaugeflow.components import build_model
    from gaugeflow.flows.pseudofermion import PseudofermionFlow

    if not theory.is_gauge or theory.params.get("fermions") != "pseudofermion":
        raise ValueError(f"model=joint samples links and pseudofermions: it needs a theory with "
                         f"theory.fermions=pseudofermion (e.g. theory=schwinger_2d theory.fermions=pseudofermion), "
                         f"not {theory.name} with fermions={theory.params.get('fermions')}")
    q_u = build_model(_gauge_node(theory, gauge, gauge_keys), theory, dtype, key="model.gauge_keys")
    kappa = float(theory.params["kappa"]) if init_kappa else None
    q_phi = PseudofermionFlow(tuple(theory.lattice.shape), theory.group.N, n_layers=int(n_layers),
                              hidden=tuple(int(h) for h in hidden), kernel_size=int(kernel_size), kappa=kappa,
                              boundary=str(theory.params.get("boundary", "antiperiodic")), dtype=dtype)
    return JointModel(q_u, q_phi)


def _resolve_joint(theory, keys: dict) -> dict:
    """The links' architecture by name and all its keys, so a checkpoint records the model in full."""
    from gaugeflow.components import resolved_model_spec

    keys = dict(keys)
    name = keys.get("gauge") or _gauge_default(theory)
    spec = resolved_model_spec(_gauge_node(theory, name, keys.get("gauge_keys")), theory, key="model.gauge_keys")
    spec.pop("_target_")
    keys.update(gauge=name, gauge_keys=spec)
    return keys


joint.resolve_keys = _resolve_joint
