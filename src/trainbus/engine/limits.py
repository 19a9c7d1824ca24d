"""How much the loop runs: batches per epoch and per validation, steps, time, mid-epoch checks.

The Trainer's ``max_steps``, ``max_time``, ``limit_train_batches``, ``limit_val_batches`` and
``val_check_interval`` are applied here, so the loop only asks: how many batches this epoch,
when to validate inside it, and whether a limit ended the run.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Iterable, Iterator
from typing import Any

from trainbus.engine.batches import length, reliable_length
from trainbus.engine.settings import LoopSettings
from trainbus.errors import DataError
from trainbus.events.commands import Request, SaveTrainingState, Stop

MAX_STEPS_SOURCE = "trainbus.max_steps"
"""``state.stopped_by`` when ``max_steps`` paused training inside an epoch."""
MAX_TIME_SOURCE = "trainbus.max_time"
"""``state.stopped_by`` when ``max_time`` paused training."""


def limited(limit: int | float, total: int | None, setting: str, loader: str) -> int | None:
    """The batches to use of a loader of ``total`` batches (None: all of an unsized one)."""
    if type(limit) is int:
        return limit if total is None else min(limit, total)
    if limit == 1.0:
        return total  # the float 1.0: every batch
    if total is None:
        raise DataError(
            f"{setting}={limit!r} is a fraction of the batches, but {loader} has no length "
            "(an iterable or IterableDataset); pass a number of batches instead, e.g. "
            f"{setting}=100"
        )
    # At least one batch of a non-zero fraction, as a smoke test would expect.
    return max(1, int(total * limit)) if limit > 0 else 0


def epoch_batches(settings: LoopSettings, loader: Iterable[Any]) -> tuple[int | None, int | None]:
    """``(num_batches, exact)``: the batches of one training epoch, and the same when exact.

    ``num_batches`` is what ``state.num_batches`` shows (``len(loader)`` limited);
    ``exact`` is None where the length is only an estimate (an IterableDataset).
    """
    limit = settings.limit_train_batches
    num_batches = limited(limit, length(loader), "limit_train_batches", "train_loader")
    exact = reliable_length(loader)
    if exact is not None:
        exact = limited(limit, exact, "limit_train_batches", "train_loader")
    return num_batches, exact


def epoch_cap(settings: LoopSettings, num_batches: int | None) -> int | None:
    """Where ``limit_train_batches`` cuts an epoch (None: it does not)."""
    limit = settings.limit_train_batches
    return None if type(limit) is float and limit == 1.0 else num_batches


def take(batches: Iterator[Any], count: int | None) -> Iterator[Any]:
    """At most ``count`` of ``batches`` (all of them for None)."""
    return batches if count is None else itertools.islice(batches, count)


def evaluation_batches(settings: LoopSettings, loader: Iterable[Any]) -> Iterable[Any]:
    """The validation batches ``limit_val_batches`` leaves of ``loader``."""
    limit = settings.limit_val_batches
    if type(limit) is float and limit == 1.0:
        return loader
    count = limited(limit, length(loader), "limit_val_batches", "val_loader")
    return loader if count is None else itertools.islice(loader, count)


def check_interval(settings: LoopSettings, num_batches: int | None) -> int | None:
    """Training batches between two validations inside an epoch (None: at its end only)."""
    interval = settings.val_check_interval
    if interval is None or type(interval) is int:
        return interval
    if num_batches is None:
        raise DataError(
            f"val_check_interval={interval!r} is a fraction of an epoch, but train_loader has "
            "no length; pass a number of training batches instead, e.g. val_check_interval=500"
        )
    return max(1, int(num_batches * interval))


def stepping_batches(settings: LoopSettings, loader: Iterable[Any]) -> int | None:
    """The optimizer steps a run over ``loader`` takes (None: unknown, no length and no limit).

    ``max_epochs`` times the steps of one epoch (accumulation groups, a short last group
    included, of the limited batches; under torchrun ``loader`` is this rank's share),
    capped by ``max_steps``.
    """
    num_batches, _ = epoch_batches(settings, loader)
    steps = settings.max_steps
    if num_batches is None:
        return steps
    per_epoch = math.ceil(num_batches / settings.accumulate_grad_batches)
    total = per_epoch * settings.max_epochs
    return total if steps is None else min(total, steps)


class Limits:
    """The step and time limits of one ``train()`` call."""

    __slots__ = ("deadline", "max_steps", "max_time", "requested")

    def __init__(self, settings: LoopSettings) -> None:
        self.max_steps = settings.max_steps
        self.max_time = settings.max_time
        self.deadline = None if self.max_time is None else time.monotonic() + self.max_time
        self.requested = False

    @property
    def active(self) -> bool:
        """Whether any limit needs checking after each batch."""
        return self.max_steps is not None or self.max_time is not None

    def steps_done(self, global_step: int) -> bool:
        """Whether ``max_steps`` optimizer steps were taken."""
        return self.max_steps is not None and global_step >= self.max_steps

    def out_of_time(self) -> bool:
        """Whether this call's ``max_time`` is spent."""
        return self.deadline is not None and time.monotonic() >= self.deadline

    def pause(self, global_step: int, event: str) -> list[Request]:
        """A resumable stop and a training state, for a limit reached inside an epoch."""
        self.requested = True
        if self.steps_done(global_step):
            source, reason = MAX_STEPS_SOURCE, f"max_steps={self.max_steps} reached"
        else:
            source, reason = MAX_TIME_SOURCE, f"max_time={self.max_time:g}s reached"
        return [
            Request(Stop(reason, resumable=True), source, event),
            Request(SaveTrainingState(reason), source, event),
        ]


def validates(settings: LoopSettings, val_loader: object) -> bool:
    """Whether a ``train()`` call with ``val_loader`` validates at all (before any stop)."""
    if val_loader is None or settings.limit_val_batches == 0:
        return False
    return (
        settings.val_every_n_epochs <= settings.max_epochs
        or settings.validate_last_epoch
        or settings.val_check_interval is not None
    )
