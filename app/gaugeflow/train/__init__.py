"""Training of flow models: the one trainer (:mod:`gaugeflow.train.trainer`), losses and schedules.

``from gaugeflow.train import Trainer, TrainSettings`` (imported on first use, so that
``gaugeflow.train.losses`` alone stays light).
"""

__all__ = ["History", "TrainSettings", "Trainer"]


def __getattr__(name: str):
    if name in __all__:
        from gaugeflow.train import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'gaugeflow.train' has no attribute {name!r}")
