"""TrainingCheckpointCallback: training states for an exact resume, rotated safely."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from trainbus.engine import checkpoint as checkpoints
from trainbus.engine.maps import Maps
from trainbus.engine.state import TrainerState
from trainbus.errors import ConfigurationError, ConfigurationTypeError
from trainbus.events.callback import Callback
from trainbus.events.catalog import EVENTS, EventSpec
from trainbus.events.commands import SaveTrainingState
from trainbus.events.marker import Options
from trainbus.handlers import priorities


class TrainingCheckpointCallback(Callback):
    """Save everything an exact resume needs, under ``training/state-*/`` in the MAPS.

    - ``every_n_epochs``: at the end of every n-th epoch (default 1; ``None`` for never).
    - ``every_n_steps``: after every n-th optimizer step, in the middle of an epoch too
      (default ``None``).
    - ``save_on_train_end``: when training ends, stopped or not (default True).
    - ``keep``: how many of its training states to keep (default 2). Older ones are deleted
      only after a newer one is committed; the state a run resumed from is never deleted by
      it, nor are the states of another TrainingCheckpointCallback in the same MAPS.
    - ``asynchronous``: write in the background (default False). The step waits only for a
      copy of the weights and optimizer and scaler states in host memory (one more copy of
      them in memory while it is written); the files, fsyncs, manifest, commit and ``latest``
      follow on a writer thread, one state at a time. Its ``checkpoint`` event, and the
      rotation it triggers, come at the next save, the end of the epoch or of training after
      the commit; a failed write is raised there and ends training. Every write is finished
      before ``train()`` returns, and a stop signal's state is written synchronously after
      it. Single-process runs only: under torchrun states are written synchronously.

    A training state holds the weights, optimizer, scaler and scheduler states, every random
    generator, the loader position, the counters and every callback's ``state_dict``; it is
    written by the Trainer after every other handler of the event has run, so the state it
    saves is the state after the epoch (early-stopping counters included). Resume with
    ``Trainer.from_maps(path, model).train(...)`` or ``trainer.train(..., resume=True)``.

    In a distributed run it decides on rank 0, and every rank contributes its random states
    to the state rank 0 writes. Without ``every_n_steps`` it does not subscribe to
    ``batch_end``, so the ranks need not agree on anything after each step.
    """

    priority = priorities.TRAINING_CHECKPOINT
    rank_zero_only = True

    def __init__(
        self,
        every_n_epochs: int | None = 1,
        every_n_steps: int | None = None,
        *,
        save_on_train_end: bool = True,
        keep: int = 2,
        asynchronous: bool = False,
    ) -> None:
        for name, value in (
            ("every_n_epochs", every_n_epochs),
            ("every_n_steps", every_n_steps),
            ("keep", keep),
        ):
            if value is None and name != "keep":
                continue
            problem = f"TrainingCheckpointCallback: {name}={value!r} is not a positive integer"
            fix = (
                "; at least the newest training state must be kept"
                if name == "keep"
                else f" or None; pass e.g. {name}=1"
            )
            if type(value) is not int:
                raise ConfigurationTypeError(problem + fix)
            if value < 1:
                raise ConfigurationError(problem + fix)
        if not isinstance(save_on_train_end, bool):
            raise ConfigurationTypeError(
                f"TrainingCheckpointCallback: save_on_train_end={save_on_train_end!r} is not "
                "a bool; pass True to save a training state when training ends, else False"
            )
        if not isinstance(asynchronous, bool):
            raise ConfigurationTypeError(
                f"TrainingCheckpointCallback: asynchronous={asynchronous!r} is not a bool; pass "
                "True to write training states in the background, else False"
            )
        if every_n_epochs is None and every_n_steps is None and not save_on_train_end:
            raise ConfigurationError(
                "TrainingCheckpointCallback would never save: every_n_epochs, every_n_steps "
                "and save_on_train_end are all off; switch the callback off instead with "
                "Trainer(default_callbacks={TrainingCheckpointCallback: False})"
            )
        self.every_n_epochs = every_n_epochs
        self.every_n_steps = every_n_steps
        self.save_on_train_end = save_on_train_end
        self.keep = keep
        self.asynchronous = asynchronous
        self._clear_run()

    def reset(self) -> None:
        """Forget the earlier run's last saves and the state it resumed from."""
        self._clear_run()

    def _clear_run(self) -> None:
        self.last_step: int | None = None
        self.last_boundary: int | None = None
        self._resumed_from: Path | None = None

    def handlers(
        self, known_events: Mapping[str, EventSpec] = EVENTS
    ) -> Iterator[tuple[str, Any, Options]]:
        for event, method, options in super().handlers(known_events):
            if event != "batch_end" or self.every_n_steps is not None:
                yield event, method, options

    def on_batch_end(self, *, state: TrainerState) -> SaveTrainingState | None:
        step = state.global_step
        if self.every_n_steps is None or step == 0 or step % self.every_n_steps:
            return None
        if step == self.last_step:
            return None  # with accumulation, several batches end at the same optimizer step
        self.last_step = step
        return SaveTrainingState(f"optimizer step {step}", self.asynchronous)

    def on_epoch_end(self, *, state: TrainerState) -> SaveTrainingState | None:
        if self.every_n_epochs is None or state.epoch_number % self.every_n_epochs:
            return None
        self.last_boundary = state.iteration
        return SaveTrainingState(
            f"end of epoch {state.epoch_number}/{state.max_epochs}", self.asynchronous
        )

    def on_train_end(self, *, state: TrainerState) -> SaveTrainingState | None:
        if not self.save_on_train_end or self.last_boundary == state.iteration:
            return None
        self.last_boundary = state.iteration
        return SaveTrainingState("end of training", self.asynchronous)

    def on_resume(self, *, checkpoint: Path) -> None:
        self._resumed_from = checkpoint

    def on_checkpoint(self, *, maps: Maps, checkpoint: Path, kind: str) -> None:
        if kind != "training":
            return
        protect = [checkpoint] if self._resumed_from is None else [checkpoint, self._resumed_from]
        checkpoints.rotate_training_states(
            maps, self.keep, protect, owner=self.callback_id, sources=self.handler_ids()
        )

    def handler_ids(self) -> frozenset[str]:
        """The ids of every handler this callback may have asked for a training state from.

        A state's manifest names the handler that asked for it; the batch-end handler counts
        even when ``every_n_steps`` is off now, as an earlier run of the MAPS may have had it.
        """
        return frozenset(options.id for _, _, options in super().handlers() if options.id)

    def state_dict(self) -> dict[str, Any]:
        return {"last_step": self.last_step, "last_boundary": self.last_boundary}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.last_step = state.get("last_step")
        self.last_boundary = state.get("last_boundary")
