"""Carrying out saves at a boundary: weights checkpoints and training states.

The loop calls :meth:`Saver.at_boundary`; the :class:`~trainbus.engine.policy.CommandPolicy`
says what is due there. A stop signal (SIGTERM, SIGINT) becomes a resumable stop and a
training state here, at the first boundary after it arrived. Every MAPS write runs on rank 0
only; every rank gets its result.
"""

from __future__ import annotations

import functools
import signal
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from trainbus.engine import checkpoint
from trainbus.engine.core import Engine, plain_values
from trainbus.engine.policy import Boundary
from trainbus.engine.resume import capture_loader_generators, capture_random_states
from trainbus.events.commands import Request, SaveCheckpoint, SaveTrainingState, Stop

if TYPE_CHECKING:
    from trainbus.engine.loop import TrainingLoop

T = TypeVar("T")

SIGNAL_SOURCE = "trainbus.signal"
"""``state.stopped_by`` when SIGTERM or SIGINT stopped training."""

STATE_FORMAT = "trainbus-training-state/1"
"""Format of a training state's ``state.json``."""


class Saver:
    """Writes what the policy releases at each boundary."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.loop: TrainingLoop | None = None
        self.last_training_state: str | None = None
        """Where the training state written last lies, if one was."""

    def at_boundary(self, boundary: Boundary, event: str) -> None:
        """Carry out what is due at ``boundary`` (reached right after ``event``)."""
        policy = self.engine.policy
        if policy.training and boundary is not Boundary.EVALUATION:
            self._stop_on_signal(event)
        if not policy.has_pending:
            return
        weights, training_state = policy.due(boundary)
        for request in weights:
            self._write_weights(request)
        # The training state goes last, so it includes what handlers of the weights'
        # `checkpoint` events recorded (e.g. where the best weights are).
        if training_state is not None:
            self._write_training_state(training_state)

    def _stop_on_signal(self, event: str) -> None:
        """A signal arrived: stop (resumable) and write a training state."""
        engine = self.engine
        received = engine.dispatcher.signal_received()
        if not received or engine.policy.stop_requested:
            return
        reason = f"received {signal.Signals(received).name}"
        engine.policy.accept(
            [
                Request(Stop(reason, resumable=True), SIGNAL_SOURCE, event),
                Request(SaveTrainingState(reason), SIGNAL_SOURCE, event),
            ]
        )

    def on_main(self, action: Callable[[], T]) -> T:
        """Run a MAPS write on rank 0 only; every rank gets its result (or its error)."""
        group = self.engine.dispatcher.group
        return action() if group is None else group.on_main(action)

    def _write_weights(self, request: Request) -> None:
        engine = self.engine
        command = request.command
        assert isinstance(command, SaveCheckpoint)
        snapshot = engine.state.snapshot()
        model = engine.model
        path = self.on_main(
            functools.partial(
                checkpoint.save_weights,
                engine.maps,
                command.tag,
                model,
                metadata={
                    **dict(command.metadata),
                    "requested_by": request.source,
                    "event": request.event,
                    "epoch": snapshot.current_epoch,
                    "global_step": snapshot.global_step,
                    "iteration": snapshot.iteration,
                    "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
                },
            )
        )
        engine.dispatcher.emit("checkpoint", checkpoint=path, tag=command.tag, kind="weights")

    def _write_training_state(self, request: Request) -> None:
        engine, loop = self.engine, self.loop
        assert loop is not None
        snapshot = engine.state.snapshot()
        position = loop.position
        in_epoch = bool(position["in_epoch"])
        name = checkpoint.training_state_name(snapshot.iteration, epoch_end=not in_epoch)
        own: dict[str, Any] = {
            "random": loop.random_before_validation or capture_random_states(),
            "loader_generators": capture_loader_generators(loop.train_loader),
            "epoch_start": (loop.epoch_start.as_dict() if in_epoch and loop.epoch_start else None),
            # The losses as tracked, not one sum: the resumed run sums them in the same order.
            **loop.losses.saved(),
        }
        group = engine.dispatcher.group
        # Every rank's generators and losses differ: rank 0 writes them all.
        every_rank = [own] if group is None else group.gather_on_main(own)
        tensors = {
            "optimizers": [optimizer.state_dict() for optimizer in engine.optimizers],
            "scaler": None if engine.scaler is None else engine.scaler.state_dict(),
            **own,
            "other_ranks": (every_rank or [own])[1:],
            "callbacks": {c.callback_id: c.state_dict() for c in engine.callbacks},
        }
        document = {
            "format": STATE_FORMAT,
            "state": snapshot.as_dict(),
            "position": dict(position),
            "bus": engine.bus.state_dict(),
            "trainer": engine.settings_record(),
            "callbacks": [c.callback_id for c in engine.callbacks],
            "optimizers": [optimizer_class(o) for o in engine.optimizers],
            "optimizer_defaults": [plain_values(o.defaults) for o in engine.optimizers],
            "world_size": engine.placement.world_size,
        }
        path = self.on_main(
            functools.partial(
                checkpoint.save_training_state,
                engine.maps,
                name,
                engine.model,
                tensors=tensors,
                document=document,
                metadata={
                    "requested_by": request.source,
                    "event": request.event,
                    "reason": getattr(request.command, "reason", ""),
                    "epoch": snapshot.current_epoch,
                    "iteration": snapshot.iteration,
                    "global_step": snapshot.global_step,
                    "in_epoch": in_epoch,
                },
            )
        )
        self.last_training_state = str(path)
        engine.dispatcher.emit("checkpoint", checkpoint=path, tag=name, kind="training")


def optimizer_class(optimizer: torch.optim.Optimizer) -> str:
    """The optimizer's class as ``module.QualName`` (what a resume compares)."""
    kind = type(optimizer)
    return f"{kind.__module__}.{kind.__qualname__}"
