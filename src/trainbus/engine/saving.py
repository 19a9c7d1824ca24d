"""Carrying out saves at a boundary: weights checkpoints and training states.

The loop calls :meth:`Saver.at_boundary`; the :class:`~trainbus.engine.policy.CommandPolicy`
says what is due there. A stop signal (SIGTERM, SIGINT) becomes a resumable stop and a
training state here, at the first boundary after it arrived. Every MAPS write runs on rank 0
only; every rank gets its result.

An asynchronous save (single-process runs) waits only for a host copy of its tensors; the
:class:`~trainbus.engine.background.BackgroundWriter` writes it, and its ``checkpoint`` event
is emitted here, on the training thread, at the first boundary the loop stops at after the
commit: the next save asked for, the end of the epoch, or a flush (a synchronous save, the
end of ``train()``, a stop signal's state). A background error is raised there, as the
synchronous write would have raised it, and ends training.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import shutil
import signal
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from torch import nn

from trainbus.engine import checkpoint, sharding
from trainbus.engine.background import (
    BackgroundWriter,
    Finished,
    Write,
    collected_everywhere,
    host_copy,
)
from trainbus.engine.core import Engine, plain_values
from trainbus.engine.maps import TRAINING_DIR
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
        self.background = BackgroundWriter()
        """The writer of asynchronous saves: its ``waits`` and ``wait_seconds`` count the
        saves that had to wait for the previous one, and for how long."""

    def at_boundary(self, boundary: Boundary, event: str) -> None:
        """Carry out what is due at ``boundary`` (reached right after ``event``)."""
        policy = self.engine.policy
        if policy.training and boundary is not Boundary.EVALUATION:
            self._stop_on_signal(event)
        if self.background.finished and self.engine.dispatcher.group is None:
            # Under torchrun a finished write is collected where every rank collects it.
            self._announce(self.background.collect(wait=False))
        if not policy.has_pending:
            return
        weights, training_state = policy.due(boundary)
        # The training state goes last, so it includes what handlers of the weights'
        # `checkpoint` events recorded (e.g. where the best weights are); a synchronous write
        # first finishes every earlier one, so the MAPS changes in the order asked.
        requests = [*weights, *([] if training_state is None else [training_state])]
        job: list[Write] = []
        host_weights: dict[str, torch.Tensor] | None = None
        for request in requests:
            background = self._in_background(request)
            if background and not job:
                # One job at a time: host memory holds at most two copies of the tensors.
                self._announce(self._collect(counted=True))
            elif not background:
                if job:
                    self._submit(job)
                    job = []
                self.flush()
            needs_weights = isinstance(request.command, SaveCheckpoint) or not self._sharded
            if background and needs_weights and host_weights is None:
                host_weights = self._host_weights()
            write = self._prepare(request, host_weights if background else None, background)
            if background:
                if not job:
                    write = dataclasses.replace(write, waited=self.background.last_wait)
                job.append(write)
            else:
                self._emit(write.tag, write.kind, self.on_main(write.run))
        if job:
            self._submit(job)

    def flush(self) -> None:
        """Wait for the background write, emit its ``checkpoint`` events, raise its error."""
        self._announce(self._collect(counted=False))

    @property
    def _sharded(self) -> bool:
        return self.engine.sharded is not None

    def _host_weights(self) -> dict[str, torch.Tensor]:
        """The weights an asynchronous save writes, copied to host memory now.

        Sharded: gathered whole on rank 0 (every rank takes part); under torchrun the other
        ranks write no weights and copy nothing.
        """
        engine = self.engine
        if self._sharded:
            return sharding.full_weights(engine.model)
        if not engine.placement.is_main:
            return {}
        return dict(host_copy(dict(engine.model.state_dict())))

    def _submit(self, job: list[Write]) -> None:
        """Start ``job`` on the writer thread: under torchrun, rank 0 runs the MAPS writes."""
        if not self.engine.placement.is_main:
            job = [write for write in job if write.everywhere]
        if job:
            self.background.submit(job)

    def _collect(self, *, counted: bool) -> Finished | None:
        """Wait for the background job; under torchrun every rank gets rank 0's outcome."""
        local = self.background.collect(wait=True, counted=counted)
        group = self.engine.dispatcher.group
        if group is None:
            return local
        return collected_everywhere(group, local)

    def _in_background(self, request: Request) -> bool:
        """Whether ``request`` is written asynchronously: asked so, and no signal arrived."""
        return (
            getattr(request.command, "asynchronous", False) is True
            # A stop signal's state is the process's last: written before it exits.
            and not self.engine.dispatcher.signal_received()
        )

    def _announce(self, finished: Finished | None) -> None:
        if finished is None:
            return
        for written in finished.written:
            self._emit(written.tag, written.kind, written.checkpoint, written.waited)
        if finished.error is not None:
            finished.error.add_note(
                "trainbus: this checkpoint was written in the background (asynchronous=True); "
                "its error is reported at the next save, the end of the epoch or of training"
            )
            raise finished.error

    def _emit(self, tag: str, kind: str, path: Path, waited: float = 0.0) -> None:
        if kind == "training":
            self.last_training_state = str(path)
        self.engine.dispatcher.emit(
            "checkpoint", checkpoint=path, tag=tag, kind=kind, waited=waited
        )

    def _prepare(
        self, request: Request, host_weights: dict[str, torch.Tensor] | None, background: bool
    ) -> Write:
        """The write of ``request``, its values taken now (copied to the host in background)."""
        if isinstance(request.command, SaveCheckpoint):
            return self._weights(request, host_weights)
        return self._training_state(request, host_weights, background)

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

    def _weights(self, request: Request, host_weights: dict[str, torch.Tensor] | None) -> Write:
        engine = self.engine
        command = request.command
        assert isinstance(command, SaveCheckpoint)
        snapshot = engine.state.snapshot()
        model = engine.model
        weights: nn.Module | dict[str, torch.Tensor] = model
        if host_weights is not None:
            weights = host_weights
        elif engine.sharded is not None:
            # Every rank takes part in gathering the full weights, which land on rank 0.
            weights = sharding.full_weights(model)
        return Write(
            functools.partial(
                checkpoint.save_weights,
                engine.maps,
                command.tag,
                weights,
                metadata={
                    **dict(command.metadata),
                    "requested_by": request.source,
                    "event": request.event,
                    "epoch": snapshot.current_epoch,
                    "global_step": snapshot.global_step,
                    "iteration": snapshot.iteration,
                    "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
                },
            ),
            command.tag,
            "weights",
        )

    def _training_state(
        self, request: Request, host_weights: dict[str, torch.Tensor] | None, background: bool
    ) -> Write:
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
        sharded = engine.sharded is not None
        tensors = {
            # Sharded: the optimizers' states are in the DCP shards, with the weights.
            "optimizers": [] if sharded else [o.state_dict() for o in engine.optimizers],
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
            "sharded": sharded,
        }
        if background and engine.placement.is_main:
            # Under torchrun only rank 0 writes these: the other ranks copy nothing.
            tensors = host_copy(tensors)
            # Its values are taken now; the JSON text comes out the same when written.
            document = json.loads(json.dumps(document, default=str))
        staging, shards = self._sharded_part(name, background) if sharded else (None, None)
        commit = functools.partial(
            checkpoint.save_training_state,
            engine.maps,
            name,
            None if sharded else engine.model if host_weights is None else host_weights,
            staging=staging,
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
        if shards is None or staging is None:
            return Write(commit, name, "training")
        main = engine.placement.is_main
        return Write(
            functools.partial(sharding.commit_after, shards, commit if main else None, staging),
            name,
            "training",
            everywhere=True,
        )

    def _sharded_part(self, name: str, background: bool) -> tuple[Path, Future[Any] | None]:
        """Every rank writes its shard of the weights and optimizers into a staging directory.

        Rank 0 makes the directory; the commit (manifest, rename) follows on rank 0 alone.
        On failure the directory is removed, and the previous states are intact.
        ``background``: DCP's ``async_save`` copies the shards to host memory now and writes
        them on its own thread; the future says when every rank's shard is written.
        """
        engine = self.engine
        root = engine.maps.directory(TRAINING_DIR)
        staging = self.on_main(functools.partial(checkpoint.staging_directory, root, name))
        try:
            if background:
                return staging, sharding.save_sharded_async(
                    staging, engine.model, engine.optimizers
                )
            sharding.save_sharded(staging, engine.model, engine.optimizers)
        except BaseException:
            self.on_main(functools.partial(shutil.rmtree, staging, ignore_errors=True))
            raise
        return staging, None


def optimizer_class(optimizer: torch.optim.Optimizer) -> str:
    """The optimizer's class as ``module.QualName`` (what a resume compares)."""
    kind = type(optimizer)
    return f"{kind.__module__}.{kind.__qualname__}"
