"""The ``gaugeflow`` command: one Hydra app per job."""
