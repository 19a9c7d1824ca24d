"""The subscription side of the bus: blinker's registry, subscriber ids and the order tables.

blinker is the registry of record: each bus has its own :class:`blinker.Namespace` (never the
global default one), every subscription is a strongly referenced receiver of its event's
signal, and blinker's ``receiver_connected``/``receiver_disconnected`` notifications trigger a
rebuild of that event's tables. blinker's receiver order is undefined, so the tables hold, per
event, the subscriptions sorted by priority (higher first; ties in registration order, then
``before``/``after`` constraints): those of every rank (for the plan), those that run on this
rank, and the fast plan of an event whose subscriptions are all plain. :class:`EventBus`
dispatches from these tables; this module never calls a handler.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import blinker

from trainbus.errors import ConfigurationError, ConfigurationTypeError, SubscriptionError
from trainbus.events.catalog import (
    EVENTS,
    PAIRED_START,
    EventSpec,
    unknown_event,
    validate_spec,
)
from trainbus.events.marker import (
    OnError,
    Options,
    Predicate,
    as_ids,
    check_on_error,
    check_plain_handler,
    check_priority,
)
from trainbus.events.ordering import constrained, order_key
from trainbus.events.subscription import (
    SOURCE_USER,
    FastPlan,
    PlanEntry,
    Subscription,
    Wants,
    check_origin,
    derived_id,
    may_command,
    wanted_payload,
)

if TYPE_CHECKING:
    from trainbus.events.callback import Callback


class SubscriptionRegistry:
    """Who subscribed to what, in which order: the tables :class:`EventBus` dispatches from.

    ``rank`` marks this process's place in a distributed run: subscriptions registered with
    ``rank_zero_only=True`` stay in the plan but are not called on other ranks.
    """

    def __init__(self, *, rank: int = 0) -> None:
        if type(rank) is not int:  # bool is not a rank
            raise ConfigurationTypeError(
                f"rank={rank!r} ({type(rank).__name__}) is not an int; pass this process's "
                "rank in the distributed run, e.g. rank=0"
            )
        if rank < 0:
            raise ConfigurationError(
                f"rank={rank!r} is negative; ranks count from 0 (rank=0 on a single process)"
            )
        self.rank = rank
        self._namespace = blinker.Namespace()
        self._specs: dict[str, EventSpec] = dict(EVENTS)
        self._order: dict[str, tuple[Subscription, ...]] = {}
        self._full_order: dict[str, tuple[Subscription, ...]] = {}
        self._commanding: set[str] = set()
        # Events whose every active subscription is plain (no filter, on_error="raise") take
        # the fast path: no per-call bookkeeping; call counts are settled when read.
        self._fast: dict[str, FastPlan] = {}
        self._sequence = 0
        self._filter_memory: dict[str, dict[str, Any]] = {}

    # ----------------------------------------------------------------- events
    @property
    def events(self) -> Mapping[str, EventSpec]:
        """Every event this bus knows: the catalogue plus declared custom events."""
        return dict(self._specs)

    def declare(self, spec: EventSpec) -> EventSpec:
        """Declare a custom event; re-declaring the same spec is a no-op, a different one fails."""
        if not isinstance(spec, EventSpec):
            raise ConfigurationTypeError(
                f"declare() takes an EventSpec, got {spec!r}; "
                "write bus.declare(EventSpec('my_event', payload=('value',)))"
            )
        validate_spec(spec)
        existing = self._specs.get(spec.name)
        if existing is not None and existing != spec:
            raise SubscriptionError(
                f"event {spec.name!r} is already declared as {existing!r}; "
                "pick another name for the custom event"
            )
        self._specs[spec.name] = spec
        return spec

    def spec(self, event: str) -> EventSpec:
        """The spec of ``event``; unknown names raise with a did-you-mean hint."""
        try:
            return self._specs[event]
        except (KeyError, TypeError):
            raise unknown_event(event, self._specs) from None

    def signal(self, event: str) -> blinker.NamedSignal:
        """The blinker signal behind ``event`` (for blinker tooling; dispatch does not use it)."""
        self.spec(event)
        signal = self._namespace.get(event)
        if signal is None:
            signal = self._namespace.signal(event)
            signal.receiver_connected.connect(self._on_connected, weak=False)
            signal.receiver_disconnected.connect(self._on_disconnected, weak=False)
        return signal

    # ---------------------------------------------------------- subscriptions
    def subscribe(
        self,
        event: str,
        handler: Callable[..., Any],
        *,
        priority: int = 0,
        every: int | None = None,
        once: int | bool | None = None,
        when: Predicate | None = None,
        on_error: OnError = "raise",
        id: str | None = None,
        before: str | Iterable[str] = (),
        after: str | Iterable[str] = (),
        reverse: bool = False,
        source: str = SOURCE_USER,
        owner: str | None = None,
        rank_zero_only: bool = False,
    ) -> Subscription:
        """Subscribe ``handler`` to ``event``; every check happens here, not at dispatch.

        ``on_error`` is ``"raise"`` (stop training) or ``"log"`` (record and go on); ``source``
        names where the subscription comes from (``"user"``, ``"builtin"``, a plugin), ``owner``
        the callback id it belongs to (or None), and ``rank_zero_only=True`` calls it on rank 0
        only.
        """
        check_priority(priority)
        check_on_error(on_error)
        options = Options(
            priority,
            every,
            once,
            when,
            on_error,
            id,
            as_ids(before),
            as_ids(after),
            reverse,
        )
        return self.add(
            event, handler, options, source=source, owner=owner, rank_zero_only=rank_zero_only
        )

    def add(
        self,
        event: str,
        handler: Callable[..., Any],
        options: Options,
        *,
        source: str = SOURCE_USER,
        owner: str | None = None,
        rank_zero_only: bool = False,
    ) -> Subscription:
        """Subscribe ``handler`` with ready-made :class:`Options` (e.g. an ``@on`` mark's)."""
        return self._subscribe(event, handler, options, source, owner, rank_zero_only)

    def _subscribe(
        self,
        event: str,
        handler: Callable[..., Any],
        options: Options,
        source: str,
        owner: str | None,
        rank_zero_only: bool,
    ) -> Subscription:
        spec = self.spec(event)
        check_origin(source, owner, rank_zero_only)
        if not callable(handler):
            raise ConfigurationTypeError(
                f"handler {handler!r} for event {event!r} is not callable; "
                "subscribe a function or a bound method"
            )
        check_plain_handler(
            handler, f"handler {getattr(handler, '__qualname__', handler)!r} of event {event!r}"
        )
        wants = wanted_payload(handler, spec)
        if options.reverse and event not in PAIRED_START:
            raise SubscriptionError(
                f"reverse=True was asked for event {event!r}, which does not end a pair; "
                f"reverse applies to {', '.join(sorted(PAIRED_START))}"
            )
        base_id = options.id or derived_id(handler, owner)
        taken = {sub.id for sub in self._subscriptions(event)}
        if options.id is not None and options.id in taken:
            raise SubscriptionError(
                f"subscriber id {options.id!r} is already subscribed to {event!r}; "
                "give each subscription of an event a distinct id"
            )
        subscription_id = base_id
        copy = 1
        while subscription_id in taken:
            copy += 1
            subscription_id = f"{base_id}#{copy}"
        self._sequence += 1
        subscription = Subscription(
            id=subscription_id,
            event=event,
            handler=handler,
            priority=options.priority if options.priority is not None else 0,
            options=options,
            source=source,
            owner=owner,
            wants=wants,
            sequence=self._sequence,
            rank_zero_only=rank_zero_only,
            on_error=options.on_error or "raise",
            filtered=options.every is not None
            or options.once is not None
            or options.when is not None,
            commands=may_command(handler),
        )
        self._recall(subscription)
        self.signal(event).connect(subscription, weak=False)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        """Remove one subscription; the dispatch order is rebuilt."""
        self.signal(subscription.event).disconnect(subscription)

    def attach(self, callback: Callback, *, source: str = SOURCE_USER) -> list[Subscription]:
        """Subscribe every handler of ``callback`` (its ``on_<event>`` and ``@on`` methods)."""
        check_origin(source, None, callback.rank_zero_only)
        for spec in callback.events:
            self.declare(spec)
        made: list[Subscription] = []
        try:
            for event, handler, options in callback.handlers(self._specs):
                made.append(
                    self._subscribe(
                        event,
                        handler,
                        options,
                        source,
                        callback.callback_id,
                        callback.rank_zero_only,
                    )
                )
        except BaseException:
            for subscription in made:
                self.unsubscribe(subscription)
            raise
        return made

    def detach(self, callback_id: str) -> None:
        """Remove every subscription owned by the callback with this id."""
        for event in list(self._namespace):
            for subscription in self._subscriptions(event):
                if subscription.owner == callback_id:
                    self.unsubscribe(subscription)

    def _subscriptions(self, event: str) -> list[Subscription]:
        signal = self._namespace.get(event)
        if signal is None:
            return []
        return [r for r in signal.receivers.values() if isinstance(r, Subscription)]

    def _on_connected(self, signal: blinker.NamedSignal, **info: Any) -> None:
        receiver = info["receiver"]
        if not isinstance(receiver, Subscription):
            signal.disconnect(receiver)
            raise SubscriptionError(
                f"{receiver!r} was connected to {signal.name!r} through blinker directly; "
                "subscribe through bus.subscribe() or a Callback so it gets a priority and an id"
            )
        try:
            self._rebuild(signal.name)
        except SubscriptionError:
            signal.disconnect(receiver)  # the order without it is rebuilt, and stays valid
            raise

    def _on_disconnected(self, signal: blinker.NamedSignal, **_: Any) -> None:
        self._rebuild(signal.name)

    def _rebuild(self, event: str) -> None:
        ordered = self._resolve_order(event)
        if ordered:
            self._full_order[event] = ordered
        else:
            self._full_order.pop(event, None)
        if any(s.commands for s in ordered):
            self._commanding.add(event)
        else:
            self._commanding.discard(event)
        active = tuple(s for s in ordered if self.rank == 0 or not s.rank_zero_only)
        if active:
            self._order[event] = active
        else:
            self._order.pop(event, None)
        previous = self._fast.pop(event, None)
        if previous is not None:
            for subscription in previous.subscribers:
                subscription.counted_calls = subscription.calls
                subscription.fast_counter = None
        if active and not any(s.filtered or s.on_error == "log" for s in active):
            groups: list[Wants] = []
            for subscription in active:
                if subscription.wants not in groups:
                    groups.append(subscription.wants)
            counter = [0]
            for subscription in active:
                subscription.fast_counter = counter
            self._fast[event] = FastPlan(active, tuple(groups), counter, len(groups) == 1)
        self._refresh_caller(event)
        for end, start in PAIRED_START.items():
            if start == event and end in self._full_order:
                self._rebuild(end)  # reversed subscribers of the end event mirror this one

    def _refresh_caller(self, event: str) -> None:
        """Hook: the event's subscriptions changed (the dispatching bus regenerates its caller)."""

    def _resolve_order(self, event: str) -> tuple[Subscription, ...]:
        """Priorities (mirrored for ``reverse``), then ``before``/``after`` constraints."""
        subscriptions = self._subscriptions(event)
        start = PAIRED_START.get(event)
        if start is not None and any(s.options.reverse for s in subscriptions):
            opened = {s.owner or s.id: s for s in reversed(self._full_order.get(start, ()))}

            def key(subscription: Subscription) -> tuple[int, int]:
                if not subscription.options.reverse:
                    return order_key(subscription)
                mirror = opened.get(subscription.owner or subscription.id, subscription)
                return (mirror.priority, -mirror.sequence)

            ordered = sorted(subscriptions, key=key)
        else:
            ordered = sorted(subscriptions, key=order_key)
        if not any(s.options.before or s.options.after for s in ordered):
            return tuple(ordered)
        return constrained(event, ordered)

    def subscriptions(self, event: str | None = None) -> list[Subscription]:
        """Every subscription, or those of one event, in dispatch order (inactive ones too)."""
        events = [event] if event is not None else list(self._specs)
        if event is not None:
            self.spec(event)
        found: list[Subscription] = []
        for name in events:
            found.extend(self._full_order.get(name, ()))
        return found

    # ------------------------------------------------------------------- plan
    def plan(self, event: str | None = None) -> list[PlanEntry]:
        """The dispatch plan as data: per event, who runs in which order with which filter."""
        entries: list[PlanEntry] = []
        current = None
        position = 0
        for subscription in self.subscriptions(event):
            if subscription.event != current:
                current, position = subscription.event, 0
            position += 1
            entries.append(
                PlanEntry(
                    event=subscription.event,
                    position=position,
                    id=subscription.id,
                    priority=subscription.priority,
                    filter=subscription.options.describe_filter(),
                    source=subscription.source,
                    owner=subscription.owner,
                    on_error=subscription.on_error,
                    rank_zero_only=subscription.rank_zero_only,
                    active=self.rank == 0 or not subscription.rank_zero_only,
                    commands=subscription.commands,
                    order=subscription.options.describe_order(),
                )
            )
        return entries

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Filter bookkeeping that must survive a resume, per ``event:subscriber id``.

        Holds, for each filtered subscription, the occurrences it witnessed (events without a
        state counter) and whether its ``once`` filter already fired.
        """
        memory = dict(self._filter_memory)
        for subscription in self.subscriptions():
            if subscription.filtered:
                memory[subscription.memory_key] = {
                    "seen": subscription.seen,
                    "fired_once": subscription.fired_once,
                }
        return {"filters": memory}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (also for subscriptions made later)."""
        filters = state.get("filters", {})
        self._filter_memory = {
            str(key): {"seen": int(value["seen"]), "fired_once": bool(value["fired_once"])}
            for key, value in filters.items()
        }
        for subscription in self.subscriptions():
            self._recall(subscription)

    def _recall(self, subscription: Subscription) -> None:
        memory = self._filter_memory.get(subscription.memory_key)
        if memory is not None:
            subscription.seen = memory["seen"]
            subscription.fired_once = memory["fired_once"]
