"""ModelCheckpointCallback: save the weights at chosen epochs, of the best model, and the last."""

from __future__ import annotations

from collections.abc import Container, Mapping
from typing import Any, Literal

from trainbus.engine.state import TrainerState
from trainbus.errors import ConfigurationError
from trainbus.events.callback import Callback
from trainbus.events.commands import SaveCheckpoint
from trainbus.handlers import priorities
from trainbus.handlers.early_stopping import infer_mode


class ModelCheckpointCallback(Callback):
    """Save model weights under ``checkpoints/``: ``best-<metric>``, ``epoch-<n>`` and ``last``.

    - ``metric``: keep the weights with the best value of this metric (``mode`` inferred as
      ``"min"`` for loss-like names).
    - ``epochs``: the epochs (``state.current_epoch``, 0-based) to keep, e.g. ``range(1, 100, 10)``.
    - ``save_last``: keep the weights of the latest epoch under ``last``.

    The callback decides; the Trainer writes (atomically, with a manifest) after ``epoch_end``.
    """

    priority = priorities.CHECKPOINT

    def __init__(
        self,
        metric: str | None = None,
        epochs: Container[int] | None = None,
        *,
        save_last: bool = True,
        mode: Literal["min", "max"] | None = None,
    ) -> None:
        if metric is not None and (not isinstance(metric, str) or not metric):
            raise ConfigurationError(
                f"ModelCheckpointCallback: metric={metric!r} is not a metric name or None"
            )
        if epochs is not None and not isinstance(epochs, Container):
            raise ConfigurationError(
                f"ModelCheckpointCallback: epochs={epochs!r} is not a collection of epoch "
                "numbers; pass e.g. epochs=range(1, 100, 10)"
            )
        if not isinstance(save_last, bool):
            raise ConfigurationError(
                f"ModelCheckpointCallback: save_last={save_last!r} is not a bool"
            )
        self.metric = metric
        self.epochs = epochs
        self.save_last = save_last
        self.mode = infer_mode(metric, mode, "ModelCheckpointCallback") if metric else None
        self.best: float | None = None
        self._best_now = False

    def metric_names(self) -> tuple[str, ...]:
        """Metrics this callback reads (checked against the Trainer's metrics)."""
        return (self.metric,) if self.metric else ()

    def on_validation_end(self, *, metrics: Mapping[str, float]) -> None:
        if self.metric is None:
            return
        value = metrics[self.metric]
        if value == value and (  # NaN never improves
            self.best is None or (value < self.best if self.mode == "min" else value > self.best)
        ):
            self.best = value
            self._best_now = True

    def on_epoch_end(self, *, state: TrainerState) -> list[SaveCheckpoint]:
        requests = []
        if self._best_now:
            self._best_now = False
            requests.append(
                SaveCheckpoint(
                    f"best-{self.metric}", metadata=(("metric", self.metric), ("value", self.best))
                )
            )
        if self.epochs is not None and state.current_epoch in self.epochs:
            requests.append(SaveCheckpoint(f"epoch-{state.current_epoch}"))
        if self.save_last:
            requests.append(SaveCheckpoint("last"))
        return requests

    def config(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "epochs": repr(self.epochs),
            "save_last": self.save_last,
            "mode": self.mode,
        }

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.best = state.get("best")
