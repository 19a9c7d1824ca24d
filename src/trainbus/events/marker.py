"""``@on(...)``: mark a function or method as a handler of one or more events.

Marking never registers anything: a marked method subscribes when its :class:`Callback` is
attached to a bus, a marked function in a plugin module when the plugin is enabled, and
``@trainer.on(...)`` marks and registers at once. Stack ``@on`` to handle several events.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from trainbus.errors import ConfigurationError, ConfigurationTypeError

OnError = Literal["raise", "log"]
Predicate = Callable[[Any], bool]
F = TypeVar("F", bound=Callable[..., Any])

MARKS_ATTRIBUTE = "__trainbus_marks__"


@dataclass(frozen=True, slots=True)
class Options:
    """How a subscription is dispatched; ``None`` fields take the owner's default.

    - ``priority``: higher runs first; ties run in registration order.
    - ``every=N``: run on the N-th, 2N-th, ... occurrence (see the event's counter).
    - ``once``: ``True`` runs on the first occurrence only; ``N`` on the N-th only.
    - ``when``: a predicate of the state snapshot, evaluated before the call.
    - ``on_error``: ``"raise"`` stops training; ``"log"`` records the failure and goes on.
    - ``id``: the stable subscriber id (default: derived from the handler's owner and name).
    """

    priority: int | None = None
    every: int | None = None
    once: int | bool | None = None
    when: Predicate | None = None
    on_error: OnError | None = None
    id: str | None = None

    def __post_init__(self) -> None:
        check_priority(self.priority, allow_none=True)
        if self.every is not None and (
            type(self.every) is not int or self.every < 1  # bool is not a count
        ):
            raise ConfigurationError(
                f"every={self.every!r} is not a positive integer; "
                "pass every=N to run on every N-th occurrence of the event"
            )
        if (
            self.once is not None
            and self.once is not True
            and (type(self.once) is not int or self.once < 1)
        ):
            raise ConfigurationError(
                f"once={self.once!r} is neither True nor a positive integer; pass once=True "
                "for the first occurrence only, or once=N for the N-th occurrence only"
            )
        if self.every is not None and self.once is not None:
            raise ConfigurationError(
                f"every={self.every!r} and once={self.once!r} were both given; "
                "a subscription takes one counting filter"
            )
        if self.when is not None and not callable(self.when):
            raise ConfigurationTypeError(
                f"when={self.when!r} is not callable; pass a function of the state that "
                "returns True when the handler should run, e.g. when=lambda s: s.current_epoch > 2"
            )
        if self.on_error not in (None, "raise", "log"):
            raise ConfigurationError(f"on_error={self.on_error!r} is not one of 'raise', 'log'")
        if self.id is not None and (not isinstance(self.id, str) or not self.id.strip()):
            raise ConfigurationError(f"id={self.id!r} is not a non-empty string")

    def describe_filter(self) -> str:
        """A short text of the filters, for dispatch plans ("-" when there is none)."""
        parts = []
        if self.every is not None:
            parts.append(f"every={self.every}")
        if self.once is not None:
            parts.append("once" if self.once is True else f"once={self.once}")
        if self.when is not None:
            parts.append(f"when={getattr(self.when, '__qualname__', repr(self.when))}")
        return ",".join(parts) or "-"


def check_priority(priority: object, *, allow_none: bool = False) -> None:
    """Raise unless ``priority`` is a plain ``int`` (``bool`` is refused)."""
    if priority is None and allow_none:
        return
    if type(priority) is not int:
        raise ConfigurationTypeError(
            f"priority={priority!r} ({type(priority).__name__}) is not an int; "
            "pass an integer such as priority=10 (higher runs first)"
        )


@dataclass(frozen=True, slots=True)
class Mark:
    """One ``@on`` mark: the event and the dispatch options."""

    event: str
    options: Options


def on(
    event: str,
    *,
    priority: int | None = None,
    every: int | None = None,
    once: int | bool | None = None,
    when: Predicate | None = None,
    on_error: OnError | None = None,
    id: str | None = None,
) -> Callable[[F], F]:
    """Mark a function or method as a handler of ``event``; see :class:`Options`.

    The function is returned unchanged, so marks stack::

        class Progress(Callback):
            @on("epoch_end", priority=-10)
            @on("train_end", priority=-10)
            def flush(self, *, state): ...
    """
    if not isinstance(event, str):
        raise ConfigurationTypeError(
            f"@on expects an event name as a string, got {event!r}; write @on('epoch_end')"
        )
    options = Options(priority, every, once, when, on_error, id)

    def decorate(function: F) -> F:
        return add_mark(function, Mark(event, options))

    return decorate


def add_mark(function: F, mark: Mark) -> F:
    """Attach ``mark`` to ``function`` (kept with earlier marks) and return the function."""
    if not callable(function):
        raise ConfigurationTypeError(f"@on({mark.event!r}) decorates functions, not {function!r}")
    existing: tuple[Mark, ...] = getattr(function, MARKS_ATTRIBUTE, ())
    setattr(function, MARKS_ATTRIBUTE, (*existing, mark))
    return function


def marks_of(function: object) -> tuple[Mark, ...]:
    """The ``@on`` marks of a function (bound methods included), innermost first."""
    return tuple(getattr(function, MARKS_ATTRIBUTE, ()))
