"""Lock-step measurement: contenders train side by side in threads that take turns.

Whole-fit timings interleaved between repeats drift with the load of a shared machine (the
hand-written loop alone ranged 1.01-1.20x between runs). Here every contender trains in its
own thread on the same batches, and the threads take turns every ``turn`` steps: a baton is
handed over when a contender draws its next batch. Each step is timed with the thread's own
CPU clock (``time.thread_time``), from one batch draw to the next, so waiting for the baton
costs nothing and a step of one contender is measured minutes, not hours, from the same step
of the others. The first ``warmup`` steps after each turn are left out (caches refill after a
switch). The figure of a contender is the median over steps of the paired ratio
``contender's step k / reference's step k``.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

Runner = Callable[[Any, list[Any]], None]


class Baton:
    """Round-robin turns among named threads; a thread that finished leaves the round."""

    def __init__(self, names: Sequence[str]) -> None:
        self._round = list(names)
        self._holder = 0
        self._condition = threading.Condition()

    def wait_turn(self, name: str) -> None:
        """Block until ``name`` holds the baton."""
        with self._condition:
            self._condition.wait_for(lambda: self._round[self._holder] == name)

    def pass_on(self, name: str, *, leave: bool = False) -> None:
        """Hand the baton to the next thread of the round (``leave``: and quit the round)."""
        with self._condition:
            index = self._round.index(name)
            if leave:
                self._round.pop(index)
                self._holder = index % len(self._round) if self._round else 0
            else:
                self._holder = (index + 1) % len(self._round)
            self._condition.notify_all()


@dataclass
class StepClock:
    """The batches of one contender, timing each step at the draw of the next batch."""

    name: str
    batches: list[Any]
    baton: Baton
    turn: int
    warmup: int
    steps: list[float | None] = field(default_factory=list)
    finished: bool = False

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[Any]:
        last = 0.0
        for index, batch in enumerate(self.batches):
            now = time.thread_time()
            if index:
                counted = (index - 1) % self.turn >= self.warmup
                self.steps.append(now - last if counted else None)
            if index % self.turn == 0:
                if index:
                    self.baton.pass_on(self.name)
                self.baton.wait_turn(self.name)
            last = time.thread_time()
            yield batch
        now = time.thread_time()
        counted = (len(self.batches) - 1) % self.turn >= self.warmup
        self.steps.append(now - last if counted else None)
        self.finish()

    def finish(self) -> None:
        """Leave the round (once); a runner that never asked past the last batch ends here."""
        if self.finished:
            return
        self.finished = True
        self.steps.extend([None] * (len(self.batches) - len(self.steps)))
        self.baton.pass_on(self.name, leave=True)


def run_lockstep(
    runners: dict[str, Runner],
    make_network: Callable[[], Any],
    batches: list[Any],
    *,
    turn: int = 20,
    warmup: int = 3,
) -> dict[str, list[float | None]]:
    """Train every contender in its own thread, in turns; each one's per-step CPU times."""
    names = list(runners)
    baton = Baton(names)
    clocks = {name: StepClock(name, batches, baton, turn, warmup) for name in names}
    failures: dict[str, BaseException] = {}

    def train(name: str) -> None:
        try:
            runners[name](make_network(), clocks[name])  # type: ignore[arg-type]
        except BaseException as exc:
            failures[name] = exc
        finally:
            clocks[name].finish()

    threads = [threading.Thread(target=train, args=(name,), name=name) for name in names]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        name, error = next(iter(failures.items()))
        raise RuntimeError(f"contender {name} failed: {error!r}") from error
    return {name: clock.steps for name, clock in clocks.items()}


def paired(steps: dict[str, list[float | None]], reference: str) -> dict[str, dict[str, float]]:
    """Per contender: median, quartiles of the paired ratio to ``reference``, extra us/step."""
    base = steps[reference]
    results: dict[str, dict[str, float]] = {}
    for name, own in steps.items():
        pairs = [(mine, theirs) for mine, theirs in zip(own, base, strict=True)]
        kept = [(m, t) for m, t in pairs if m is not None and t is not None and t > 0]
        ratios = sorted(m / t for m, t in kept)
        extra = sorted((m - t) * 1e6 for m, t in kept)
        quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
        results[name] = {
            "steps": len(kept),
            "us_per_step": statistics.median(m for m, _ in kept) * 1e6,
            "ratio": statistics.median(ratios),
            "ratio_q1": quartiles[0],
            "ratio_q3": quartiles[2],
            "extra_us": statistics.median(extra),
        }
    return results
