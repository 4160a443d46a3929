"""Shared test helpers."""

import torch

from gaugeflow.components import legacy_kind
from gaugeflow.flows import models


def theory_flow(theory, dtype=torch.float32, **keys):
    """The architecture the presets name for ``theory``'s field space (conf/theory/*.yaml: affine for
    phi^4, u1_equivariant for U(1), sun_spectral for SU(N)), built with ``keys``."""
    builder = getattr(models, legacy_kind(theory.group.name if theory.group is not None else None))
    return builder(theory, dtype, **keys)
