"""Normalizing flows for lattice fields: priors, coupling layers, splines, context networks."""

from gaugeflow.flows.base import Flow, FlowLayer, FlowModel
from gaugeflow.flows.conv import ConvNet, PeriodicConv
from gaugeflow.flows.masks import checkerboard_mask, gauge_mask, gauge_mask_schedule
from gaugeflow.flows.models import KINDS, build_flow_model, default_kind
from gaugeflow.flows.priors import GaussianPrior, HaarPrior
from gaugeflow.flows.scalar import AffineCoupling, SplineCoupling
from gaugeflow.flows.sun import SUNPlaquetteCoupling
from gaugeflow.flows.u1 import CircleTransform, U1PlaquetteCoupling

__all__ = [
    "KINDS",
    "AffineCoupling",
    "CircleTransform",
    "ConvNet",
    "Flow",
    "FlowLayer",
    "FlowModel",
    "GaussianPrior",
    "HaarPrior",
    "PeriodicConv",
    "SUNPlaquetteCoupling",
    "SplineCoupling",
    "U1PlaquetteCoupling",
    "build_flow_model",
    "checkerboard_mask",
    "default_kind",
    "gauge_mask",
    "gauge_mask_schedule",
]
