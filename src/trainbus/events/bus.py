"""The event bus: blinker keeps the subscriptions, the bus decides the order and calls handlers.

blinker is the registry of record: each bus has its own :class:`blinker.Namespace` (never the
global default one), every subscription is a strongly referenced receiver of its event's
signal, and blinker's ``receiver_connected``/``receiver_disconnected`` notifications tell the
bus when to rebuild its dispatch order. blinker's receiver order is undefined, so the bus keeps
per event a tuple of subscriptions sorted by priority (higher first; ties in registration
order) and calls them directly: no sorting and no ``send`` on the hot path, and an event nobody
subscribed to costs one dictionary lookup.
"""

from __future__ import annotations

import heapq
import inspect
import time
import traceback
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import blinker

from trainbus.errors import (
    CommandError,
    ConfigurationError,
    ConfigurationTypeError,
    HandlerFailureWarning,
    SubscriptionError,
)
from trainbus.events.catalog import (
    EVENTS,
    PAIRED_START,
    EventSpec,
    unknown_event,
    validate_spec,
)
from trainbus.events.commands import Command, Request, SkipStep
from trainbus.events.marker import (
    OnError,
    Options,
    Predicate,
    as_ids,
    check_on_error,
    check_priority,
)

if TYPE_CHECKING:
    from trainbus.events.callback import Callback

Wants = tuple[str, ...] | None
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
class _FastPlan:
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
    """A failure of an ``on_error="log"`` subscription, reported at the end of the run."""

    event: str
    subscriber: str
    error: str
    traceback: str
    counter: int | None = None


@dataclass(slots=True)
class _Accounting:
    sample_every: int = 0
    dispatches: dict[str, int] = field(default_factory=dict)


class EventBus:
    """Priority-ordered publish/subscribe dispatcher on a private blinker namespace.

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
        self._fast: dict[str, _FastPlan] = {}
        self._sequence = 0
        self._filter_memory: dict[str, dict[str, Any]] = {}
        self._accounting = _Accounting()
        self.failures: list[HandlerFailure] = []

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
        _check_origin(source, owner, rank_zero_only)
        if not callable(handler):
            raise ConfigurationTypeError(
                f"handler {handler!r} for event {event!r} is not callable; "
                "subscribe a function or a bound method"
            )
        wants = _wanted_payload(handler, spec)
        if options.reverse and event not in PAIRED_START:
            raise SubscriptionError(
                f"reverse=True was asked for event {event!r}, which does not end a pair; "
                f"reverse applies to {', '.join(sorted(PAIRED_START))}"
            )
        base_id = options.id or _derived_id(handler, owner)
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
        _check_origin(source, None, callback.rank_zero_only)
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
            self._fast[event] = _FastPlan(active, tuple(groups), counter, len(groups) == 1)
        for end, start in PAIRED_START.items():
            if start == event and end in self._full_order:
                self._rebuild(end)  # reversed subscribers of the end event mirror this one

    def _resolve_order(self, event: str) -> tuple[Subscription, ...]:
        """Priorities (mirrored for ``reverse``), then ``before``/``after`` constraints."""
        subscriptions = self._subscriptions(event)
        start = PAIRED_START.get(event)
        if start is not None and any(s.options.reverse for s in subscriptions):
            opened = {s.owner or s.id: s for s in reversed(self._full_order.get(start, ()))}

            def key(subscription: Subscription) -> tuple[int, int]:
                if not subscription.options.reverse:
                    return _order_key(subscription)
                mirror = opened.get(subscription.owner or subscription.id, subscription)
                return (mirror.priority, -mirror.sequence)

            ordered = sorted(subscriptions, key=key)
        else:
            ordered = sorted(subscriptions, key=_order_key)
        if not any(s.options.before or s.options.after for s in ordered):
            return tuple(ordered)
        return _constrained(event, ordered)

    # --------------------------------------------------------------- dispatch
    def dispatch_order(self, event: str) -> tuple[Subscription, ...]:
        """The subscriptions ``event`` calls, in order (empty when nobody listens). One lookup."""
        return self._order.get(event, ())

    def has_subscribers(self, event: str) -> bool:
        """Whether dispatching ``event`` would call anything."""
        return event in self._order

    def may_command(self, event: str) -> bool:
        """Whether a subscriber of ``event``, on any rank, may return a command.

        A handler annotated ``-> None`` never does; any other (unannotated included) may. A
        distributed run agrees on commands across ranks only after events for which this is
        true, so the answer counts subscribers that run on rank 0 only as well.
        """
        return event in self._commanding

    def emit(self, event: str, /, **payload: Any) -> list[Request]:
        """Dispatch ``event`` with ``payload``; returns the commands handlers asked for."""
        subscribers = self._order.get(event)
        if subscribers is None:
            self.spec(event)
            return []
        return self.dispatch(event, subscribers, payload)

    def dispatch(
        self, event: str, subscribers: tuple[Subscription, ...], payload: Payload
    ) -> list[Request]:
        """Call ``subscribers`` of ``event`` in order; collect the commands they return.

        A handler that raises stops the dispatch (its exception gets a note naming the event
        and the handler) unless it was subscribed with ``on_error="log"``.
        """
        accounting = self._accounting
        if accounting.sample_every:
            count = accounting.dispatches.get(event, 0) + 1
            accounting.dispatches[event] = count
            timed = count % accounting.sample_every == 0
        else:
            timed = False
        fast = self._fast.get(event)
        if fast is not None and not timed and fast.subscribers is subscribers:
            # The hot path: plain subscriptions, no sampled timing.
            if not fast.uniform:
                return self._dispatch_fast(event, fast, payload)
            wants = fast.groups[0]
            keywords = payload if wants is None else {name: payload[name] for name in wants}
            fast.counter[0] += 1
            found: list[Request] | None = None
            current = subscribers[0]
            try:
                for current in subscribers:
                    result = current.handler(**keywords)
                    if result is not None:
                        if found is None:
                            found = []
                        found.extend(_requests(result, current, self._specs[event], self._specs))
            except Exception as exc:
                self._fast_failure(event, fast, current, exc)
                raise
            return [] if found is None else found
        counter = 0
        filtered = any(s.filtered for s in subscribers)
        if filtered:
            name = self._specs[event].counter
            if name is not None:
                counter = int(getattr(payload["state"], name))
        requests: list[Request] | None = None
        # Handlers asking for the same payload names share one keyword dict per dispatch.
        arguments: dict[tuple[str, ...], Payload] = {}
        for subscription in subscribers:
            if filtered and subscription.filtered:
                if self._specs[event].counter is None:
                    subscription.seen += 1
                    counter = subscription.seen
                if not self._passes(subscription, counter, payload):
                    continue
            wants = subscription.wants
            if wants is None:
                keywords = payload
            elif wants in arguments:
                keywords = arguments[wants]
            else:
                keywords = arguments[wants] = {name: payload[name] for name in wants}
            subscription.counted_calls += 1
            try:
                if timed:
                    started = time.perf_counter()
                    result = subscription.handler(**keywords)
                    subscription.seconds += time.perf_counter() - started
                    subscription.timed_calls += 1
                else:
                    result = subscription.handler(**keywords)
                if result is not None:
                    if requests is None:
                        requests = []
                    requests.extend(
                        _requests(result, subscription, self._specs[event], self._specs)
                    )
            except Exception as exc:
                if subscription.on_error == "log":
                    self._record_failure(subscription, exc, counter)
                    continue
                exc.add_note(
                    f"trainbus: raised by handler {subscription.id!r} "
                    f"while handling event {event!r}"
                )
                raise
        return [] if requests is None else requests

    def _dispatch_fast(self, event: str, plan: _FastPlan, payload: Payload) -> list[Request]:
        """Plain subscriptions only: the handler calls and one counter, nothing per call."""
        shared = {
            wants: payload if wants is None else {name: payload[name] for name in wants}
            for wants in plan.groups
        }
        plan.counter[0] += 1
        requests: list[Request] | None = None
        current = plan.subscribers[0]
        try:
            for current in plan.subscribers:
                result = current.handler(**shared[current.wants])
                if result is not None:
                    if requests is None:
                        requests = []
                    requests.extend(_requests(result, current, self._specs[event], self._specs))
        except Exception as exc:
            self._fast_failure(event, plan, current, exc)
            raise
        return [] if requests is None else requests

    @staticmethod
    def _fast_failure(event: str, plan: _FastPlan, failed: Subscription, exc: Exception) -> None:
        exc.add_note(f"trainbus: raised by handler {failed.id!r} while handling event {event!r}")
        # The counter counted the whole dispatch: those after the failing handler were not called.
        for later in plan.subscribers[plan.subscribers.index(failed) + 1 :]:
            later.counted_calls -= 1

    def _passes(self, subscription: Subscription, counter: int, payload: Payload) -> bool:
        options = subscription.options
        if options.every is not None and counter % options.every:
            return False
        if options.once is not None:
            if subscription.fired_once:
                return False
            if options.once is not True and counter != options.once:
                return False
        if options.when is not None and not options.when(payload["state"]):
            return False
        if options.once is not None:
            subscription.fired_once = True
        return True

    def _record_failure(self, subscription: Subscription, exc: Exception, counter: int) -> None:
        failure = HandlerFailure(
            event=subscription.event,
            subscriber=subscription.id,
            error=f"{type(exc).__name__}: {exc}",
            traceback="".join(traceback.format_exception(exc)),
            counter=counter if subscription.filtered else None,
        )
        self.failures.append(failure)
        warnings.warn(
            f"handler {subscription.id!r} raised {failure.error} while handling "
            f"{subscription.event!r}; training goes on because it was subscribed with "
            "on_error='log'",
            HandlerFailureWarning,
            stacklevel=2,
        )

    # ------------------------------------------------------------- accounting
    def measure_time(self, sample_every: int) -> None:
        """Time one dispatch in ``sample_every`` per event (0 turns timing off)."""
        if type(sample_every) is not int or sample_every < 0:
            raise ConfigurationTypeError(
                f"sample_every={sample_every!r} is not a non-negative int; 0 turns timing off"
            )
        self._accounting.sample_every = sample_every

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


def _order_key(subscription: Subscription) -> tuple[int, int]:
    return (-subscription.priority, subscription.sequence)


def _targets(target: str, subscriptions: Sequence[Subscription]) -> list[int]:
    """Positions of the subscriptions ``target`` names: a subscriber id, or a callback id."""
    return [
        index
        for index, s in enumerate(subscriptions)
        if s.id == target or s.owner == target or s.id.startswith(f"{target}.")
    ]


def _constrained(event: str, ordered: Sequence[Subscription]) -> tuple[Subscription, ...]:
    """A topological order of the ``before``/``after`` graph, closest to ``ordered``.

    The constrained subscription moves: one that must run ``before`` others moves up to just
    before the first of them, one that must run ``after`` others waits for the last of them;
    everything else keeps its priority order. Deterministic: ties go to the earlier position
    in ``ordered``.
    """
    successors: list[set[int]] = [set() for _ in ordered]
    pulled_by: list[set[int]] = [set() for _ in ordered]  # before= edges only
    for index, subscription in enumerate(ordered):
        for target in subscription.options.before:
            targets = {t for t in _targets(target, ordered) if t != index}
            successors[index].update(targets)
            pulled_by[index].update(targets)
        for target in subscription.options.after:
            for t in _targets(target, ordered):
                if t != index:
                    successors[t].add(index)
    waiting = [0] * len(ordered)
    for targets in successors:
        for index in targets:
            waiting[index] += 1
    walk = _topological(successors, waiting)
    if len(walk) < len(ordered):
        # Kahn's walk leaves exactly the nodes of a cycle, and those behind one, waiting.
        cycle = _find_cycle(successors, sorted(set(range(len(ordered))) - set(walk)))
        path = " -> ".join(ordered[i].id for i in [*cycle, cycle[0]])
        raise SubscriptionError(
            f"the before=/after= constraints of {event!r} form a cycle: {path} (each must run "
            "before the next); remove one of these constraints"
        )
    anchor = list(range(len(ordered)))
    for index in reversed(walk):
        for following in pulled_by[index]:
            anchor[index] = min(anchor[index], anchor[following])
    ready = [(anchor[index], index) for index, count in enumerate(waiting) if count == 0]
    heapq.heapify(ready)
    result: list[Subscription] = []
    while ready:
        _, index = heapq.heappop(ready)
        result.append(ordered[index])
        for following in successors[index]:
            waiting[following] -= 1
            if waiting[following] == 0:
                heapq.heappush(ready, (anchor[following], following))
    return tuple(result)


def _topological(successors: Sequence[set[int]], waiting: Sequence[int]) -> list[int]:
    remaining = list(waiting)
    queue = [index for index, count in enumerate(remaining) if count == 0]
    result = []
    while queue:
        index = queue.pop()
        result.append(index)
        for following in successors[index]:
            remaining[following] -= 1
            if remaining[following] == 0:
                queue.append(following)
    return result


def _find_cycle(successors: Sequence[set[int]], candidates: Sequence[int]) -> list[int]:
    """One cycle among the nodes Kahn's walk left waiting, in constraint order.

    Each of them still waits for a predecessor that is left too, so walking back along
    predecessors never stops and must come round to a node already seen.
    """
    allowed = set(candidates)
    predecessors: dict[int, list[int]] = {node: [] for node in allowed}
    for node, following in enumerate(successors):
        if node in allowed:
            for successor in following:
                if successor in allowed:
                    predecessors[successor].append(node)
    path: list[int] = []
    seen: dict[int, int] = {}
    node = min(allowed)
    while node not in seen:
        seen[node] = len(path)
        path.append(node)
        node = min(predecessors[node])
    cycle = list(reversed(path[seen[node] :]))
    start = cycle.index(min(cycle))  # named from its earliest subscriber, for stable messages
    return cycle[start:] + cycle[:start]


def _check_origin(source: object, owner: object, rank_zero_only: object) -> None:
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


def _derived_id(handler: Callable[..., Any], owner: str | None) -> str:
    name = getattr(handler, "__name__", None) or type(handler).__name__
    if owner is not None:
        return f"{owner}.{name}"
    module = getattr(handler, "__module__", None)
    qualname = getattr(handler, "__qualname__", name)
    return f"{module}.{qualname}" if module else qualname


def _wanted_payload(handler: Callable[..., Any], spec: EventSpec) -> tuple[str, ...] | None:
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


def _requests(
    result: object, subscription: Subscription, spec: EventSpec, specs: Mapping[str, EventSpec]
) -> Iterable[Request]:
    if not subscription.commands:
        raise CommandError(
            f"handler {subscription.id!r} of event {spec.name!r} is annotated to return None "
            f"but returned {result!r}; annotate what it returns (e.g. '-> Stop | None') so "
            "that a distributed run knows to agree on its commands"
        )
    commands = result if isinstance(result, list | tuple) else (result,)
    for command in commands:
        if not isinstance(command, Command):
            raise CommandError(
                f"handler {subscription.id!r} of event {spec.name!r} returned {command!r}; "
                "a handler returns None, a command (Stop, SkipStep, SaveCheckpoint, "
                "SaveTrainingState) or a list of commands"
            )
        if isinstance(command, SkipStep) and not spec.skippable:
            skippable = ", ".join(n for n, s in specs.items() if s.skippable)
            raise CommandError(
                f"handler {subscription.id!r} returned SkipStep at {spec.name!r}, where there "
                f"is no step to skip; SkipStep is accepted at: {skippable}"
            )
        yield Request(command, subscription.id, spec.name)
