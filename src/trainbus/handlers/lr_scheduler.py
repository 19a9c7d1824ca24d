"""LRSchedulerCallback: step a ``torch.optim.lr_scheduler`` scheduler from the training loop."""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, TypeAlias

import torch
from torch.optim.lr_scheduler import LRScheduler, ReduceLROnPlateau

from trainbus.engine.state import TrainerState
from trainbus.errors import (
    CheckpointError,
    ConfigurationError,
    ConfigurationTypeError,
    TrainbusWarning,
)
from trainbus.events.callback import Callback
from trainbus.handlers import priorities

Scheduler: TypeAlias = LRScheduler | ReduceLROnPlateau
SchedulerFactory: TypeAlias = Callable[[torch.optim.Optimizer], Scheduler]

_INTERVALS = ("epoch", "step")
_PROGRESS_KEYS = frozenset(
    {"last_epoch", "best", "num_bad_epochs", "cooldown_counter", "mode_worse"}
)
"""Scheduler attributes that record progress, not configuration (left out of ``config()``)."""


class LRSchedulerCallback(Callback):
    """Step a learning-rate scheduler: after optimizer steps, at epoch ends, or on a plateau.

    ``scheduler`` is either a factory called with the optimizer at ``train_start``, e.g.
    ``functools.partial(StepLR, step_size=2)`` or ``lambda opt: OneCycleLR(opt, 0.1, 100)``, or
    a scheduler already built on one of the Trainer's optimizers. A factory is usually what is
    wanted: :class:`~trainbus.SupervisedModel` builds its optimizer only when training starts.

    - ``interval="epoch"``: step at ``epoch_end`` of every ``frequency``-th epoch;
      ``interval="step"``: step after every ``frequency``-th optimizer step (skipped steps do
      not count).
    - ``monitor``: the metric a :class:`~torch.optim.lr_scheduler.ReduceLROnPlateau` reads. Such
      a scheduler steps at ``validation_end`` of every ``frequency``-th validation with
      ``metrics[monitor]`` (it requires ``monitor``, which other schedulers refuse, and the
      default ``interval="epoch"``).
    - ``optimizer_index``: which of the model's optimizers a factory receives. An already
      built scheduler drives its own optimizer; the index of that optimizer is recorded here.

    The Trainer puts the learning rates into ``state.learning_rates`` at each ``epoch_start``
    and after each optimizer step, where the logger and the metrics writer report them.

    Priority: :data:`~trainbus.handlers.priorities.DEFAULT` (0). At ``epoch_end`` and
    ``validation_end`` it runs before model checkpoints, training checkpoints and the logger
    (all negative there), so a saved training state holds the scheduler after its step; among
    user callbacks of priority 0 the order is that of registration.

    The scheduler's ``state_dict`` is part of every training state. On a resume it is loaded
    into the scheduler built at ``train_start``, and the optimizer's learning rates restored
    with the training state are kept (building a scheduler resets them), so a resumed run
    follows the interrupted schedule exactly.
    """

    priority = priorities.DEFAULT

    def __init__(
        self,
        scheduler: SchedulerFactory | Scheduler,
        *,
        interval: Literal["epoch", "step"] = "epoch",
        frequency: int = 1,
        monitor: str | None = None,
        optimizer_index: int = 0,
    ) -> None:
        built = _is_scheduler(scheduler)
        if not built and not callable(scheduler):
            raise ConfigurationTypeError(
                f"LRSchedulerCallback: scheduler={scheduler!r} is neither a learning-rate "
                "scheduler nor a factory of one; pass a callable taking the optimizer, e.g. "
                "functools.partial(torch.optim.lr_scheduler.StepLR, step_size=2)"
            )
        if not isinstance(interval, str) or interval not in _INTERVALS:
            raise ConfigurationError(
                f"LRSchedulerCallback: interval={interval!r} is not 'epoch' or 'step'; pass "
                "interval='epoch' to step at the end of epochs or interval='step' to step "
                "after optimizer steps"
            )
        if type(frequency) is not int or frequency < 1:
            raise ConfigurationError(
                f"LRSchedulerCallback: frequency={frequency!r} is not a positive integer; pass "
                "e.g. frequency=1 to step at every interval"
            )
        if monitor is not None and (not isinstance(monitor, str) or not monitor):
            raise ConfigurationError(
                f"LRSchedulerCallback: monitor={monitor!r} is not a metric name or None; pass "
                "the name of a metric given to Trainer(metrics=...), e.g. monitor='loss'"
            )
        if type(optimizer_index) is not int or optimizer_index < 0:
            raise ConfigurationError(
                f"LRSchedulerCallback: optimizer_index={optimizer_index!r} is not a "
                "non-negative integer; pass the position of the optimizer in the list "
                "build_optimizers returns, e.g. optimizer_index=0"
            )
        self.interval: Literal["epoch", "step"] = interval
        self.frequency = frequency
        self.monitor = monitor
        self._given_index = optimizer_index
        self._factory: SchedulerFactory | None = None
        self._given_scheduler: Scheduler | None = None
        if built:
            assert isinstance(scheduler, LRScheduler | ReduceLROnPlateau)
            self._check_kind(scheduler)
            self._given_scheduler = scheduler
        else:
            self._factory = scheduler  # type: ignore[assignment]
        self._clear_run()

    def _clear_run(self) -> None:
        """The state before ``train_start``: no scheduler built, nothing loaded or counted."""
        # Overwritten at train_start with the position of an already built scheduler's own
        # optimizer.
        self.optimizer_index = self._given_index
        self._scheduler: Scheduler | None = self._given_scheduler
        self._pending: Mapping[str, Any] | None = None
        self._steps = 0
        self._epochs = 0
        self._validations = 0

    def reset(self) -> None:
        """Forget the earlier run: a factory builds a new scheduler at the next ``train_start``.

        A scheduler passed already built is kept as it is, progress included: it is the
        argument this callback was given, and it cannot be rewound.
        """
        self._clear_run()

    @property
    def scheduler(self) -> Scheduler | None:
        """The scheduler being stepped (``None`` until ``train_start`` builds it)."""
        return self._scheduler

    def metric_names(self) -> tuple[str, ...]:
        """Metrics this callback reads (checked against the Trainer's metrics)."""
        return (self.monitor,) if self.monitor else ()

    # ----------------------------------------------------------------- events
    def on_train_start(self, *, optimizers: Sequence[torch.optim.Optimizer]) -> None:
        pending, self._pending = self._pending, None
        if self._factory is None:
            assert self._scheduler is not None
            self.optimizer_index = self._index_of_own_optimizer(self._scheduler, optimizers)
            if pending is not None:
                self._load(self._scheduler, pending)
            return
        current = self._scheduler
        if current is not None and any(current.optimizer is o for o in optimizers):
            # train() called again on the same Trainer: the schedule goes on.
            return
        optimizer = self._optimizer(optimizers)
        # Building a scheduler rewrites the optimizer's learning rates (and momenta); on a
        # resume they were just restored with the training state, so they are put back.
        saved_groups = _group_settings(optimizer) if pending is not None else None
        scheduler = self._build(optimizer)
        self._steps = self._epochs = self._validations = 0
        if pending is not None:
            self._load(scheduler, pending)
            assert saved_groups is not None
            _restore_group_settings(optimizer, saved_groups)
        self._scheduler = scheduler

    def on_optimizer_step_end(self) -> None:
        if self.interval != "step" or self._plateau():
            return
        self._steps += 1
        if self._steps % self.frequency == 0:
            self._step()

    def on_validation_end(self, *, metrics: Mapping[str, float]) -> None:
        if not self._plateau():
            return
        self._validations += 1
        if self._validations % self.frequency == 0:
            assert isinstance(self._scheduler, ReduceLROnPlateau) and self.monitor is not None
            self._scheduler.step(metrics[self.monitor])

    def on_epoch_end(self) -> None:
        if self.interval != "epoch" or self._plateau():
            return
        self._epochs += 1
        if self._epochs % self.frequency == 0:
            self._step()

    def on_train_end(self, *, state: TrainerState) -> None:
        if self._plateau() and self._validations == 0 and not state.should_stop:
            warnings.warn(
                f"LRSchedulerCallback: the ReduceLROnPlateau scheduler never stepped, because "
                f"no validation ran to give it {self.monitor!r}; pass a val_loader to "
                "Trainer.train",
                TrainbusWarning,
                stacklevel=2,
            )

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """The scheduler's ``state_dict`` with its class name and this callback's counters."""
        if self._pending is not None:
            return dict(self._pending)  # loaded, waiting for train_start
        scheduler = self._scheduler
        return {
            "scheduler": None if scheduler is None else scheduler.state_dict(),
            "class": None if scheduler is None else _class_path(type(scheduler)),
            "steps": self._steps,
            "epochs": self._epochs,
            "validations": self._validations,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Keep ``state`` until ``train_start`` has the scheduler to load it into."""
        self._pending = dict(state)

    def config(self) -> dict[str, Any]:
        """The scheduler's class and options with this callback's settings."""
        scheduler_class: str | None = None
        factory: str | None = None
        options: dict[str, Any] = {}
        target: Any = self._factory
        if isinstance(target, functools.partial):
            options = _plain_options(target.keywords)
            target = target.func
        if self._scheduler is not None:
            scheduler_class = _class_path(type(self._scheduler))
            options = _plain_options(self._scheduler.state_dict(), skip=_PROGRESS_KEYS)
        elif isinstance(target, type):
            scheduler_class = _class_path(target)
        if target is not None and not isinstance(target, type):
            factory = _class_path(target)
        return {
            "scheduler": scheduler_class,
            "factory": factory,
            "options": options,
            "interval": self.interval,
            "frequency": self.frequency,
            "monitor": self.monitor,
            "optimizer_index": self.optimizer_index,
        }

    # -------------------------------------------------------------- internals
    def _plateau(self) -> bool:
        return isinstance(self._scheduler, ReduceLROnPlateau)

    def _step(self) -> None:
        scheduler = self._scheduler
        if isinstance(scheduler, LRScheduler) and not isinstance(scheduler, ReduceLROnPlateau):
            scheduler.step()

    def _optimizer(self, optimizers: Sequence[torch.optim.Optimizer]) -> torch.optim.Optimizer:
        if self.optimizer_index >= len(optimizers):
            raise ConfigurationError(
                f"LRSchedulerCallback: optimizer_index={self.optimizer_index} but the model "
                f"built {len(optimizers)} optimizer(s); pass an index below {len(optimizers)}"
            )
        return optimizers[self.optimizer_index]

    def _build(self, optimizer: torch.optim.Optimizer) -> Scheduler:
        factory = self._factory
        assert factory is not None
        try:
            scheduler = factory(optimizer)
        except TypeError as exc:
            raise ConfigurationError(
                f"LRSchedulerCallback: calling the scheduler factory {factory!r} with the "
                f"optimizer failed ({exc}); pass a callable whose only missing argument is the "
                "optimizer, e.g. functools.partial(StepLR, step_size=2)"
            ) from exc
        if not _is_scheduler(scheduler):
            raise ConfigurationTypeError(
                f"LRSchedulerCallback: the scheduler factory {factory!r} returned "
                f"{scheduler!r}, not a torch.optim.lr_scheduler scheduler; return e.g. "
                "StepLR(optimizer, step_size=2)"
            )
        if scheduler.optimizer is not optimizer:
            raise ConfigurationError(
                f"LRSchedulerCallback: the scheduler factory {factory!r} built "
                f"{type(scheduler).__name__} on another optimizer than the one it was given "
                f"(optimizers[{self.optimizer_index}]); build it on the factory's argument"
            )
        self._check_kind(scheduler)
        return scheduler

    def _check_kind(self, scheduler: Scheduler) -> None:
        name = type(scheduler).__name__
        if isinstance(scheduler, ReduceLROnPlateau):
            if self.monitor is None:
                raise ConfigurationError(
                    f"LRSchedulerCallback: {name} reduces the learning rate when a metric "
                    "stops improving, but monitor is None; pass the metric, e.g. "
                    "monitor='loss'"
                )
            if self.interval != "epoch":
                raise ConfigurationError(
                    f"LRSchedulerCallback: interval={self.interval!r} cannot drive {name}: "
                    f"{self.monitor!r} is computed by validation, where it steps; leave "
                    "interval='epoch' (the default) and set frequency in validations"
                )
        elif self.monitor is not None:
            raise ConfigurationError(
                f"LRSchedulerCallback: monitor={self.monitor!r} is given, but {name} does not "
                "read a metric; drop monitor, or use ReduceLROnPlateau"
            )

    def _index_of_own_optimizer(
        self, scheduler: Scheduler, optimizers: Sequence[torch.optim.Optimizer]
    ) -> int:
        for index, optimizer in enumerate(optimizers):
            if scheduler.optimizer is optimizer:
                return index
        raise ConfigurationError(
            f"LRSchedulerCallback: the {type(scheduler).__name__} instance drives an optimizer "
            f"that is not one of the Trainer's {len(optimizers)} optimizer(s). "
            "SupervisedModel (and any model building its optimizers in build_optimizers) "
            "creates them when training starts, so a scheduler built beforehand cannot drive "
            "them; pass a factory instead, e.g. "
            "LRSchedulerCallback(functools.partial(StepLR, step_size=2))"
        )

    def _load(self, scheduler: Scheduler, state: Mapping[str, Any]) -> None:
        saved_class = state.get("class")
        current = _class_path(type(scheduler))
        if saved_class is not None and saved_class != current:
            raise CheckpointError(
                f"LRSchedulerCallback: the training state holds the state of a {saved_class} "
                f"scheduler, but this run built a {current}; resume with the same scheduler"
            )
        saved = state.get("scheduler")
        if saved is not None:
            scheduler.load_state_dict(saved)
        self._steps = int(state.get("steps", 0))
        self._epochs = int(state.get("epochs", 0))
        self._validations = int(state.get("validations", 0))


def _is_scheduler(value: object) -> bool:
    return isinstance(value, LRScheduler | ReduceLROnPlateau)


def _class_path(target: Any) -> str:
    module = getattr(target, "__module__", None) or type(target).__module__
    name = getattr(target, "__qualname__", None) or type(target).__qualname__
    return f"{module}.{name}"


def _group_settings(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """Every hyperparameter of every group, with tensors copied (schedulers fill them in place)."""
    return [
        {
            key: value.clone() if isinstance(value, torch.Tensor) else value
            for key, value in group.items()
            if key != "params"
        }
        for group in optimizer.param_groups
    ]


def _restore_group_settings(
    optimizer: torch.optim.Optimizer, settings: Sequence[Mapping[str, Any]]
) -> None:
    for group, saved in zip(optimizer.param_groups, settings, strict=True):
        for key, value in saved.items():
            current = group.get(key)
            if isinstance(current, torch.Tensor) and isinstance(value, torch.Tensor):
                current.copy_(value)  # the same tensor may be shared with a fused step
            else:
                group[key] = value


def _plain_options(values: Mapping[str, Any], skip: frozenset[str] = frozenset()) -> dict[str, Any]:
    """Public plain values of ``values`` (what ``maps.json`` can hold), non-finite ones as text."""
    options: dict[str, Any] = {}
    for key, value in values.items():
        if not isinstance(key, str) or key.startswith("_") or key in skip:
            continue
        if isinstance(value, float) and not math.isfinite(value):
            options[key] = repr(value)
        elif isinstance(value, str | int | float | bool | None):
            options[key] = value
        elif isinstance(value, list | tuple) and all(
            isinstance(item, int | float) and not isinstance(item, bool) for item in value
        ):
            options[key] = [item if math.isfinite(item) else repr(item) for item in value]
    return options
