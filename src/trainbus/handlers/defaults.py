"""The callbacks active by default, in the order they are registered."""

from __future__ import annotations

from trainbus.events.callback import Callback
from trainbus.handlers.logger import LoggerCallback
from trainbus.handlers.metrics_writer import MetricsWriterCallback
from trainbus.handlers.model_checkpoint import ModelCheckpointCallback
from trainbus.handlers.monitor import MonitorCallback
from trainbus.handlers.training_checkpoint import TrainingCheckpointCallback

DEFAULT_TYPES: tuple[type[Callback], ...] = (
    LoggerCallback,
    MonitorCallback,
    MetricsWriterCallback,
    ModelCheckpointCallback,
    TrainingCheckpointCallback,
)


def default_callbacks() -> list[Callback]:
    """Fresh instances of the default callbacks (an instance of the same type replaces one)."""
    return [default() for default in DEFAULT_TYPES]
