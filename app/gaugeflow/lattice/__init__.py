"""Lattice geometry: shapes, coordinates and the one function that knows neighbours."""

from gaugeflow.lattice.geometry import (
    Lattice,
    checkerboard,
    coordinates,
    pad,
    shift,
    use_shift,
    validate_shape,
)

__all__ = ["Lattice", "checkerboard", "coordinates", "pad", "shift", "use_shift", "validate_shape"]
