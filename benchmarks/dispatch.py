"""Micro-benchmarks of the bus: dispatch to 0, 1, 10 and 100 subscribers, snapshots, filters.

Run: ``.venv/bin/python benchmarks/dispatch.py`` (``--quick`` for a short smoke run). Reports the
best of several repeats (the least disturbed by other load): per dispatch and per subscriber
call; the cost of building one state snapshot; and a dispatch to 10 subscribers whose
``every=`` / ``when=`` filters let none through.
"""

from __future__ import annotations

import argparse
import platform
import timeit
from dataclasses import dataclass

from trainbus.events import EventBus


@dataclass(frozen=True, slots=True)
class _State:
    iteration: int = 1


def _noop(*, state: _State) -> None:
    return None


PAYLOAD = {
    "state": _State(),
    "model": None,
    "maps": None,
    "batch": None,
    "loss": None,
    "losses": None,
}
"""What the Trainer passes with ``batch_end``."""


def measure(subscribers: int, number: int, repeat: int) -> float:
    """Seconds per dispatch of ``batch_end`` with ``subscribers`` no-op handlers.

    As the loop dispatches: one lookup of the event's generated caller, then the payload
    passed positionally to it.
    """
    bus = EventBus()
    for index in range(subscribers):
        bus.subscribe("batch_end", _noop, id=f"noop-{index}")
    callers = bus.callers
    state, model, maps, batch, loss, losses = PAYLOAD.values()

    def dispatch_once() -> None:
        call = callers.get("batch_end")
        if call is not None:
            call(state, model, maps, batch, loss, losses)

    return min(timeit.repeat(dispatch_once, number=number, repeat=repeat)) / number


def measure_snapshot(number: int, repeat: int) -> float:
    """Seconds to record one change and build the frozen snapshot the next event carries."""
    from trainbus.engine.state import StateKeeper

    keeper = StateKeeper(max_epochs=10)
    counter = iter(range(10**9))

    def change_and_build() -> None:
        keeper.update(iteration=next(counter))
        keeper.snapshot()

    return min(timeit.repeat(change_and_build, number=number, repeat=repeat)) / number


def measure_filtered(kind: str, number: int, repeat: int) -> float:
    """Seconds per dispatch to 10 subscribers whose filters let nothing through."""
    bus = EventBus()
    for index in range(10):
        if kind == "every":
            bus.subscribe("batch_end", _noop, id=f"f-{index}", every=1_000_000)
        else:
            bus.subscribe("batch_end", _noop, id=f"f-{index}", when=_never)

    def dispatch_once() -> None:
        bus.dispatch("batch_end", bus.dispatch_order("batch_end"), PAYLOAD)

    return min(timeit.repeat(dispatch_once, number=number, repeat=repeat)) / number


def _never(state: _State) -> bool:
    return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="few iterations (CI smoke run)")
    arguments = parser.parse_args()
    number, repeat = (200, 2) if arguments.quick else (20_000, 7)
    print(f"python {platform.python_version()} on {platform.machine()}")
    print(f"{'subscribers':>11}  {'per dispatch':>12}  {'per subscriber':>14}")
    for subscribers in (0, 1, 10, 100):
        seconds = measure(subscribers, number, repeat)
        per_call = f"{seconds / subscribers * 1e6:.3f} us" if subscribers else "-"
        print(f"{subscribers:>11}  {seconds * 1e6:>9.3f} us  {per_call:>14}")
    print(f"snapshot: one change + build {measure_snapshot(number, repeat) * 1e6:.3f} us")
    for kind in ("every", "when"):
        seconds = measure_filtered(kind, number, repeat)
        print(f"filtered: 10 subscribers, {kind}= skips all {seconds * 1e6:.3f} us")


if __name__ == "__main__":
    main()
