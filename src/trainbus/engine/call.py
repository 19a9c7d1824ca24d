"""One public call's lifecycle: one at a time, the MAPS held, the call recorded truthfully.

Every ``train``/``validate``/``test``/``predict`` goes through :class:`CallRunner`:

- **One call at a time per Trainer**: a call made while another runs (from a handler, or from
  another thread) is refused with :class:`~trainbus.errors.CallInProgressError` naming the
  running call.
- **The MAPS lock is held from the first write of a call to its last**: the directory is
  created (or adopted) and locked before anything is written into it, and unlocked only after
  the call's record is written.
- **The record tells the truth**: a call that raised, or whose ``teardown`` raised, is
  ``failed``; a call whose process was killed is marked ``interrupted`` by the next call that
  takes over its stale lock.
- **Delivery**: ``exception`` reaches every subscriber when a call fails, and ``teardown``
  always runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import functools
import os
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Literal, TypeVar

from trainbus.engine import checkpoint, record
from trainbus.engine import distributed as dist_tools
from trainbus.engine.compute import DeterministicMode
from trainbus.engine.core import Engine
from trainbus.engine.maps import CHECKPOINTS_DIR, MAPS_FILE, TRAINING_DIR
from trainbus.engine.saving import Saver
from trainbus.engine.summary import format_summary, train_summary
from trainbus.errors import CallInProgressError, ConfigurationError
from trainbus.events.text import escape_control

Stage = Literal["train", "validate", "test", "predict"]
L = TypeVar("L", bound=Iterable[Any])


class CallRunner:
    """Runs the public calls of one Trainer, one at a time."""

    def __init__(self, engine: Engine, saver: Saver) -> None:
        self.engine = engine
        self.saver = saver
        self.running: str | None = None
        self._thread: int | None = None
        self._lock = threading.Lock()
        self._started = 0.0

    @contextlib.contextmanager
    def exclusive(self, stage: str) -> Iterator[None]:
        """Hold this Trainer for ``stage``; a call while another runs is refused."""
        if not self._lock.acquire(blocking=False):
            raise CallInProgressError(
                f"{stage}() was called while {self.running}() is running on this Trainer (from "
                f"one of its handlers, or from another thread); a Trainer runs one call at a "
                f"time: call {stage}() after {self.running}() returns, or use another Trainer"
            )
        self.running = stage
        self._thread = threading.get_ident()
        try:
            yield
        finally:
            self.running = None
            self._thread = None
            self._lock.release()

    def check_emitting(self, event: str) -> None:
        """Refuse ``emit(event)`` outside a call, or from a thread other than the call's."""
        if self.running is None:
            raise ConfigurationError(
                f"emit({event!r}) was called outside train/validate/test/predict; events are "
                "emitted while a call runs (from a handler), where the MAPS is locked and "
                "commands have a boundary to take effect at: emit it from a handler"
            )
        if threading.get_ident() != self._thread:
            raise ConfigurationError(
                f"emit({event!r}) was called from another thread than the one running "
                f"{self.running}(); emit from a handler, on the thread of the call"
            )

    @contextlib.contextmanager
    def distributed(self) -> Iterator[None]:
        """Under torchrun: the process group of one call (the group itself outlives it)."""
        engine = self.engine
        if not engine.placement.distributed:
            yield
            return
        group = dist_tools.ProcessGroup(engine.placement, engine.device)
        group.open()
        if group.restart_count != engine.placement.restart_count:
            engine.placement = dataclasses.replace(
                engine.placement, restart_count=group.restart_count
            )
        engine.dispatcher.open_group(group)
        try:
            yield
        finally:
            engine.dispatcher.open_group(None)
            engine.forward = None

    def shard(self, loader: L, name: str, *, training: bool) -> L:
        """This rank's share of ``loader`` in a distributed run (the loader itself otherwise)."""
        engine = self.engine
        if engine.dispatcher.group is None:
            return loader
        if training:
            seed = engine.seed if engine.seed is not None else 0
            return dist_tools.shard_training_loader(loader, name, engine.placement, seed)  # type: ignore[return-value]
        return dist_tools.shard_evaluation_loader(loader, name, engine.placement)  # type: ignore[return-value]

    @contextlib.contextmanager
    def lifecycle(
        self,
        stage: Stage,
        *,
        adopt: bool,
        loaders: Mapping[str, Iterable[Any] | None] | None = None,
    ) -> Iterator[None]:
        """Open the MAPS, record the call, deliver exception and teardown, close the record.

        ``loaders`` (by name, e.g. ``{"train": ..., "val": ...}``) are described in the
        call's record (see :func:`~trainbus.engine.record.loaders`).
        """
        engine = self.engine
        try:
            stale, recovered = self.saver.on_main(
                functools.partial(self._open_maps, adopt=adopt or engine.adopt_maps)
            )
        except BaseException:
            engine.maps.unlock()  # taken before a failed first write: never left held
            raise
        if stale is not None:
            for earlier in engine.calls:
                if isinstance(earlier, dict) and earlier.get("status") == "running":
                    # Its process died without closing the record: killed, or its machine
                    # went down.
                    earlier.update(status="interrupted", interrupted_detected=_now())
        call: dict[str, Any] = {"call": stage, "started": _now(), "status": "running"}
        call["requests"] = []
        if loaders:
            call["loaders"] = record.loaders(loaders)
        if stale is not None:
            call["recovered_lock"] = stale
        if recovered:
            call["recovered"] = recovered
        if engine.placement.distributed:
            call["world_size"] = engine.placement.world_size
            # Names the torchrun job: its restarts know the MAPS as their own.
            call["run_id"] = os.environ.get("TORCHELASTIC_RUN_ID")
        engine.calls.append(call)
        engine.policy.begin_call(call["requests"], training=stage == "train")
        engine.state.update(stage=stage, batch_idx=-1)
        deterministic = DeterministicMode(engine.settings.deterministic)
        error: BaseException | None = None
        self._started = time.monotonic()
        try:
            self.saver.on_main(functools.partial(record.write, engine))
            deterministic.__enter__()
            yield
        except BaseException as raised:
            error = raised
            engine.policy.close()
            engine.dispatcher.deliver_exception(raised)
            raise
        finally:
            error = self._close(call, deterministic, error)
        if error is not None:
            raise error  # teardown failed after the call itself succeeded
        if "summary" in call and engine.placement.is_main:
            print(format_summary(call["summary"], engine.maps), flush=True)

    def _close(
        self, call: dict[str, Any], deterministic: DeterministicMode, error: BaseException | None
    ) -> BaseException | None:
        """Teardown, the call's record and the unlock; the teardown's own error, if new."""
        engine = self.engine
        teardown_error: BaseException | None = None
        engine.policy.close()
        try:
            # A background checkpoint write ends before the MAPS is released, even after an
            # error; its `checkpoint` events still reach the handlers, before `teardown`.
            for ending, doing in (
                (self.saver.flush, "finishing the background checkpoint write"),
                (functools.partial(engine.dispatcher.emit, "teardown"), "tearing down"),
            ):
                try:
                    ending()
                except Exception as raised:
                    first = error or teardown_error
                    if first is None:
                        teardown_error = raised
                    else:
                        first.add_note(
                            escape_control(
                                f"trainbus: while {doing} after this error, "
                                f"{type(raised).__name__}: {raised}"
                            )
                        )
            deterministic.__exit__()
            engine.state.update(stage="idle")
            engine.policy.end_call(failed=(error or teardown_error) is not None)
            self._record_end(call, error or teardown_error)
        except Exception as end_error:
            first = error or teardown_error
            if first is None:
                raise
            # e.g. a full disk refusing maps.json too: the first error is the one to see.
            first.add_note(
                escape_control(
                    "trainbus: while recording the call in maps.json, "
                    f"{type(end_error).__name__}: {end_error}"
                )
            )
        finally:
            engine.maps.unlock()
        return teardown_error

    def _open_maps(self, *, adopt: bool) -> tuple[dict[str, Any] | None, list[str]]:
        """Create or adopt the MAPS, lock it first, and note what a killed run left."""
        engine = self.engine
        maps = engine.maps
        first = not maps.created
        if adopt:
            maps.adopt()
            stale = maps.lock()
            if first:
                engine.calls[:0] = recorded_calls(maps.read_json(MAPS_FILE))
            recovered = [
                f"{folder}/: {action}"
                for folder in (CHECKPOINTS_DIR, TRAINING_DIR)
                for action in checkpoint.recover_interrupted(maps.file(folder))
            ]
        else:
            maps.create()
            stale = maps.lock()
            recovered = []
            if first:
                maps.write_environment()
        return stale, recovered

    def _record_end(self, call: dict[str, Any], error: BaseException | None) -> None:
        engine = self.engine
        snapshot = engine.state.snapshot()
        call.update(
            finished=_now(),
            status="failed" if error else ("stopped" if snapshot.stopped_by else "completed"),
            epochs=snapshot.current_epoch + (1 if snapshot.iteration else 0),
            global_step=snapshot.global_step,
            iteration=snapshot.iteration,
            metrics=dict(snapshot.metrics),
            best_metrics=dict(snapshot.best_metrics),
            best_epochs=dict(snapshot.best_epochs),
        )
        if snapshot.stopped_by:
            call["stop"] = {
                "by": snapshot.stopped_by,
                "reason": snapshot.stop_reason,
                "resumable": snapshot.stop_resumable,
            }
        if error is not None:
            call["error"] = f"{type(error).__name__}: {error}"
        if call["call"] == "train":
            loop = self.saver.loop
            call["summary"] = train_summary(
                snapshot,
                engine.maps,
                epochs_done=0 if loop is None else loop.position["epoch"],
                seconds=time.monotonic() - self._started,
                failed=error is not None,
            )
        call["handler_failures"] = [
            {"event": f.event, "subscriber": f.subscriber, "stage": f.stage, "error": f.error}
            for f in engine.bus.failures
        ]
        self.saver.on_main(functools.partial(record.write, engine))


def recorded_calls(document: object) -> list[dict[str, Any]]:
    """The calls a ``maps.json`` records (entries of another shape are left out)."""
    calls = document.get("calls") if isinstance(document, dict) else None
    return [call for call in calls if isinstance(call, dict)] if isinstance(calls, list) else []


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
