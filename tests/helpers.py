"""Shared test helpers."""

import torch
from gaugeflow.components import legacy_kind
from gaugeflow.flows import models


def theory_flow(theory, dtype=torch.float32, **keys):
    """The architecture the presets name for ``theory``'s field space (conf/theory/*.yaml: affine for
    phi^4, u1_equivariant for U(1), sun_spectral for SU(N)), built with ``keys``."""
    builder = getattr(models, legacy_kind(theory.group.name if theory.group is not None else None))
    return builder(theory, dtype, **keys)


def haar(group, batch, shape, seed):
    """``batch`` Haar-random link configurations of ``group`` on ``shape``."""
    from gaugeflow.groups import get_group

    return get_group(group).random((batch, len(shape), *shape), torch.Generator().manual_seed(seed))


def log_series(m, terms=30):
    """log(M) = sum_k (-1)^{k+1} (M - 1)^k / k, for M near 1 (differentiable, unlike log via eig at 1)."""
    a = m - torch.eye(m.shape[-1], dtype=m.dtype)
    out, ak = torch.zeros_like(m), torch.eye(m.shape[-1], dtype=m.dtype)
    for k in range(1, terms + 1):
        ak = ak @ a
        out = out + ((-1) ** (k + 1) / k) * ak
    return out


def perturbed(module, scale=0.1, seed=1):
    """Every parameter moved by ``scale`` times a standard normal (seeded), in place: a
    zero-initialised (identity) layer is moved off the identity so each test can fail."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return module
