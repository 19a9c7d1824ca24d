"""Built-in subscribers: one callback per module, each with documented priorities."""

from trainbus.handlers.defaults import DEFAULT_TYPES, default_callbacks
from trainbus.handlers.early_stopping import EarlyStoppingCallback
from trainbus.handlers.logger import LoggerCallback
from trainbus.handlers.lr_scheduler import LRSchedulerCallback
from trainbus.handlers.metrics_writer import MetricsWriterCallback
from trainbus.handlers.model_checkpoint import ModelCheckpointCallback
from trainbus.handlers.monitor import MonitorCallback
from trainbus.handlers.training_checkpoint import TrainingCheckpointCallback

__all__ = [
    "DEFAULT_TYPES",
    "EarlyStoppingCallback",
    "LRSchedulerCallback",
    "LoggerCallback",
    "MetricsWriterCallback",
    "ModelCheckpointCallback",
    "MonitorCallback",
    "TrainingCheckpointCallback",
    "default_callbacks",
]
