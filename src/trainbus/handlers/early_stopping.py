"""EarlyStoppingCallback: stop when a monitored metric stops improving, or crosses a limit."""

from __future__ import annotations

import hashlib
import math
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from trainbus.engine import checkpoint as checkpoints
from trainbus.engine.compute import finite_number
from trainbus.engine.maps import CHECKPOINTS_DIR, Maps
from trainbus.engine.metrics import MetricInfo
from trainbus.engine.model import Model
from trainbus.engine.state import TrainerState
from trainbus.engine.weights import load_weights
from trainbus.errors import (
    CheckpointError,
    ConfigurationError,
    ConfigurationTypeError,
    TrainbusWarning,
)
from trainbus.events.callback import Callback
from trainbus.events.commands import Command, SaveCheckpoint, Stop
from trainbus.handlers import priorities
from trainbus.handlers.monitored import (
    Mode,
    check_mode,
    known_mode,
    mode_from_name,
    resolve_mode,
    warn_never_computed,
)

_OWNER = "EarlyStoppingCallback"
_TAG_PREFIX = "early-stopping-"
_TAG_LIMIT = 128
_ID_LIMIT = 40
_UNSAFE = re.compile(r"[^A-Za-z0-9._=-]+")
_DOTS = re.compile(r"\.{2,}")


class EarlyStoppingCallback(Callback):
    """Stop training when ``metric`` stops improving, reaches a goal, diverges or is not finite.

    The callback reads ``metric`` at every validation inside ``train()`` (``validation_end``)
    and returns a :class:`~trainbus.Stop` whose reason names the metric, its best value and
    the epoch of that value (counted from 1 out of ``max_epochs``, as the console shows it:
    ``epoch 3/10`` is ``state.current_epoch == 2``), and what ended training: the
    validations waited, the threshold crossed or the non-finite value. The Trainer records it
    in ``state.stop_reason`` and ``maps.json``. A ``train()`` call that never validates
    (no ``val_loader``) gives a :class:`~trainbus.errors.TrainbusWarning` at its start: the
    metric is never computed, so nothing can stop training. Options:

    - ``patience``: validations in a row without improvement before stopping (not epochs:
      with ``val_every_n_epochs=k`` they are ``k`` epochs apart).
    - ``mode``: ``"min"`` or ``"max"``. Left out, it is taken from the metric when the
      Trainer is built: its torchmetrics ``higher_is_better`` (``Accuracy`` goes up), a
      :class:`~trainbus.LossMetricConfig` goes down, and so does a loss's or an error's name
      (``loss``, ``val_loss``, ``top1_error``, ``mse``, ...); when nothing tells, the Trainer
      is refused. A mode that contradicts the metric's declared ``higher_is_better`` is kept,
      with a :class:`~trainbus.errors.TrainbusWarning`.
    - ``min_delta`` (>= 0) and ``min_delta_mode``: an improvement must beat the best value by
      more than ``min_delta`` (``"abs"``) or by more than ``abs(best) * min_delta``
      (``"rel"``); equal values never improve.
    - ``stopping_threshold``: stop as soon as the metric reaches it (``<=`` for ``"min"``,
      ``>=`` for ``"max"``): the goal is met.
    - ``divergence_threshold``: stop as soon as the metric is worse than it (``>`` for
      ``"min"``, ``<`` for ``"max"``): training went off the rails.
    - ``check_finite``: stop when the metric is NaN or infinite. With ``False`` a NaN never
      improves (it counts as a validation without improvement) and infinities compare as
      numbers.
    - ``start_from_epoch``: warm-up. Validations of epochs with ``state.current_epoch <
      start_from_epoch`` are ignored entirely: no best value is recorded, patience does not
      count and none of the conditions above stops training.
    - ``restore_best_weights``: at every improvement the weights are saved under
      ``checkpoints/<checkpoint_tag>/`` in the MAPS (e.g. ``early-stopping-best-loss``); when
      training ends they are loaded back into the model (at ``teardown``, after the final
      training state was written) unless it already holds them, so the model ``train()``
      leaves behind is the best one, however training ended, while every training state
      holds the weights training really reached (a resume continues from those).

    Everything survives a resume: the best value, its epoch, the patience count and the
    path of the best checkpoint are part of :meth:`state_dict`.
    """

    priority = priorities.DEFAULT

    def __init__(
        self,
        metric: str,
        patience: int = 10,
        *,
        mode: Mode | None = None,
        min_delta: float = 0.0,
        min_delta_mode: Literal["abs", "rel"] = "abs",
        stopping_threshold: float | None = None,
        divergence_threshold: float | None = None,
        check_finite: bool = True,
        start_from_epoch: int = 0,
        restore_best_weights: bool = False,
    ) -> None:
        if not isinstance(metric, str):
            raise ConfigurationTypeError(
                f"{_OWNER}: metric={metric!r} is not a string; pass the name of a metric given "
                "to Trainer(metrics=...), e.g. metric='loss'"
            )
        if not metric:
            raise ConfigurationError(
                f"{_OWNER}: metric={metric!r} is not a metric name; pass the name of a metric "
                "given to Trainer(metrics=...), e.g. metric='loss'"
            )
        if type(patience) is not int:
            raise ConfigurationTypeError(
                f"{_OWNER}: patience={patience!r} is not a positive integer (validations "
                "without improvement before stopping); pass e.g. patience=10"
            )
        if patience < 1:
            raise ConfigurationError(
                f"{_OWNER}: patience={patience!r} is not a positive integer (validations "
                "without improvement before stopping); pass e.g. patience=10"
            )
        given_mode = check_mode(mode, _OWNER)
        _check_number("min_delta", min_delta)
        if min_delta < 0:
            raise ConfigurationError(
                f"{_OWNER}: min_delta={min_delta!r} is not a finite number >= 0; it is the "
                "margin an improvement must exceed, e.g. min_delta=0.001"
            )
        if min_delta_mode not in ("abs", "rel"):
            raise ConfigurationError(
                f"{_OWNER}: min_delta_mode={min_delta_mode!r} is not 'abs' or 'rel'; 'abs' "
                "compares with min_delta itself, 'rel' with abs(best) * min_delta"
            )
        if stopping_threshold is not None:
            _check_number("stopping_threshold", stopping_threshold, none_allowed=True)
        if divergence_threshold is not None:
            _check_number("divergence_threshold", divergence_threshold, none_allowed=True)
        for name, flag in (
            ("check_finite", check_finite),
            ("restore_best_weights", restore_best_weights),
        ):
            if not isinstance(flag, bool):
                raise ConfigurationTypeError(
                    f"{_OWNER}: {name}={flag!r} is not a bool; pass True or False"
                )
        if type(start_from_epoch) is not int:
            raise ConfigurationTypeError(
                f"{_OWNER}: start_from_epoch={start_from_epoch!r} is not an integer; pass the "
                "0-based epoch from which validations count, e.g. start_from_epoch=5"
            )
        if start_from_epoch < 0:
            raise ConfigurationError(
                f"{_OWNER}: start_from_epoch={start_from_epoch!r} is negative; pass the 0-based "
                "epoch from which validations count (0 counts every validation)"
            )
        self.metric = metric
        self.patience = patience
        self._given_mode = given_mode
        # None until the Trainer tells the metric's direction (resolve_metrics).
        self.mode: Mode | None = given_mode or mode_from_name(metric)
        self.min_delta = float(min_delta)
        self.min_delta_mode: Literal["abs", "rel"] = min_delta_mode
        self.stopping_threshold = None if stopping_threshold is None else float(stopping_threshold)
        self.divergence_threshold = (
            None if divergence_threshold is None else float(divergence_threshold)
        )
        self.check_finite = check_finite
        self.start_from_epoch = start_from_epoch
        self.restore_best_weights = restore_best_weights
        self._check_thresholds(_OWNER)
        self._clear_run()

    def _clear_run(self) -> None:
        """The state of a run before its first validation."""
        self.best: float | None = None
        self.best_epoch: int | None = None
        self.best_iteration: int | None = None
        self.wait = 0
        self.best_checkpoint: Path | None = None
        self.checkpoint_iteration: int | None = None
        self._restore_pending = False

    def reset(self) -> None:
        """Forget the best value, its epoch, the patience count and the best checkpoint.

        The checkpoint itself stays in the earlier run's MAPS: only this callback forgets it,
        so the new run saves and restores its own best weights.
        """
        self._clear_run()

    # ----------------------------------------------------------------- options
    def metric_names(self) -> tuple[str, ...]:
        """Metrics this callback reads (checked against the Trainer's metrics)."""
        return (self.metric,)

    def resolve_metrics(self, metrics: Mapping[str, MetricInfo]) -> None:
        """Take ``mode`` from the monitored metric (called when a Trainer registers it).

        Raises :class:`~trainbus.errors.ConfigurationError` when neither ``mode``, the metric
        nor its name tells the direction.
        """
        self.mode = resolve_mode(
            self.callback_id, self.metric, self._given_mode, metrics.get(self.metric)
        )
        self._check_thresholds(self.callback_id)

    def _check_thresholds(self, owner: str) -> None:
        stopping, divergence, mode = self.stopping_threshold, self.divergence_threshold, self.mode
        if stopping is None or divergence is None or mode is None:
            return
        if stopping < divergence if mode == "min" else stopping > divergence:
            return
        relation = "below" if mode == "min" else "above"
        raise ConfigurationError(
            f"{owner}: stopping_threshold={stopping!r} is not {relation} "
            f"divergence_threshold={divergence!r} for mode={mode!r}; every value would stop "
            "training: the goal must lie on the improving side of the divergence limit"
        )

    def _direction(self) -> Mode:
        return known_mode(self.callback_id, self.metric, self.mode)

    def config(self) -> dict[str, Any]:
        """Every option, as written into ``maps.json``."""
        return {
            "metric": self.metric,
            "patience": self.patience,
            "mode": self.mode,
            "min_delta": self.min_delta,
            "min_delta_mode": self.min_delta_mode,
            "stopping_threshold": self.stopping_threshold,
            "divergence_threshold": self.divergence_threshold,
            "check_finite": self.check_finite,
            "start_from_epoch": self.start_from_epoch,
            "restore_best_weights": self.restore_best_weights,
        }

    @property
    def checkpoint_tag(self) -> str:
        """The ``checkpoints/`` name of the best weights, unique to this callback's id.

        ``early-stopping-best-<metric>`` for the first instance, ``early-stopping-<n>-best-
        <metric>`` for the n-th (``callback_id`` ``EarlyStoppingCallback#n``), and
        ``early-stopping-id-<callback_id>-best-<metric>`` for any other id; characters outside
        ``[A-Za-z0-9._=-]`` become ``-`` (a short hash keeps a rewritten id unique).
        """
        callback_id = self.callback_id
        base = type(self).__name__
        if callback_id == base:
            owner = ""
        elif re.fullmatch(rf"{re.escape(base)}#\d+", callback_id):
            owner = callback_id[len(base) + 1 :] + "-"
        else:
            safe = _safe(callback_id)
            if safe != callback_id or len(safe) > _ID_LIMIT:
                safe = f"{safe[:_ID_LIMIT]}-{_short_hash(callback_id)}"
            owner = f"id-{safe}-"
        head = f"{_TAG_PREFIX}{owner}best-"
        metric = _safe(self.metric)
        if len(head) + len(metric) > _TAG_LIMIT:
            # Cut to the limit of a checkpoint name; the hash keeps long names apart.
            suffix = f"-{_short_hash(self.metric)}"
            metric = metric[: _TAG_LIMIT - len(head) - len(suffix)] + suffix
        return _DOTS.sub(".", head + metric)

    # ------------------------------------------------------------------ events
    def on_train_start(self, *, state: TrainerState, validates: bool) -> None:
        if not validates and state.rank == 0:
            warn_never_computed(
                self.callback_id, self.metric, "early stopping never stops training"
            )

    def on_validation_end(
        self, *, state: TrainerState, metrics: Mapping[str, float]
    ) -> list[Command] | None:
        epoch = state.current_epoch
        if epoch < self.start_from_epoch:
            return None
        value = float(metrics[self.metric])
        commands: list[Command] = []
        if self.check_finite and not math.isfinite(value):
            return [
                Stop(
                    f"{self.metric} is {value!r} at {_epoch_text(epoch, state)}, not a finite "
                    f"number; {self._best_text(state)}"
                )
            ]
        if self._improves(value):
            self.best = value
            self.best_epoch = epoch
            self.best_iteration = state.iteration
            self.wait = 0
            if self.restore_best_weights:
                commands.append(self._save_request())
        else:
            self.wait += 1
        stop = self._stop_reason(value, state)
        if stop is not None:
            commands.append(Stop(stop))
        return commands or None

    def on_checkpoint(self, *, state: TrainerState, checkpoint: Path, tag: str, kind: str) -> None:
        if kind == "weights" and self.restore_best_weights and tag == self.checkpoint_tag:
            self.best_checkpoint = Path(checkpoint)
            self.checkpoint_iteration = state.iteration

    def on_resume(self, *, state: TrainerState, maps: Maps) -> SaveCheckpoint | None:
        """Find the best weights again in the MAPS (it may have moved, or the save be missing).

        The MAPS may have been moved, or the run killed after the training state of a
        boundary was written but before the weights of a later improvement were.
        """
        if not self.restore_best_weights or self.best_iteration is None:
            return None
        path = maps.file(CHECKPOINTS_DIR, self.checkpoint_tag)
        if _saved_at(path) == self.best_iteration:
            self.best_checkpoint = path
            self.checkpoint_iteration = self.best_iteration
            return None
        self.best_checkpoint = None
        self.checkpoint_iteration = None
        if state.iteration == self.best_iteration:
            # The restored weights are the best ones: save them again.
            return self._save_request()
        warnings.warn(
            f"{self.callback_id}: the best weights of {self.metric} "
            f"({_epoch_text(self.best_epoch, state)}) are not in {path} (missing, corrupt, or "
            "from another epoch); "
            "restore_best_weights will restore only a later improvement",
            TrainbusWarning,
            stacklevel=2,
        )
        return None

    def on_train_end(self, *, state: TrainerState) -> None:
        self._restore_pending = not (
            not self.restore_best_weights
            or self.best_checkpoint is None
            or self.checkpoint_iteration != self.best_iteration
            or state.iteration == self.best_iteration  # the model holds the best weights
        )

    def on_teardown(self, *, model: Model) -> None:
        # After train_end's training state is written: that state keeps the last weights.
        if self._restore_pending and self.best_checkpoint is not None:
            self._restore_pending = False
            load_weights(self.best_checkpoint, model)

    # ------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "mode": self.mode,
            "best": self.best,
            "best_epoch": self.best_epoch,
            "best_iteration": self.best_iteration,
            "wait": self.wait,
            "best_checkpoint": None if self.best_checkpoint is None else str(self.best_checkpoint),
            "checkpoint_iteration": self.checkpoint_iteration,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        saved = (state.get("metric", self.metric), state.get("mode", self.mode))
        if saved != (self.metric, self.mode):
            warnings.warn(
                f"{self.callback_id}: the saved state monitors {saved[0]!r} (mode={saved[1]!r}), "
                f"this callback {self.metric!r} (mode={self.mode!r}); the saved best value and "
                "patience count are not used and monitoring starts afresh",
                TrainbusWarning,
                stacklevel=2,
            )
            return
        best = state.get("best")
        self.best = None if best is None else float(best)
        self.best_epoch = _optional_int(state.get("best_epoch"))
        self.best_iteration = _optional_int(state.get("best_iteration"))
        self.wait = int(state.get("wait", 0))
        path = state.get("best_checkpoint")
        self.best_checkpoint = None if path is None else Path(path)
        self.checkpoint_iteration = _optional_int(state.get("checkpoint_iteration"))

    # ----------------------------------------------------------------- helpers
    def _improves(self, value: float) -> bool:
        if math.isnan(value):
            return False
        best = self.best
        if best is None:
            return True
        margin = self.min_delta if self.min_delta_mode == "abs" else abs(best) * self.min_delta
        if not math.isfinite(best):
            margin = 0.0  # inf - inf is NaN: an infinite best is beaten by any finite value
        if self._direction() == "min":
            return value < best - margin
        return value > best + margin

    def _stop_reason(self, value: float, state: TrainerState) -> str | None:
        minimising = self._direction() == "min"
        epoch = _epoch_text(state.current_epoch, state)
        goal = self.stopping_threshold
        if goal is not None and (value <= goal if minimising else value >= goal):
            return (
                f"{self.metric} reached stopping_threshold={goal!r}: {value!r} at {epoch}; "
                f"{self._best_text(state)}"
            )
        limit = self.divergence_threshold
        if limit is not None and (value > limit if minimising else value < limit):
            return (
                f"{self.metric} diverged: {value!r} at {epoch} is worse than "
                f"divergence_threshold={limit!r}; {self._best_text(state)}"
            )
        if self.wait >= self.patience:
            relative = " relative" if self.min_delta_mode == "rel" else ""
            return (
                f"{self.metric} did not improve for {self.wait} validations; "
                f"{self._best_text(state)} (mode={self.mode}, "
                f"min_delta={self.min_delta}{relative})"
            )
        return None

    def _best_text(self, state: TrainerState) -> str:
        if self.best is None:
            return "no best value yet"
        where = "" if self.best_epoch is None else f" at {_epoch_text(self.best_epoch, state)}"
        return f"best {self.best!r}{where}"

    def _save_request(self) -> SaveCheckpoint:
        return SaveCheckpoint(
            self.checkpoint_tag,
            metadata=(("metric", self.metric), ("value", self.best), ("mode", self.mode)),
        )


def _epoch_text(epoch: int | None, state: TrainerState) -> str:
    """An epoch as people read it on the console: ``epoch 3/10`` for ``current_epoch`` 2."""
    return f"epoch {'?' if epoch is None else epoch + 1}/{state.max_epochs}"


def _check_number(name: str, value: object, *, none_allowed: bool = False) -> None:
    alternative = " or None" if none_allowed else ""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigurationTypeError(
            f"{_OWNER}: {name}={value!r} is not a number{alternative}; pass a finite float"
        )
    if not finite_number(value):
        raise ConfigurationError(
            f"{_OWNER}: {name}={value!r} is not a finite number; pass a finite float{alternative}"
        )


def _optional_int(value: Any) -> int | None:
    return None if value is None else int(value)


def _safe(text: str) -> str:
    return _DOTS.sub(".", _UNSAFE.sub("-", text))


def _short_hash(text: str) -> str:
    return hashlib.sha1(text.encode(), usedforsecurity=False).hexdigest()[:8]


def _saved_at(path: Path) -> int | None:
    """The iteration at which the checkpoint at ``path`` was written; None if it is unusable."""
    try:
        manifest = checkpoints.read_manifest(path)
    except CheckpointError:
        return None
    iteration = manifest.get("metadata", {}).get("iteration")
    return iteration if isinstance(iteration, int) else None
