"""What a handler may ask of the loop, and how requests from several handlers are merged.

Handlers never mutate the loop: they return a command (or a list of commands, or ``None``).
The bus collects every request of one event with the id of the subscriber that made it, and
:func:`merge` decides, by this policy:

- **stop wins**: if any handler returns :class:`Stop`, training stops at the next boundary; the
  first request in dispatch order is the one recorded as the reason (``state.stopped_by``,
  ``state.stop_reason`` and ``maps.json``), and every other request is kept with its source.
- **skip is a veto**: one :class:`SkipStep` skips the step; all reasons are kept.
- **saves accumulate**: every :class:`SaveCheckpoint` is carried out, once per distinct tag;
  any number of :class:`SaveTrainingState` requests of one boundary write one training state.

Requests are never dropped silently: :attr:`Decision.requests` holds all of them, in order.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from trainbus.errors import ConfigurationError, ConfigurationTypeError

_TAG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=-]{0,127}$")


@dataclass(frozen=True, slots=True)
class Command:
    """Base class of the requests a handler may return."""


@dataclass(frozen=True, slots=True)
class Stop(Command):
    """Stop training at the next boundary (end of the batch, or of the epoch).

    A stop is final by default: resuming the run from a training state written after it
    trains no further (early stopping decided). ``resumable=True`` marks a pause instead (a
    wall-clock limit, a preemption): a resume clears it and training goes on from where it
    stopped, in the middle of the epoch if need be.
    """

    reason: str = ""
    resumable: bool = False

    def __post_init__(self) -> None:
        _check_reason(self)
        if not isinstance(self.resumable, bool):
            raise ConfigurationTypeError(
                f"Stop: resumable={self.resumable!r} is not a bool; pass True for a pause that a "
                "resume continues, False (the default) for a final stop"
            )


@dataclass(frozen=True, slots=True)
class SkipStep(Command):
    """Skip the rest of the current step (see the events marked skippable in the catalogue)."""

    reason: str = ""

    def __post_init__(self) -> None:
        _check_reason(self)


@dataclass(frozen=True, slots=True)
class SaveCheckpoint(Command):
    """Write the model weights under ``checkpoints/<tag>/`` at the next boundary.

    ``tag`` names the directory (letters, digits, ``._=-``; no separators), ``metadata`` adds
    plain values to its manifest. The ``checkpoint`` event announces the committed directory.
    ``asynchronous=True``: the step waits only for a copy of the weights in host memory; the
    files are written in the background (single-process runs; see :class:`SaveTrainingState`).
    """

    tag: str
    metadata: tuple[tuple[str, str | int | float | bool | None], ...] = ()
    asynchronous: bool = False

    def __post_init__(self) -> None:
        _check_asynchronous(self)
        if not isinstance(self.tag, str) or not _TAG.fullmatch(self.tag) or ".." in self.tag:
            raise ConfigurationError(
                f"checkpoint tag {self.tag!r} is not a safe directory name; use letters, digits "
                "and '._=-' (at most 128 characters, no '..' and no path separators), "
                "e.g. 'best-loss' or 'epoch-10'"
            )
        object.__setattr__(self, "metadata", _metadata_pairs(self.metadata))


@dataclass(frozen=True, slots=True)
class SaveTrainingState(Command):
    """Write a training state (everything an exact resume needs) at the next step boundary.

    Asked during an accumulation group, it is written when the group's optimizer step is done.
    The ``checkpoint`` event (``kind="training"``) announces the committed directory.

    ``asynchronous=True``: the step waits only for a copy of the tensors in host memory; the
    files, fsyncs, manifest, commit, ``latest`` and rotation follow on a background thread,
    one write at a time (a request made while the previous write runs waits for it). Its
    ``checkpoint`` event (or its error) comes at the first boundary after the commit where the
    Trainer carries out something (the next save asked for, the end of the epoch), and every
    write is finished before ``train()`` returns, before a resume, and before a stop signal's
    own (synchronous) training state. Under torchrun the write stays synchronous.
    """

    reason: str = ""
    asynchronous: bool = False

    def __post_init__(self) -> None:
        _check_reason(self)
        _check_asynchronous(self)


@dataclass(frozen=True, slots=True)
class Request:
    """One command with the id of the subscriber that returned it and the event it answered."""

    command: Command
    source: str
    event: str


@dataclass(frozen=True, slots=True)
class Decision:
    """The merged outcome of the requests of one or more events (see the module policy)."""

    requests: tuple[Request, ...] = ()
    stop: Request | None = None
    skip: Request | None = None
    saves: tuple[Request, ...] = field(default=())
    training_state: Request | None = None

    def __bool__(self) -> bool:
        return bool(self.requests)


def _check_reason(command: Stop | SkipStep | SaveTrainingState) -> None:
    reason: object = command.reason  # annotated str, but given by user code
    if not isinstance(reason, str):
        name = type(command).__name__
        raise ConfigurationTypeError(
            f"{name}: reason={reason!r} is not a string; pass the text recorded with "
            f"the request, e.g. {name}('validation loss reached 0.1')"
        )


def _check_asynchronous(command: SaveCheckpoint | SaveTrainingState) -> None:
    asynchronous: object = command.asynchronous  # annotated bool, but given by user code
    if not isinstance(asynchronous, bool):
        name = type(command).__name__
        raise ConfigurationTypeError(
            f"{name}: asynchronous={asynchronous!r} is not a bool; pass True to write in the "
            "background (the step waits only for a copy in host memory), else False"
        )


def _metadata_pairs(metadata: object) -> tuple[tuple[str, str | int | float | bool | None], ...]:
    """``metadata`` as a tuple of ``(name, plain value)`` pairs (a list of pairs is accepted).

    Checked here: the values go into the checkpoint's JSON manifest when it is written.
    """
    problem = (
        f"SaveCheckpoint: metadata={metadata!r} is not a tuple of (name, value) pairs with "
        "string names and plain values (str, int, float, bool or None); pass e.g. "
        "metadata=(('metric', 'loss'), ('value', 0.25))"
    )
    if not isinstance(metadata, tuple | list):
        raise ConfigurationTypeError(problem)
    pairs = []
    for pair in metadata:
        if (
            not isinstance(pair, tuple | list)
            or len(pair) != 2
            or not isinstance(pair[0], str)
            or not isinstance(pair[1], str | int | float | bool | None)
        ):
            raise ConfigurationTypeError(f"{problem}; {pair!r} is not such a pair")
        pairs.append((pair[0], pair[1]))
    return tuple(pairs)


def merge(requests: Sequence[Request]) -> Decision:
    """Merge requests in dispatch order by the module's policy."""
    stop: Request | None = None
    skip: Request | None = None
    saves: dict[str, Request] = {}
    training_state: Request | None = None
    for request in requests:
        command = request.command
        if isinstance(command, Stop):
            stop = stop or request
        elif isinstance(command, SkipStep):
            skip = skip or request
        elif isinstance(command, SaveCheckpoint):
            saves.setdefault(command.tag, request)
        elif isinstance(command, SaveTrainingState):
            training_state = training_state or request
    return Decision(tuple(requests), stop, skip, tuple(saves.values()), training_state)
