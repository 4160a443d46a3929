"""Lattice theories: an action, the field space it lives on, and its standard measurements."""

from gaugeflow.theories.builders import gauge_theory, phi4_theory, wilson_nf2_theory
from gaugeflow.theories.gauge import GaugeAction, autograd_force, gauge_transform
from gaugeflow.theories.phi4 import Phi4Action, Phi4HoppingAction
from gaugeflow.theories.theory import Theory

__all__ = [
    "GaugeAction",
    "Phi4Action",
    "Phi4HoppingAction",
    "Theory",
    "autograd_force",
    "gauge_theory",
    "gauge_transform",
    "phi4_theory",
    "wilson_nf2_theory",
]
