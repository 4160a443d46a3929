"""Gauge-invariant observables: loops, Polyakov loops, topological charge, gradient flow."""

from gaugeflow.observables.loops import (
    plaquette,
    rectangle,
    rectangular_loop,
    wilson_line,
    wilson_staples,
)
from gaugeflow.observables.wilson import (
    group_of,
    link_dims,
    mean_plaquette,
    polyakov_loop,
    polyakov_loop_abs,
    wilson_loop,
)
from gaugeflow.observables.topology import (
    clover_field_strength,
    energy_density_clover,
    topological_charge,
    topological_charge_clover,
    topological_charge_density_clover,
    topological_charge_u1_2d,
)
from gaugeflow.observables.gradflow import (
    FlowRecord,
    wilson_flow,
    wilson_flow_generator,
    wilson_flow_step,
)

__all__ = [
    "FlowRecord",
    "clover_field_strength",
    "energy_density_clover",
    "group_of",
    "link_dims",
    "mean_plaquette",
    "plaquette",
    "polyakov_loop",
    "polyakov_loop_abs",
    "rectangle",
    "rectangular_loop",
    "topological_charge",
    "topological_charge_clover",
    "topological_charge_density_clover",
    "topological_charge_u1_2d",
    "wilson_flow",
    "wilson_flow_generator",
    "wilson_flow_step",
    "wilson_loop",
    "wilson_line",
    "wilson_staples",
]
