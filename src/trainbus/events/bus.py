"""The event bus: :class:`EventBus` calls the subscribers of an event, in order, with its payload.

The subscriptions and their per-event order live in
:class:`~trainbus.events.registry.SubscriptionRegistry`, which :class:`EventBus` extends: the
order is rebuilt only when subscriptions change, so dispatch does no sorting and no blinker
``send``, and an event nobody subscribed to costs one dictionary lookup. Dispatch applies the
filters (``every``, ``once``, ``when``) and the error policy (``on_error``), counts calls,
times sampled dispatches, and collects the commands handlers return.
"""

from __future__ import annotations

import functools
import time
import traceback
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from trainbus.errors import CommandError, ConfigurationTypeError, HandlerFailureWarning
from trainbus.events.callers import (
    BOUND_NAMES,
    Binding,
    Caller,
    can_generate,
    general,
    generate,
)
from trainbus.events.catalog import EventSpec
from trainbus.events.commands import Command, Request, SkipStep
from trainbus.events.registry import SubscriptionRegistry
from trainbus.events.subscription import (
    SOURCE_BUILTIN,
    SOURCE_USER,
    FailureStage,
    FastPlan,
    HandlerFailure,
    Payload,
    PlanEntry,
    Subscription,
    Wants,
    may_command,
)
from trainbus.events.text import escape_control

# The subscription records are part of the bus's interface: re-exported for its callers.
__all__ = [
    "SOURCE_BUILTIN",
    "SOURCE_USER",
    "EventBus",
    "FailureStage",
    "HandlerFailure",
    "Payload",
    "PlanEntry",
    "Subscription",
    "Wants",
    "may_command",
]


@dataclass(slots=True)
class _Accounting:
    sample_every: int = 0
    # Dispatches per event while sampling: one-item lists, shared with the generated callers.
    ticks: dict[str, list[int]] = field(default_factory=dict)


class EventBus(SubscriptionRegistry):
    """Priority-ordered publish/subscribe dispatcher on a private blinker namespace.

    ``rank`` marks this process's place in a distributed run: subscriptions registered with
    ``rank_zero_only=True`` stay in the plan but are not called on other ranks.
    """

    def __init__(self, *, rank: int = 0) -> None:
        self._accounting = _Accounting()
        self.failures: list[HandlerFailure] = []
        self.callers: dict[str, Caller] = {}
        self.wanted: dict[str, frozenset[str]] = {}
        """Per event with subscribers on this rank: the payload names they ask for."""
        self.version = 0
        """Counts subscription changes: emitters from :meth:`bind` are valid until it moves."""
        self.stateless: set[str] = set()
        """Events whose callers never read ``state``: the emitter may pass None for it."""
        """Per event with subscribers on this rank: a function taking the payload positionally
        (``state, model, maps``, then the event's names in catalogue order) that dispatches it
        and returns the requests (None or a list); see :mod:`trainbus.events.callers`."""
        super().__init__(rank=rank)

    def bind(self, event: str, binding: Binding) -> Caller | None:
        """An emitter of ``event`` for one loop (None when nobody on this rank listens).

        It takes the event's own payload names positionally (``state``, ``model`` and
        ``maps`` come from ``binding``) and returns what ``binding.handle`` makes of the
        requests. Valid until :attr:`version` changes (a subscription came or went).
        """
        subscribers = self._order.get(event)
        if not subscribers:
            return None
        spec = self._specs[event]
        names = (*BOUND_NAMES, *spec.payload)
        fast = self._fast.get(event)
        if fast is None or not can_generate(names):
            return _bound_general(
                functools.partial(self.dispatch, event, subscribers), spec.payload, binding
            )
        return self._generate(event, names, subscribers, fast, binding)

    def _refresh_caller(self, event: str) -> None:
        subscribers = self._order.get(event)
        self.stateless.discard(event)
        self.version += 1
        if not subscribers:
            self.callers.pop(event, None)
            self.wanted.pop(event, None)
            return
        spec = self._specs[event]
        names = ("state", "model", "maps", *spec.payload)
        self.wanted[event] = frozenset(
            name for s in subscribers for name in (names if s.wants is None else s.wants)
        )
        fast = self._fast.get(event)
        if fast is None or not can_generate(names):
            self.callers[event] = general(
                names, functools.partial(self.dispatch, event, subscribers)
            )
            return
        if "state" not in self.wanted[event]:
            self.stateless.add(event)
        self.callers[event] = self._generate(event, names, subscribers, fast, None)

    def _generate(
        self,
        event: str,
        names: tuple[str, ...],
        subscribers: tuple[Subscription, ...],
        fast: FastPlan,
        binding: Binding | None,
    ) -> Caller:
        spec, specs = self._specs[event], self._specs

        def collect(found: list[Request] | None, result: object, index: int) -> list[Request]:
            found = [] if found is None else found
            found.extend(_requests(result, subscribers[index], spec, specs))
            return found

        def fail(error: Exception, index: int) -> None:
            self._fast_failure(event, fast, subscribers[index], error)

        every = self._accounting.sample_every
        sampled = None
        if every:
            tick = self._accounting.ticks.setdefault(event, [0])
            timed = functools.partial(self._dispatch_general, event, subscribers, timed=True)
            sampled = (tick, every, timed)
        return generate(
            event,
            names,
            subscribers,
            counter=fast.counter,
            collect=collect,
            fail=fail,
            sampled=sampled,
            binding=binding,
        )

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
            tick = accounting.ticks.setdefault(event, [0])
            tick[0] += 1
            timed = tick[0] % accounting.sample_every == 0
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
        return self._dispatch_general(event, subscribers, payload, timed=timed)

    def _dispatch_general(
        self, event: str, subscribers: tuple[Subscription, ...], payload: Payload, *, timed: bool
    ) -> list[Request]:
        """Filters, the error policy and (when ``timed``) each handler's time, per call."""
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

    def _dispatch_fast(self, event: str, plan: FastPlan, payload: Payload) -> list[Request]:
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
    def _fast_failure(event: str, plan: FastPlan, failed: Subscription, exc: Exception) -> None:
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
        if options.when is not None:
            try:
                if not options.when(payload["state"]):
                    return False
            except Exception as exc:
                if subscription.on_error != "log":
                    exc.add_note(
                        f"trainbus: raised by the when= filter of handler {subscription.id!r} "
                        f"while handling event {subscription.event!r} (the handler was not "
                        "called); make the predicate return a bool for every state"
                    )
                    raise
                self._record_failure(subscription, exc, counter, stage="when filter")
                return False
        if options.once is not None:
            subscription.fired_once = True
        return True

    def _record_failure(
        self,
        subscription: Subscription,
        exc: Exception,
        counter: int,
        stage: FailureStage = "handler",
    ) -> None:
        failure = HandlerFailure(
            event=subscription.event,
            subscriber=subscription.id,
            error=f"{type(exc).__name__}: {exc}",
            traceback="".join(traceback.format_exception(exc)),
            counter=counter if subscription.filtered else None,
            stage=stage,
        )
        self.failures.append(failure)
        filtering = stage != "handler"
        what = f"{'the when= filter of ' if filtering else ''}handler {subscription.id!r}"
        skipped = "; the handler was skipped" if filtering else ""
        # Ids, event names and exception texts come from users: keep the console line intact.
        warnings.warn(
            escape_control(
                f"{what} raised {failure.error} while handling {subscription.event!r}"
                f"{skipped}; training goes on because it was subscribed with on_error='log'"
            ),
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
        for event in list(self._order):
            self._refresh_caller(event)


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


def _bound_general(
    dispatch: Callable[[Payload], list[Request]], names: tuple[str, ...], binding: Binding
) -> Caller:
    """An emitter for the general path (filters, ``on_error="log"``): builds the payload."""
    snapshot, model, maps = binding.snapshot, binding.model, binding.maps
    handle, nothing = binding.handle, binding.nothing

    def call(*values: Any) -> Any:
        payload = {"state": snapshot(), "model": model, "maps": maps}
        payload.update(zip(names, values, strict=True))
        requests = dispatch(payload)
        return handle(requests) if requests else nothing

    return call
