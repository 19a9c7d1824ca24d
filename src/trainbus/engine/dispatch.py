"""Announcing events: the payload of each, the subscribers' requests, and agreement across ranks.

The training loop announces its step events through emitters bound to it
(:meth:`Dispatcher.emitters`); every other event goes through :meth:`Dispatcher.fire` or
:meth:`Dispatcher.emit`. An event nobody subscribed to costs one lookup (no snapshot is
built). The requests handlers return go to the :class:`~trainbus.engine.policy.CommandPolicy`;
in a distributed run they are first made known to every rank at the next agreement, so that
every rank acts on them at the same step.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping
from types import MappingProxyType
from typing import Any

from trainbus.engine.distributed import ProcessGroup
from trainbus.engine.policy import CommandPolicy
from trainbus.engine.signals import StopSignals
from trainbus.engine.state import StateKeeper
from trainbus.events.bus import EventBus
from trainbus.events.callers import Binding
from trainbus.events.commands import Request, SkipStep, merge
from trainbus.events.text import escape_control


class Dispatcher:
    """Emits events with the shared payload and routes the requests to the policy."""

    __slots__ = (
        "_agreement_due",
        "_callers",
        "_stateless",
        "_unshared",
        "agreed_signal",
        "bus",
        "distributed",
        "group",
        "maps",
        "model",
        "policy",
        "signals",
        "state",
    )

    def __init__(
        self,
        bus: EventBus,
        state: StateKeeper,
        model: Any,
        maps: Any,
        policy: CommandPolicy,
        *,
        distributed: bool = False,
    ) -> None:
        self.bus = bus
        self._callers = bus.callers
        self._stateless = bus.stateless
        self.distributed = distributed
        self.state = state
        self.model = model
        self.maps = maps
        self.policy = policy
        self.group: ProcessGroup | None = None
        self.signals = StopSignals()
        self.agreed_signal = 0
        self._unshared: list[Request] = []
        self._agreement_due = False

    def fire(self, event: str, *payload: Any) -> list[Request] | None:
        """Call the subscribers of ``event`` with its payload in the catalogue's order.

        One lookup when nobody listens (no snapshot is built), else the bus's generated caller
        (:mod:`trainbus.events.callers`). Returns the requests, already handed to the policy
        (or kept for the next agreement across ranks).
        """
        call = self._callers.get(event)
        if self.group is not None and self.bus.may_command(event):
            self._agreement_due = True
        if call is None:
            return None
        # A snapshot is built only for subscribers that read it.
        state = None if event in self._stateless else self.state.snapshot()
        requests: list[Request] | None = call(state, self.model, self.maps, *payload)
        if requests:
            if self.group is None:
                self.policy.accept(requests)
            else:
                self._unshared.extend(requests)
        return requests

    def emitters(self, events: Iterable[str]) -> dict[str, Callable[..., Any] | None]:
        """One emitter per event for the loop's hot path (None: nobody listens on this rank).

        An emitter takes the event's own payload positionally; a skippable event's returns
        whether to skip. In one process they are the bus's emitters bound to this loop
        (valid until ``bus.version`` changes); under torchrun every event goes through
        :meth:`fire`, so that each rank knows when to agree.
        """
        specs = self.bus.events
        if self.group is not None:
            return {
                event: functools.partial(
                    self.fire_skippable if specs[event].skippable else self.fire, event
                )
                for event in events
            }
        accept = self.policy.accept

        def handle(found: list[Request]) -> list[Request]:
            accept(found)
            return found

        def handle_skip(found: list[Request]) -> bool:
            accept(found)
            return merge(found).skip is not None

        keeper = self.state
        plain = Binding(keeper.snapshot, self.model, self.maps, handle, None, keeper)
        skippable = Binding(keeper.snapshot, self.model, self.maps, handle_skip, False, keeper)
        return {
            event: self.bus.bind(event, skippable if specs[event].skippable else plain)
            for event in events
        }

    def request(self, requests: list[Request], *, agreed: bool = False) -> None:
        """Hand the loop's own requests to the policy, as a handler's would be.

        In a distributed run they wait for the next agreement, unless ``agreed``: every rank
        made the same requests at the same step (then each takes them at once).
        """
        if self.group is None or agreed:
            self.policy.accept(requests)
        else:
            self._unshared.extend(requests)

    def emit(self, event: str, **extra: Any) -> list[Request] | None:
        """:meth:`fire` with the payload by name (for events off the hot path)."""
        names = self.bus.spec(event).payload
        return self.fire(event, *(extra[name] for name in names))

    def fire_skippable(self, event: str, *payload: Any) -> bool:
        """Fire ``event``; True when a handler (on any rank) asked to skip the step."""
        requests = self.fire(event, *payload)
        if self.group is None:
            return bool(requests) and merge(requests).skip is not None  # type: ignore[arg-type]
        if not self.bus.may_command(event):
            return False
        agreed = self.agree()
        return any(isinstance(r.command, SkipStep) and r.event == event for r in agreed)

    def agree(self, *, only_if_due: bool = False) -> list[Request]:
        """Distributed runs: make the requests of every rank (and any signal) known to all.

        A collective, so every rank calls it at the same points: after events whose
        subscribers may return commands (:meth:`EventBus.may_command`, the same on every
        rank), at log intervals, and at the boundaries of epochs and of training.
        """
        group = self.group
        if group is None or (only_if_due and not self._agreement_due):
            return []
        self._agreement_due = False
        local, self._unshared = self._unshared, []
        agreed, received = group.agree(local, self.signals.received or 0)
        if received and not self.agreed_signal:
            self.agreed_signal = received
        if agreed:
            self.policy.accept(agreed)
        return agreed

    def signal_received(self) -> int:
        """The stop signal to act on (0: none); in a distributed run, the one agreed on."""
        if self.distributed:
            return self.agreed_signal
        return self.signals.received or 0

    def open_group(self, group: ProcessGroup | None) -> None:
        """Use ``group`` for the agreements of the call that starts (None: the call ended)."""
        self.group = group
        if group is not None:
            self.agreed_signal = 0
        self._unshared = []
        self._agreement_due = False

    def deliver_exception(self, error: BaseException) -> None:
        """Send ``exception`` to every subscriber; their own failures are attached as notes."""
        payload = {
            "state": self.state.snapshot(),
            "model": self.model,
            "maps": self.maps,
            "exception": error,
        }
        for subscription in self.bus.dispatch_order("exception"):
            try:
                self.bus.dispatch("exception", (subscription,), payload)
            except Exception as handler_error:
                error.add_note(
                    escape_control(
                        f"trainbus: exception handler {subscription.id!r} also raised "
                        f"{type(handler_error).__name__}: {handler_error}"
                    )
                )


def read_only(metrics: Mapping[str, float]) -> Mapping[str, float]:
    """A view of ``metrics`` no handler can change (what the loop and other handlers see)."""
    return MappingProxyType(dict(metrics))
