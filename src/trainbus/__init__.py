"""trainbus: a PyTorch training engine built as a publish/subscribe system.

The loop announces every step as a named event on a blinker-backed bus; callbacks subscribe
with explicit priorities and receive a frozen :class:`TrainerState` snapshot with every event.
Importing this package has no side effects.
"""

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version

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
