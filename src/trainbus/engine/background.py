"""Checkpoint writes on a background thread, one at a time, results collected by the caller.

An asynchronous save (``asynchronous=True`` on ``SaveCheckpoint`` or ``SaveTrainingState``)
copies its tensors to host memory on the training thread (:func:`host_copy`); the files,
fsyncs, manifest, commit and ``latest`` move then run on the writer thread. The writer never
emits an event: handlers run on the training thread only, so the caller collects what was
committed (:meth:`BackgroundWriter.collect`) and announces it there.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np
import torch

from trainbus.engine.distributed import portable_error
from trainbus.errors import TrainbusError

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Write:
    """One checkpoint to commit: ``run`` writes it and returns its directory."""

    run: Callable[[], Path]
    tag: str
    kind: str
    everywhere: bool = False
    """Run on every rank under torchrun (a sharded state's shards); else on rank 0 alone."""
    waited: float = 0.0
    """Seconds this save waited for the previous background write before it began."""


@dataclass(frozen=True, slots=True)
class Written:
    """A committed checkpoint, as its ``checkpoint`` event announces it."""

    checkpoint: Path
    tag: str
    kind: str
    waited: float = 0.0


@dataclass(slots=True)
class Finished:
    """What one background job committed, in order, and the error that ended it, if any."""

    written: list[Written] = field(default_factory=list)
    error: BaseException | None = None


class BackgroundWriter:
    """Runs one job of writes at a time on a daemon thread; the training thread collects it.

    ``waits`` and ``wait_seconds`` count the times an asynchronous save had to wait for the
    previous one to finish, and for how long: a steady count means saves are asked for faster
    than the disk takes them.
    """

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._outcome = Finished()
        self.waits = 0
        self.wait_seconds = 0.0
        self.last_wait = 0.0
        """Seconds the last counted collect waited (0.0 when the job had ended already)."""

    @property
    def finished(self) -> bool:
        """Whether a job was submitted and has ended, and is waiting to be collected."""
        thread = self._thread
        return thread is not None and not thread.is_alive()

    @property
    def busy(self) -> bool:
        """Whether a job was submitted and not yet collected (running or finished)."""
        return self._thread is not None

    def submit(self, writes: Sequence[Write]) -> None:
        """Start ``writes`` in order on the writer thread; the previous job must be collected."""
        assert self._thread is None, "the previous background job was not collected"
        outcome = self._outcome = Finished()
        self._thread = threading.Thread(
            target=_run, args=(tuple(writes), outcome), name="trainbus-checkpoint", daemon=True
        )
        self._thread.start()

    def collect(self, *, wait: bool, counted: bool = False) -> Finished | None:
        """The ended job's outcome (``None`` when none is to collect, or it runs and not ``wait``).

        ``counted``: a wait here is one of :attr:`waits` (a new save waiting for this one).
        """
        thread = self._thread
        if counted:
            self.last_wait = 0.0
        if thread is None or (thread.is_alive() and not wait):
            return None
        if thread.is_alive():
            started = time.perf_counter()
            thread.join()
            if counted:
                self.last_wait = time.perf_counter() - started
                self.waits += 1
                self.wait_seconds += self.last_wait
        thread.join()  # already ended: orders the thread's writes before the reads below
        self._thread = None
        return self._outcome


class Group(Protocol):
    """What :func:`collected_everywhere` needs of a process group."""

    def all_true(self, flag: bool) -> bool: ...

    def on_main(self, action: Callable[[], T]) -> T: ...


def collected_everywhere(group: Group, local: Finished | None) -> Finished | None:
    """Rank 0's outcome of a background job on every rank; a failure on any rank fails all.

    Every rank calls it at the same point (a save asked, a flush), after collecting its own
    job: the ranks then emit the same ``checkpoint`` events and raise together.
    """
    succeeded = group.all_true(local is None or local.error is None)
    shared = group.on_main(lambda: None if local is None else _portable(local))
    if succeeded:
        return shared
    error = local.error if local is not None and local.error is not None else None
    if shared is not None and shared.error is not None:
        error = shared.error
    if error is None:
        error = TrainbusError(
            "a background checkpoint write failed on another rank (its log has the error); "
            "the previous checkpoints are intact"
        )
    return Finished(shared.written if shared is not None else [], error)


def _portable(outcome: Finished) -> Finished:
    """``outcome`` with an error that can be sent to the other ranks (pickled)."""
    error = None if outcome.error is None else portable_error(outcome.error)
    return Finished(list(outcome.written), error)


def _run(writes: tuple[Write, ...], outcome: Finished) -> None:
    for write in writes:
        try:
            path = write.run()
        except BaseException as exc:  # handed to the training thread, raised there
            outcome.error = exc
            return
        outcome.written.append(Written(path, write.tag, write.kind, write.waited))


def host_copy(value: Any) -> Any:
    """``value`` with every tensor copied to host memory and every container copied.

    What the training thread changes after the copy (weights, optimizer moments, counters
    held in lists or dicts) no longer reaches what the writer writes. Other leaves are
    immutable values (numbers, strings, ``None``) and kept.
    """
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, np.ndarray):
        return value.copy()
    if isinstance(value, dict):
        pairs = [(key, host_copy(item)) for key, item in value.items()]
        return OrderedDict(pairs) if isinstance(value, OrderedDict) else dict(pairs)
    if isinstance(value, list):
        return [host_copy(item) for item in value]
    if isinstance(value, tuple):
        items = [host_copy(item) for item in value]
        return type(value)(*items) if hasattr(value, "_fields") else tuple(items)
    return value
