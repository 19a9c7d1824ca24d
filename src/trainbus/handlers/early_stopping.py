"""EarlyStoppingCallback: stop when a monitored metric stops improving."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

from trainbus.engine.state import TrainerState
from trainbus.errors import ConfigurationError
from trainbus.events.callback import Callback
from trainbus.events.commands import Stop
from trainbus.handlers import priorities

_LOWER_IS_BETTER = ("loss", "error", "mse", "mae", "rmse", "perplexity", "distance")


def infer_mode(metric: str, mode: str | None, owner: str) -> Literal["min", "max"]:
    """``mode`` if given, else ``"min"`` for loss-like names; anything else must be explicit."""
    if mode is None:
        if any(token in metric.lower() for token in _LOWER_IS_BETTER):
            return "min"
        raise ConfigurationError(
            f"{owner} cannot tell whether {metric!r} should go up or down; pass mode='min' or "
            "mode='max'"
        )
    if mode not in ("min", "max"):
        raise ConfigurationError(f"{owner}: mode={mode!r} is not 'min' or 'max'")
    return "min" if mode == "min" else "max"


class EarlyStoppingCallback(Callback):
    """Stop training after ``patience`` validations without improvement of ``metric``.

    An improvement is a change beyond ``min_delta`` in the direction of ``mode`` (inferred as
    ``"min"`` for loss-like names). The stop is returned as a :class:`~trainbus.Stop` whose
    reason names the metric, its best value and the validations waited.
    """

    priority = priorities.DEFAULT

    def __init__(
        self,
        metric: str,
        patience: int = 10,
        *,
        mode: Literal["min", "max"] | None = None,
        min_delta: float = 0.0,
    ) -> None:
        if not isinstance(metric, str) or not metric:
            raise ConfigurationError(
                f"EarlyStoppingCallback: metric={metric!r} is not a metric name; pass the name "
                "of a metric given to Trainer(metrics=...), e.g. metric='loss'"
            )
        if type(patience) is not int or patience < 1:
            raise ConfigurationError(
                f"EarlyStoppingCallback: patience={patience!r} is not a positive integer "
                "(validations without improvement before stopping)"
            )
        if (
            isinstance(min_delta, bool)
            or not isinstance(min_delta, int | float)
            or not math.isfinite(min_delta)
            or min_delta < 0
        ):
            raise ConfigurationError(
                f"EarlyStoppingCallback: min_delta={min_delta!r} is not a finite number >= 0"
            )
        self.metric = metric
        self.patience = patience
        self.mode = infer_mode(metric, mode, "EarlyStoppingCallback")
        self.min_delta = float(min_delta)
        self.best: float | None = None
        self.wait = 0

    def metric_names(self) -> tuple[str, ...]:
        """Metrics this callback reads (checked against the Trainer's metrics)."""
        return (self.metric,)

    def on_validation_end(
        self, *, state: TrainerState, metrics: Mapping[str, float]
    ) -> Stop | None:
        value = metrics[self.metric]
        if self._improves(value):
            self.best = value
            self.wait = 0
            return None
        self.wait += 1
        if self.wait < self.patience:
            return None
        return Stop(
            f"{self.metric} did not improve for {self.wait} validations "
            f"(best {self.best!r}, mode={self.mode}, min_delta={self.min_delta})"
        )

    def _improves(self, value: float) -> bool:
        if math.isnan(value):
            return False
        if self.best is None:
            return True
        if self.mode == "min":
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "wait": self.wait}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.best = state.get("best")
        self.wait = int(state.get("wait", 0))
