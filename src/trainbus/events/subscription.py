"""Subscription records: what the bus keeps per handler, and the checks made when subscribing.

A :class:`Subscription` holds everything the dispatcher needs, precomputed at registration;
:class:`PlanEntry` and :class:`HandlerFailure` are what the bus reports (the dispatch plan, the
failures of ``on_error="log"`` handlers). The checks here run once per subscription, never at
dispatch: the origin (``source``, ``owner``, ``rank_zero_only``), the handler's keyword
parameters against the event's payload, and whether its return annotation allows a command.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from trainbus.errors import ConfigurationError, ConfigurationTypeError, SubscriptionError
from trainbus.events.catalog import EventSpec
from trainbus.events.marker import OnError, Options

Wants = tuple[str, ...] | None
FailureStage = Literal["handler", "when filter"]
Payload = Mapping[str, Any]

SOURCE_BUILTIN = "builtin"
SOURCE_USER = "user"


@dataclass(eq=False, slots=True)
class Subscription:
    """One handler subscribed to one event, with everything the dispatcher needs precomputed.

    ``wants`` is the tuple of payload names the handler takes (``None``: it takes ``**kwargs``
    and receives the whole payload). ``calls`` counts every call; ``seconds`` and ``timed_calls``
    accumulate only while the bus measures time.
    """

    id: str
    event: str
    handler: Callable[..., Any]
    priority: int
    options: Options
    source: str
    owner: str | None
    wants: tuple[str, ...] | None
    sequence: int
    rank_zero_only: bool
    on_error: OnError
    filtered: bool
    commands: bool  # may return a command (its return annotation is not ``None``)
    counted_calls: int = 0
    fast_counter: list[int] | None = None  # the dispatch count of the event's fast path
    timed_calls: int = 0
    seconds: float = 0.0
    seen: int = 0
    fired_once: bool = False

    @property
    def calls(self) -> int:
        """How many times the handler was called (always counted, settled when read)."""
        pending = self.fast_counter[0] if self.fast_counter is not None else 0
        return self.counted_calls + pending

    @property
    def memory_key(self) -> str:
        """Key of this subscription's filter bookkeeping in :meth:`EventBus.state_dict`."""
        return f"{self.event}:{self.id}"

    def invoke(self, payload: Payload) -> Any:
        """Call the handler with the payload names it asked for."""
        if self.wants is None:
            return self.handler(**payload)
        return self.handler(**{name: payload[name] for name in self.wants})

    def __call__(self, sender: object, **payload: Any) -> Any:
        """blinker receiver protocol, for ``bus.signal(name).send(...)`` in tests and tools."""
        return self.invoke(payload)


@dataclass(frozen=True, slots=True)
class FastPlan:
    """An event's plain subscriptions, the payload-name groups they ask for, and a counter."""

    subscribers: tuple[Subscription, ...]
    groups: tuple[Wants, ...]
    counter: list[int]
    uniform: bool  # every subscription asks for the same payload names: groups[0]


@dataclass(frozen=True, slots=True)
class PlanEntry:
    """One row of a dispatch plan: who runs, in which position, with what filter and origin."""

    event: str
    position: int
    id: str
    priority: int
    filter: str
    source: str
    owner: str | None
    on_error: str
    rank_zero_only: bool
    active: bool
    order: str = "-"
    commands: bool = True  # may return a command (not annotated ``-> None``)

    def as_dict(self) -> dict[str, Any]:
        """The entry as plain JSON-ready values."""
        return {name: getattr(self, name) for name in self.__slots__}


@dataclass(frozen=True, slots=True)
class HandlerFailure:
    """A failure of an ``on_error="log"`` subscription, reported at the end of the run.

    ``stage`` says what raised: the ``"handler"`` itself or its ``"when filter"`` (the handler
    was then not called). ``error`` and ``traceback`` hold the exception's text as raised.
    """

    event: str
    subscriber: str
    error: str
    traceback: str
    counter: int | None = None
    stage: FailureStage = "handler"


def check_origin(source: object, owner: object, rank_zero_only: object) -> None:
    """Check the ``source``, ``owner`` and ``rank_zero_only`` of a subscription."""
    if not isinstance(source, str):
        raise ConfigurationTypeError(
            f"source={source!r} ({type(source).__name__}) is not a string; pass where the "
            f"subscription comes from, e.g. source={SOURCE_USER!r} or source={SOURCE_BUILTIN!r}"
        )
    if not source.strip():
        raise ConfigurationError(
            f"source={source!r} is empty; pass where the subscription comes from, "
            f"e.g. source={SOURCE_USER!r}"
        )
    if owner is not None and not isinstance(owner, str):
        raise ConfigurationTypeError(
            f"owner={owner!r} ({type(owner).__name__}) is not a string or None; pass the id "
            "of the callback the handler belongs to, or leave owner=None"
        )
    if owner is not None and not owner.strip():
        raise ConfigurationError(
            f"owner={owner!r} is empty; pass the id of the callback the handler belongs to, "
            "or leave owner=None"
        )
    if not isinstance(rank_zero_only, bool):
        raise ConfigurationTypeError(
            f"rank_zero_only={rank_zero_only!r} ({type(rank_zero_only).__name__}) is not a "
            "bool; pass rank_zero_only=True to call the handler on rank 0 only, else False"
        )


def derived_id(handler: Callable[..., Any], owner: str | None) -> str:
    name = getattr(handler, "__name__", None) or type(handler).__name__
    if owner is not None:
        return f"{owner}.{name}"
    module = getattr(handler, "__module__", None)
    qualname = getattr(handler, "__qualname__", name)
    return f"{module}.{qualname}" if module else qualname


def wanted_payload(handler: Callable[..., Any], spec: EventSpec) -> tuple[str, ...] | None:
    """Check the handler's parameters against the event's payload, once, at registration."""
    where = f"handler {getattr(handler, '__qualname__', handler)!r} of event {spec.name!r}"
    try:
        signature = inspect.signature(handler)
    except (TypeError, ValueError) as exc:
        raise SubscriptionError(f"cannot read the signature of {where}: {exc}") from exc
    provided = spec.payload_names
    wants: list[str] = []
    takes_all = False
    for parameter in signature.parameters.values():
        if parameter.kind is parameter.VAR_KEYWORD:
            takes_all = True
        elif parameter.kind in (parameter.POSITIONAL_ONLY, parameter.VAR_POSITIONAL):
            raise SubscriptionError(
                f"{where} takes positional parameter {parameter.name!r}; handlers receive the "
                f"payload by keyword: write def handler(*, {', '.join(sorted(provided))})"
            )
        elif parameter.name in provided:
            wants.append(parameter.name)
        elif parameter.default is parameter.empty:
            raise SubscriptionError(
                f"{where} asks for {parameter.name!r}, which {spec.name!r} does not provide. "
                f"It provides: {', '.join(sorted(provided))}. Remove the parameter or give "
                "it a default."
            )
    return None if takes_all else tuple(wants)


def may_command(handler: Callable[..., Any]) -> bool:
    """Whether ``handler`` may return a command: it is not annotated ``-> None``."""
    try:
        annotation = inspect.signature(handler).return_annotation
    except (TypeError, ValueError):
        return True
    return annotation not in (None, "None", type(None))
