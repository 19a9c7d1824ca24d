"""The training losses of one log interval, kept on the device and read once per interval.

Reading a loss per step would be a host-device sync. Keeping every step's loss until the log
interval would keep a per-step history on the device (and, with long intervals, thousands of
small tensors alive). So the losses are folded into one running sum every :data:`FOLD_EVERY`
iterations (one small kernel, no sync), and the interval's mean is read at its end.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch

from trainbus.engine.core import Engine, learning_rates
from trainbus.errors import TrainbusWarning
from trainbus.events.commands import Request, Stop

NONFINITE_SOURCE = "trainbus.nonfinite_loss"
"""``state.stopped_by`` when a NaN or infinite training loss stopped training."""

FOLD_EVERY = 128
"""Iterations between two folds: the loop folds when ``iteration % FOLD_EVERY == 0``."""


class LossTracker:
    """The detached losses since the last fold, and the sum and count of those folded."""

    __slots__ = ("count", "recent", "total")

    def __init__(self) -> None:
        self.recent: list[torch.Tensor] = []
        """Detached losses since the last fold (the loop appends to this list)."""
        self.total: torch.Tensor | None = None
        self.count = 0

    def __bool__(self) -> bool:
        return bool(self.recent) or self.count > 0

    def fold(self) -> None:
        """Add the recent losses to the running sum (on the device: no sync)."""
        if self.recent:
            chunk = torch.stack(self.recent).float().sum()
            self.total = chunk if self.total is None else self.total + chunk
            self.count += len(self.recent)
            self.recent.clear()

    def take_mean(self) -> tuple[torch.Tensor, int]:
        """The mean of every loss tracked, on the device, and how many; then start over."""
        self.fold()
        assert self.total is not None, "take_mean() on an empty tracker"
        mean, count = self.total / self.count, self.count
        self.total, self.count = None, 0
        return mean, count

    def saved(self) -> dict[str, Any]:
        """What a training state keeps of it (on the CPU), in the same order."""
        return {
            "losses": torch.stack(self.recent).cpu() if self.recent else None,
            "loss_total": None if self.total is None else self.total.cpu(),
            "loss_count": self.count,
        }

    def load(self, saved: dict[str, Any], device: torch.device) -> None:
        """Continue from :meth:`saved` (a state written before folding existed has no sum)."""
        losses, total = saved.get("losses"), saved.get("loss_total")
        self.recent = [] if losses is None else list(losses.to(device).unbind())
        self.total = None if total is None else total.to(device)
        self.count = int(saved.get("loss_count") or 0)


def log_mean(engine: Engine, losses: LossTracker) -> None:
    """Read the interval's mean loss (a host-device sync) into the state; emit ``loss_logged``.

    A mean that is not finite stops training when ``nonfinite_loss="stop"``.
    """
    if not losses:
        return
    mean_tensor, count = losses.take_mean()
    group = engine.dispatcher.group
    if group is not None:
        mean_tensor = group.mean(mean_tensor)
    mean = float(mean_tensor.item())  # host-device sync
    if not math.isfinite(mean) and engine.settings.nonfinite_loss == "stop":
        last = engine.state.get("iteration")
        reason = (
            f"the training loss is {mean} over steps {last - count + 1}-{last} (not "
            "finite): training stopped instead of going on with broken weights; lower the "
            "learning rate, clip gradients (gradient_clip_val=...) or check the data, or "
            "pass nonfinite_loss='skip' to skip such batches"
        )
        engine.policy.accept([Request(Stop(reason), NONFINITE_SOURCE, "loss_logged")])
    engine.state.update(train_loss=mean, **learning_rates(engine.optimizers, read_tensors=True))
    engine.dispatcher.emit("loss_logged", train_loss=mean)


def warn_skipped(engine: Engine, loss: torch.Tensor) -> None:
    """Name the training step whose loss ``nonfinite_loss="skip"`` skips."""
    snapshot = engine.state.snapshot()
    warnings.warn(
        f"the loss of training step {snapshot.iteration} (epoch {snapshot.current_epoch + 1}, "
        f"batch {snapshot.batch_idx}) is {float(loss.detach())}; the batch was skipped "
        "(nonfinite_loss='skip'): no backward, no optimizer update",
        TrainbusWarning,
        stacklevel=5,
    )
