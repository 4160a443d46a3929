"""Normalizing flows for lattice fields: priors, coupling layers, splines, context networks."""

from gaugeflow.flows.base import Flow, FlowLayer, FlowModel
from gaugeflow.flows.conv import ConvNet, PeriodicConv
from gaugeflow.flows.masks import checkerboard_mask, gauge_mask, gauge_mask_schedule
from gaugeflow.flows.models import affine, spline, sun_spectral, u1_equivariant
from gaugeflow.flows.priors import GaussianPrior, HaarPrior
from gaugeflow.flows.pseudofermion import PseudofermionFlow
from gaugeflow.flows.scalar import AffineCoupling, SplineCoupling
from gaugeflow.flows.sun import SUNPlaquetteCoupling
from gaugeflow.flows.u1 import CircleTransform, U1PlaquetteCoupling

__all__ = [
    "AffineCoupling",
    "CircleTransform",
    "ConvNet",
    "Flow",
    "FlowLayer",
    "FlowModel",
    "GaussianPrior",
    "HaarPrior",
    "PeriodicConv",
    "PseudofermionFlow",
    "SUNPlaquetteCoupling",
    "SplineCoupling",
    "U1PlaquetteCoupling",
    "affine",
    "checkerboard_mask",
    "gauge_mask",
    "gauge_mask_schedule",
    "spline",
    "sun_spectral",
    "u1_equivariant",
]
