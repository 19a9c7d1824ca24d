"""SIGTERM/SIGINT inside train(): recorded, acted on at a step boundary, handlers restored."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import make_loader
from trainbus import Trainer, TrainerState


@pytest.fixture
def own_handlers() -> Iterator[dict[int, Any]]:
    """Install recognisable handlers for both signals; put the originals back afterwards."""

    def mine(number: int, frame: object) -> None:
        raise AssertionError(f"the user's handler ran for {number}")

    originals = {n: signal.getsignal(n) for n in (signal.SIGTERM, signal.SIGINT)}
    for number in originals:
        signal.signal(number, mine)
    yield dict.fromkeys(originals, mine)
    for number, handler in originals.items():
        signal.signal(number, handler)


def test_the_previous_handlers_are_restored_after_train_returns_or_raises(
    quiet_trainer: Callable[..., Trainer], own_handlers: dict[int, Any]
) -> None:
    quiet_trainer().train(make_loader())
    assert {n: signal.getsignal(n) for n in own_handlers} == own_handlers
    failing = quiet_trainer(overwrite=True)

    @failing.on("batch_end")
    def fail() -> None:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        failing.train(make_loader())
    assert {n: signal.getsignal(n) for n in own_handlers} == own_handlers


@pytest.mark.parametrize("name", ["SIGTERM", "SIGINT"])
def test_a_signal_stops_at_the_step_boundary_with_a_state_and_exits_128_plus_signum(
    quiet_trainer: Callable[..., Trainer],
    own_handlers: dict[int, Any],
    maps_path: Path,
    name: str,
) -> None:
    number = signal.Signals[name]
    trainer = quiet_trainer(max_epochs=3)
    seen: list[int] = []

    @trainer.on("batch_end")
    def interrupt(*, state: TrainerState) -> None:
        seen.append(state.iteration)
        if state.iteration == 4:
            os.kill(os.getpid(), number)
            os.kill(os.getpid(), number)  # a second one changes nothing

    with pytest.raises(SystemExit) as caught:
        trainer.train(make_loader())
    assert caught.value.code == 128 + number
    assert seen == [1, 2, 3, 4]
    assert trainer.state.stopped_by == "trainbus.signal"
    assert trainer.state.stop_reason == f"received {name}"
    assert (maps_path / "training" / "state-0000000004").is_dir()
    assert {n: signal.getsignal(n) for n in own_handlers} == own_handlers
