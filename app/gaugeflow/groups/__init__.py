"""Gauge groups U(1) and SU(N) acting on complex ``(..., N, N)`` matrices."""

from gaugeflow.groups.matrix import dagger, mul, re_trace, trace
from gaugeflow.groups.group import SU, U1, Group, get_group

__all__ = ["Group", "SU", "U1", "dagger", "get_group", "mul", "re_trace", "trace"]
