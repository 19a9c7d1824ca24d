"""Helpers shared by the bus tests: a torch-free state stand-in and an emit with full payload."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from trainbus.events import EventBus, Request


@dataclass(frozen=True)
class State:
    """Carries the two counters filters read: ``iteration`` and ``epoch_number``."""

    iteration: int = 0
    epoch_number: int = 1


MODEL = object()
MAPS = object()


def emit(bus: EventBus, event: str, state: State | None = None, **extra: Any) -> list[Request]:
    """Emit ``event`` with the common payload and ``None`` for every extra name not given."""
    values: dict[str, Any] = dict.fromkeys(bus.spec(event).payload)
    values.update(extra)
    return bus.emit(event, state=state or State(), model=MODEL, maps=MAPS, **values)
