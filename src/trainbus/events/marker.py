"""``@on(...)``: mark a function or method as a handler of one or more events.

Marking never registers anything: a marked method subscribes when its :class:`Callback` is
attached to a bus, a marked function in a plugin module when the plugin is enabled, and
``@trainer.on(...)`` marks and registers at once. Stack ``@on`` to handle several events.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from trainbus.errors import ConfigurationError, ConfigurationTypeError, SubscriptionError

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
    - ``before`` / ``after``: subscriber ids (or callback ids, meaning all their handlers of
      the event) this one must run before / after, whatever the priorities say; constraints
      on a subscriber that is not there are ignored; a cycle is refused at registration.
    - ``reverse``: at the end event of a pair (``train_end`` for ``train_start``, ...), take
      the mirror of the owner's position at the start event, so what opens first closes last.
    """

    priority: int | None = None
    every: int | None = None
    once: int | bool | None = None
    when: Predicate | None = None
    on_error: OnError | None = None
    id: str | None = None
    before: tuple[str, ...] = ()
    after: tuple[str, ...] = ()
    reverse: bool = False

    def __post_init__(self) -> None:
        check_priority(self.priority, allow_none=True)
        for name in ("before", "after"):
            object.__setattr__(self, name, _subscriber_ids(name, getattr(self, name)))
        if not isinstance(self.reverse, bool):
            raise ConfigurationTypeError(f"reverse={self.reverse!r} is not a bool")
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
        if self.when is not None:
            _check_predicate(self.when)
        check_on_error(self.on_error, allow_none=True)
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

    def describe_order(self) -> str:
        """A short text of the ordering constraints, for dispatch plans ("-" when none)."""
        parts = [f"before={i}" for i in self.before] + [f"after={i}" for i in self.after]
        if self.reverse:
            parts.append("reverse")
        return ",".join(parts) or "-"


def _subscriber_ids(name: str, value: object) -> tuple[str, ...]:
    items = (value,) if isinstance(value, str) else value
    ids: list[str] = []
    bad: list[object] = []
    if isinstance(items, tuple | list | set | frozenset):
        for item in items:
            if isinstance(item, str) and item.strip():
                ids.append(item.strip())
            else:
                bad.append(item)
    else:
        bad.append(value)
    if bad:
        held = f" (it holds {bad[0]!r})" if bad[0] is not value else ""
        raise ConfigurationTypeError(
            f"{name}={value!r} is not a subscriber id or a list of them{held}; pass e.g. "
            f"{name}='ModelCheckpointCallback' or {name}=['LoggerCallback.on_epoch_end']"
        )
    return tuple(sorted(set(ids)))


def _check_predicate(when: object) -> None:
    """Refuse a ``when`` that cannot be called with the state (found now, not at dispatch)."""
    if not callable(when):
        raise ConfigurationTypeError(
            f"when={when!r} is not callable; pass a function of the state that "
            "returns True when the handler should run, e.g. when=lambda s: s.current_epoch > 2"
        )
    deferred = deferred_kind(when)
    if deferred is not None:
        kind, made = deferred
        raise ConfigurationTypeError(
            f"when={when!r} is {kind}: calling it creates {made}, which is always true, so "
            "the filter would never filter; pass a plain function of the state that returns "
            "a bool, e.g. when=lambda state: state.current_epoch > 2"
        )
    try:
        signature = inspect.signature(when)
    except (TypeError, ValueError):  # some builtins have no signature: checked at dispatch
        return
    try:
        signature.bind(None)
    except TypeError:
        raise ConfigurationTypeError(
            f"when={when!r} cannot be called with one argument (the state snapshot); its "
            f"signature is {signature}; pass e.g. when=lambda state: state.current_epoch > 2"
        ) from None


def deferred_kind(function: object) -> tuple[str, str] | None:
    """What ``function`` is, and what calling it creates, when its body does not run on call.

    ``None`` for a plain callable. Bound methods, ``functools.partial``, static and class
    methods, and instances with an ``async def __call__`` are looked through.
    """
    if isinstance(function, staticmethod | classmethod):
        function = function.__func__
    candidates = [function]
    if not inspect.isroutine(function) and not isinstance(function, type):
        # the method a callable instance runs, not a callability test
        candidates.append(getattr(function, "__call__", None))  # noqa: B004
    for candidate in candidates:
        if inspect.iscoroutinefunction(candidate):
            return "an async function (async def)", "a coroutine"
        if inspect.isasyncgenfunction(candidate):
            return "an async generator function (async def with yield)", "an async generator"
        if inspect.isgeneratorfunction(candidate):
            return "a generator function (it contains yield)", "a generator"
    return None


def check_plain_handler(handler: object, where: str) -> None:
    """Refuse a handler whose call only creates a coroutine or a generator.

    The dispatcher calls handlers synchronously and reads what they return as commands, so
    the body of such a handler would never run, silently.
    """
    deferred = deferred_kind(handler)
    if deferred is not None:
        kind, made = deferred
        raise SubscriptionError(
            f"{where} is {kind}: calling it only creates {made}, which would never run; a "
            "handler must be a plain function returning None or a command. Write it with a "
            "plain 'def' and no yield; run any async work to completion inside it (e.g. with "
            "asyncio.run) or hand it to a worker you own"
        )


def check_priority(priority: object, *, allow_none: bool = False) -> None:
    """Raise unless ``priority`` is a plain ``int`` (``bool`` is refused)."""
    if priority is None and allow_none:
        return
    if type(priority) is not int:
        raise ConfigurationTypeError(
            f"priority={priority!r} ({type(priority).__name__}) is not an int; "
            "pass an integer such as priority=10 (higher runs first)"
        )


def check_on_error(on_error: object, *, allow_none: bool = False) -> None:
    """Raise unless ``on_error`` is ``"raise"`` or ``"log"`` (or ``None`` where allowed)."""
    if on_error is None and allow_none:
        return
    if not isinstance(on_error, str):
        default = " (or None for the owner's default)" if allow_none else ""
        raise ConfigurationTypeError(
            f"on_error={on_error!r} ({type(on_error).__name__}) is not a string; pass "
            f"on_error='raise' to stop training or on_error='log' to record and go on{default}"
        )
    if on_error not in ("raise", "log"):
        raise ConfigurationError(
            f"on_error={on_error!r} is not one of 'raise', 'log'; pass on_error='raise' to "
            "stop training when the handler fails or on_error='log' to record it and go on"
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
    before: str | Iterable[str] = (),
    after: str | Iterable[str] = (),
    reverse: bool = False,
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
    options = Options(
        priority, every, once, when, on_error, id, as_ids(before), as_ids(after), reverse
    )

    def decorate(function: F) -> F:
        name = getattr(function, "__qualname__", None) or repr(function)
        check_plain_handler(function, f"{name!r} marked with @on({event!r})")
        return add_mark(function, Mark(event, options))

    return decorate


def as_ids(value: str | Iterable[str]) -> tuple[str, ...]:
    """``before=``/``after=`` as a tuple (a wrong type is refused by :class:`Options`)."""
    if isinstance(value, str):
        return (value,)
    if isinstance(value, Iterable):
        return tuple(value)
    return value  # type: ignore[unreachable]  # refused with a clear message by Options


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
