"""The :class:`Callback` base class: methods named ``on_<event>`` become subscriptions.

::

    class PrintEpochCallback(Callback):
        def on_epoch_start(self, *, model, maps, state) -> None:
            print(f"Starting epoch {state.current_epoch}")

A handler asks only for the payload names it needs, as keyword-only parameters. The class
attribute :attr:`Callback.priority` orders the callback's handlers against other subscribers
(higher runs first), :attr:`Callback.priorities` overrides it per event, and ``@on(...)`` on a
method overrides anything for that method or subscribes a method with any name. A method whose
name starts with ``on_`` but names no known event is refused (a misspelt hook never fires
silently).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import replace
from typing import Any, ClassVar

from trainbus.errors import ConfigurationError, SubscriptionError
from trainbus.events.catalog import EVENTS, PAIRED_START, EventSpec, closest_names
from trainbus.events.marker import OnError, Options, check_priority, marks_of

HOOK_PREFIX = "on_"
_NOT_HOOKS = frozenset({"on_error"})


class Callback:
    """Base class of every callback; override ``on_<event>`` methods (see the catalogue).

    Class attributes a subclass may set:

    - ``priority``: default priority of every handler of the callback (default 0).
    - ``priorities``: per-event priorities, e.g. ``{"train_end": -100}``.
    - ``on_error``: ``"raise"`` (a failure stops training) or ``"log"`` (reported at the end).
    - ``rank_zero_only``: run only on rank 0 of a distributed run.
    - ``events``: custom :class:`EventSpec` s this callback declares before subscribing.
    - ``reverse_end_events``: at the end event of each pair (``train_end``, ``epoch_end``, ...)
      run in the mirror of the start event's order, like a context manager: a callback that
      opens something first at ``train_start`` closes it last at ``train_end``.

    Override :meth:`state_dict` / :meth:`load_state_dict` for state that must survive a resume
    (stored under :attr:`callback_id`), :meth:`reset` to forget an earlier run's state when a
    new run starts, and :meth:`config` for what goes into ``maps.json``.
    """

    priority: ClassVar[int] = 0
    priorities: ClassVar[Mapping[str, int]] = {}
    on_error: ClassVar[OnError] = "raise"
    rank_zero_only: ClassVar[bool] = False
    events: ClassVar[tuple[EventSpec, ...]] = ()
    reverse_end_events: ClassVar[bool] = False

    @property
    def callback_id(self) -> str:
        """Stable id of this callback: its class name, ``#n`` for the n-th of one class."""
        given = self.__dict__.get("_trainbus_callback_id")
        return given if isinstance(given, str) else type(self).__name__

    @callback_id.setter
    def callback_id(self, value: str) -> None:
        if not isinstance(value, str) or not value.strip():
            raise ConfigurationError(f"callback_id={value!r} is not a non-empty string")
        self.__dict__["_trainbus_callback_id"] = value

    def handlers(
        self, known_events: Mapping[str, EventSpec] = EVENTS
    ) -> Iterator[tuple[str, Any, Options]]:
        """Yield ``(event, bound method, options)`` for every handler of this callback."""
        cls = type(self)
        check_priority(cls.priority)
        for event, value in cls.priorities.items():
            check_priority(value)
            if event not in known_events:
                raise _unknown_hook(cls, f"priorities[{event!r}]", event, known_events)
        for name in _handler_names(cls):
            method = getattr(self, name)
            marks = marks_of(method)
            if not marks:
                event = name[len(HOOK_PREFIX) :]
                if event not in known_events:
                    raise _unknown_hook(cls, name, event, known_events)
                marks_options = [(event, Options())]
            else:
                marks_options = [(mark.event, mark.options) for mark in marks]
            for event, options in marks_options:
                priority = options.priority
                if priority is None:
                    priority = cls.priorities.get(event, cls.priority)
                yield (
                    event,
                    method,
                    replace(
                        options,
                        priority=priority,
                        on_error=options.on_error or cls.on_error,
                        id=options.id or f"{self.callback_id}.{name}",
                        reverse=options.reverse
                        or (cls.reverse_end_events and event in PAIRED_START),
                    ),
                )

    def reset(self) -> None:
        """Forget the state of any earlier run; called before ``train_start`` of a new run.

        A run that resumes a training state gets :meth:`load_state_dict` instead. Override it
        when the callback keeps per-run state (a best value, a patience counter, the files it
        wrote), so that an instance reused in a second Trainer behaves as a fresh one.
        """

    def state_dict(self) -> dict[str, Any]:
        """State to restore on resume (plain JSON-ready values). Default: nothing."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned. Default: nothing to restore."""

    def config(self) -> dict[str, Any]:
        """The configuration written into ``maps.json``: public plain-valued attributes."""
        return {
            key: value
            for key, value in vars(self).items()
            if not key.startswith("_") and isinstance(value, str | int | float | bool | None)
        }

    def __repr__(self) -> str:
        settings = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({settings})"


def _handler_names(cls: type[Callback]) -> list[str]:
    """Methods that subscribe: ``on_*`` ones defined below :class:`Callback`, and marked ones."""
    names: list[str] = []
    seen: set[str] = set()
    for klass in cls.__mro__:
        if klass is Callback or klass is object:
            continue
        for name, value in vars(klass).items():
            if name in seen:
                continue
            seen.add(name)
            function = value.__func__ if isinstance(value, staticmethod | classmethod) else value
            if not callable(function):
                continue
            if marks_of(function) or (name.startswith(HOOK_PREFIX) and name not in _NOT_HOOKS):
                names.append(name)
    return sorted(names)


def _unknown_hook(
    cls: type, where: str, event: str, known: Mapping[str, EventSpec]
) -> SubscriptionError:
    close = closest_names(event, known)
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    return SubscriptionError(
        f"{cls.__name__}.{where} refers to event {event!r}, which is not declared.{hint} "
        "Rename it, declare the custom event in the class's `events`, or, if it is not a "
        "handler, give it a name that does not start with 'on_'."
    )
