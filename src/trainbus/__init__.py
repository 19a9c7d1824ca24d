"""trainbus: a PyTorch training engine built as a publish/subscribe system.

The loop announces every step as a named event on a blinker-backed bus; callbacks subscribe
with explicit priorities and receive a frozen :class:`TrainerState` snapshot with every event.
Importing this package has no side effects.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from trainbus.engine.compute import seed_everything
    from trainbus.engine.maps import Maps
    from trainbus.engine.metrics import LossMetricConfig, TorchMetricConfig
    from trainbus.engine.model import Model, SupervisedModel
    from trainbus.engine.state import TrainerState
    from trainbus.engine.weights import load_weights
    from trainbus.errors import TrainbusError
    from trainbus.events import (
        EVENTS,
        Callback,
        EventBus,
        EventSpec,
        SaveCheckpoint,
        SaveTrainingState,
        SkipStep,
        Stop,
        on,
    )
    from trainbus.handlers import (
        EarlyStoppingCallback,
        LoggerCallback,
        LRSchedulerCallback,
        MetricsWriterCallback,
        ModelCheckpointCallback,
        MonitorCallback,
        TrainingCheckpointCallback,
    )
    from trainbus.trainer import Trainer

_EXPORTS = {
    "Callback": "trainbus.events",
    "EVENTS": "trainbus.events",
    "EarlyStoppingCallback": "trainbus.handlers",
    "EventBus": "trainbus.events",
    "EventSpec": "trainbus.events",
    "LRSchedulerCallback": "trainbus.handlers",
    "LoggerCallback": "trainbus.handlers",
    "LossMetricConfig": "trainbus.engine.metrics",
    "Maps": "trainbus.engine.maps",
    "MetricsWriterCallback": "trainbus.handlers",
    "Model": "trainbus.engine.model",
    "ModelCheckpointCallback": "trainbus.handlers",
    "MonitorCallback": "trainbus.handlers",
    "SaveCheckpoint": "trainbus.events",
    "SaveTrainingState": "trainbus.events",
    "SkipStep": "trainbus.events",
    "Stop": "trainbus.events",
    "SupervisedModel": "trainbus.engine.model",
    "TorchMetricConfig": "trainbus.engine.metrics",
    "TrainbusError": "trainbus.errors",
    "Trainer": "trainbus.trainer",
    "TrainerState": "trainbus.engine.state",
    "TrainingCheckpointCallback": "trainbus.handlers",
    "load_weights": "trainbus.engine.weights",
    "on": "trainbus.events",
    "seed_everything": "trainbus.engine.compute",
}
"""Where each public name lives: imported on first use, so that ``import trainbus`` (and the
``trainbus`` command) does not pay for torch until something needs it."""


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'trainbus' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


try:
    __version__ = _version("trainbus")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+unknown"

__all__ = [
    "Callback",
    "EVENTS",
    "EarlyStoppingCallback",
    "EventBus",
    "EventSpec",
    "LRSchedulerCallback",
    "LoggerCallback",
    "LossMetricConfig",
    "Maps",
    "MetricsWriterCallback",
    "Model",
    "ModelCheckpointCallback",
    "MonitorCallback",
    "SaveCheckpoint",
    "SaveTrainingState",
    "SkipStep",
    "Stop",
    "SupervisedModel",
    "TorchMetricConfig",
    "TrainbusError",
    "Trainer",
    "TrainerState",
    "TrainingCheckpointCallback",
    "__version__",
    "load_weights",
    "on",
    "seed_everything",
]
