"""What a command may do at which boundary: the one place that decides.

Handlers return commands (:mod:`trainbus.events.commands`); the loop hands every request here
and asks, at each boundary, what to carry out. The rules keep a resume exact:

- :class:`~trainbus.Stop` is recorded at once (the first stop is the one reported). The loop
  leaves the epoch at the end of the current step; a final stop drops an open accumulation
  group, a resumable stop (a pause) trains on to the end of the group, so that the training
  state it writes continues exactly. Once the training loop has ended (``train_end``, a
  background write's ``checkpoint`` after it, ``teardown``) a stop has nothing to stop: it
  is kept in the call's record, named in a warning, and not reported as the run's stop.
  What ``exception`` handlers return is discarded.
- :class:`~trainbus.SkipStep` acts only at the skippable event that returned it; the loop
  decides it right there.
- :class:`~trainbus.SaveCheckpoint` (weights) is written at the next boundary: the end of a
  step, of an epoch, the start or end of training, or an evaluation batch of
  ``validate``/``test``/``predict``.
- :class:`~trainbus.SaveTrainingState` is written only where a resume is exact: the end of a
  step with no accumulation group open, the end of an epoch, the start or end of training.
  A request made mid-step (at ``batch_start``, or by an event a handler emits there) waits for
  the step's end; one made outside ``train()`` is dropped with a warning.

Requests emitted with ``Trainer.emit`` follow the same rules as the loop's own events. Every
request is recorded with its source in the call's record in ``maps.json``.
"""

from __future__ import annotations

import enum
import warnings
from collections.abc import Callable, Sequence
from typing import Any

from trainbus.engine.state import StateKeeper
from trainbus.errors import TrainbusWarning
from trainbus.events.commands import (
    Request,
    SaveCheckpoint,
    SaveTrainingState,
    SkipStep,
    Stop,
    merge,
)


class Boundary(enum.Enum):
    """A point of a call where requested saves may be carried out."""

    STEP = "step"
    """After ``batch_end``: the training step is complete."""
    EPOCH = "epoch"
    """After ``epoch_end``."""
    TRAINING = "training"
    """After ``train_start`` and after ``train_end``."""
    EVALUATION = "evaluation"
    """After an evaluation batch or the end event of ``validate``/``test``/``predict``."""


BoundaryHook = Callable[[Boundary, str], None]
"""What the loop calls at a boundary: ``(boundary, the event just announced)``."""


class CommandPolicy:
    """Collects the requests of one call and releases each at a boundary where it is safe."""

    __slots__ = ("_record", "_state", "closed", "open_group", "pending", "training")

    def __init__(self, state: StateKeeper) -> None:
        self._state = state
        self.pending: list[Request] = []
        """Saves waiting for a boundary (one list for the policy's life: the loop holds it)."""
        self._record: list[dict[str, Any]] | None = None
        self.open_group = 0
        """Backward passes accumulated since the last optimizer step."""
        self.training = False
        self.closed = False
        """Whether the call's loop has ended: a stop requested now has nothing to stop."""

    def begin_call(self, record: list[dict[str, Any]], *, training: bool) -> None:
        """A call starts clean: no stop or request of an earlier call carries over."""
        self.pending.clear()
        self._record = record
        self.open_group = 0
        self.training = training
        self.closed = False
        self._state.update(stopped_by=None, stop_reason=None, stop_resumable=False)

    def close(self) -> None:
        """The call's loop has ended (or failed): from now on a stop has nothing to stop."""
        self.closed = True

    def end_call(self, *, failed: bool = False) -> None:
        """Forget what the call left undone: a save asked after its last boundary.

        Such a request (at ``teardown``, or at a ``checkpoint`` event of the last background
        write) has no boundary left to be written at; unless the call failed, a warning names
        each one.
        """
        if self.pending and not failed:
            asked = "; ".join(f"{r.command!r} from {r.source} at {r.event!r}" for r in self.pending)
            warnings.warn(
                f"not written: {asked}: asked after the call's last boundary, where nothing "
                "is saved any more; ask for it at train_end (or earlier) instead",
                TrainbusWarning,
                stacklevel=2,
            )
        self.pending.clear()
        self._record = None
        self.training = False

    def accept(self, requests: Sequence[Request]) -> None:
        """Take requests the whole world agreed on (in dispatch order)."""
        state = self._state
        for request in requests:
            command = request.command
            if isinstance(command, Stop) and self.closed:
                warnings.warn(
                    f"{request.source} returned {command!r} at {request.event!r}, after the "
                    "loop had ended: there is nothing left to stop, so it is not reported as "
                    "the run's stop; return Stop from an event inside the loop (epoch_end, "
                    "batch_end, ...)",
                    TrainbusWarning,
                    stacklevel=2,
                )
            elif isinstance(command, Stop) and state.get("stopped_by") is None:
                state.update(
                    stopped_by=request.source,
                    stop_reason=command.reason or f"requested at {request.event}",
                    stop_resumable=command.resumable,
                )
            elif isinstance(command, SaveCheckpoint | SaveTrainingState):
                self.pending.append(request)
        if self._record is not None:
            self._record.extend(
                {"event": r.event, "source": r.source, "command": repr(r.command)}
                for r in requests
                if not isinstance(r.command, SkipStep)
            )

    @property
    def stop_requested(self) -> bool:
        """Whether a stop was requested during this call."""
        return self._state.get("stopped_by") is not None

    @property
    def ends_epoch(self) -> bool:
        """Whether the loop leaves the epoch now: stopped, and no pause waits for its group."""
        if self._state.get("stopped_by") is None:
            return False
        return not self._state.get("stop_resumable") or self.open_group == 0

    @property
    def has_pending(self) -> bool:
        """Whether a save waits for a boundary."""
        return bool(self.pending)

    def due(self, boundary: Boundary) -> tuple[tuple[Request, ...], Request | None]:
        """The weights to write at ``boundary``, then the training state to write (or None)."""
        if not self.pending:
            return (), None
        decision = merge(self.pending)
        self.pending.clear()
        training_state = decision.training_state
        if training_state is None:
            return decision.saves, None
        if not self.training:
            warnings.warn(
                f"{training_state.source} asked for a training state at "
                f"{training_state.event!r} outside train(); a training state records a "
                "training run's position, so none was written (SaveCheckpoint writes weights)",
                TrainbusWarning,
                stacklevel=2,
            )
            return decision.saves, None
        if boundary is Boundary.EVALUATION or self.open_group:
            # Mid-step or inside an accumulation group: the gradients are not part of a
            # training state, so it waits for the end of the step or of the group.
            self.pending.append(training_state)
            return decision.saves, None
        return decision.saves, training_state
