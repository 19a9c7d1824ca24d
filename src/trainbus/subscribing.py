"""Subscribing to a Trainer's bus and emitting custom events: the facade's second room."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from trainbus.engine.call import CallRunner
from trainbus.engine.core import Engine
from trainbus.errors import ConfigurationError
from trainbus.events.catalog import EVENTS
from trainbus.events.marker import Mark, OnError, Predicate, add_mark

F = TypeVar("F", bound=Callable[..., Any])


class Subscribing:
    """``plan``, ``on`` and ``emit`` of :class:`~trainbus.Trainer`, over its engine's bus."""

    _engine: Engine
    _calls: CallRunner

    def plan(self, event: str | None = None) -> list[dict[str, Any]]:
        """The dispatch plan as JSON-ready rows (see :meth:`EventBus.plan`)."""
        return [entry.as_dict() for entry in self._engine.bus.plan(event)]

    # ---------------------------------------------------------------- subscribing
    def on(
        self,
        event: str,
        *,
        priority: int = 0,
        every: int | None = None,
        once: int | bool | None = None,
        when: Predicate | None = None,
        on_error: OnError = "raise",
        id: str | None = None,
        before: str | Sequence[str] = (),
        after: str | Sequence[str] = (),
        reverse: bool = False,
        rank_zero_only: bool = False,
    ) -> Callable[[F], F]:
        """Decorator: subscribe a function to ``event`` on this trainer's bus.

        ``before``/``after`` name subscriber ids (or callback ids) this one must precede or
        follow whatever the priorities say; ``reverse=True`` at an end event mirrors the
        order of the paired start event (see :class:`~trainbus.events.marker.Options`);
        ``rank_zero_only=True`` calls it on rank 0 only in a run launched by torchrun.

        ::

            @trainer.on("epoch_end", priority=5, every=2)
            def report(*, state):
                print(state.current_epoch, dict(state.metrics))
        """

        def register(function: F) -> F:
            subscription = self._engine.bus.subscribe(
                event,
                function,
                priority=priority,
                every=every,
                once=once,
                when=when,
                on_error=on_error,
                id=id,
                before=before,
                after=after,
                reverse=reverse,
                source="user",
                rank_zero_only=rank_zero_only,
            )
            return add_mark(function, Mark(event, subscription.options))

        return register

    def emit(self, event: str, /, **payload: Any) -> None:
        """Emit a custom event (declared with ``trainer.bus.declare``) with its payload names.

        Only inside a call (from a handler, or from code the loop runs), on the thread that
        runs it. Commands its handlers return follow the loop's rules: a save is carried out
        at the loop's next boundary (see :mod:`trainbus.engine.policy`).
        """
        bus = self._engine.bus
        spec = bus.spec(event)
        if event in EVENTS:
            raise ConfigurationError(
                f"emit({event!r}): built-in events are announced by the loop only; declare a "
                "custom event (trainer.bus.declare(EventSpec(...))) and emit that"
            )
        given = set(payload)
        expected = set(spec.payload)
        if given != expected:
            raise ConfigurationError(
                f"emit({event!r}) got payload {sorted(given)}, but the event declares "
                f"{sorted(expected)} (state, model and maps are added by the trainer)"
            )
        self._calls.check_emitting(event)
        self._engine.dispatcher.emit(event, **payload)
