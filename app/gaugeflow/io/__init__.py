"""File formats: HDF5 ensembles (and, later, checkpoints)."""

from gaugeflow.io.ensemble import Ensemble, EnsembleError, EnsembleWriter, read_ensemble

__all__ = ["Ensemble", "EnsembleError", "EnsembleWriter", "read_ensemble"]
