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


BLOCKED_JOB = """
import sys, time
sys.path.insert(0, {root!r})
from tests.conftest import make_loader, make_model
from trainbus import Trainer, TrainingCheckpointCallback
trainer = Trainer({maps!r}, make_model(), callbacks=[TrainingCheckpointCallback()],
                  default_callbacks=False, max_epochs=3)

@trainer.on("batch_end")
def block(*, state):
    if state.iteration == 3:
        print("blocked", flush=True)
        time.sleep(120)  # a handler (or a loader) that never returns

trainer.train(make_loader())
"""


@pytest.mark.fault(
    "A second SIGINT or SIGTERM while a handler blocks",
    outcome="the process ends at once with 128+signum and a line saying nothing was saved",
)
@pytest.mark.parametrize("name", ["SIGINT", "SIGTERM"])
def test_a_second_signal_aborts_a_blocked_run_saying_nothing_was_saved(
    tmp_path: Path, name: str
) -> None:
    import subprocess
    import sys
    import time

    number = signal.Signals[name]
    maps = tmp_path / "maps"
    root = str(Path(__file__).parents[2])
    job = subprocess.Popen(
        [sys.executable, "-c", BLOCKED_JOB.format(root=root, maps=str(maps))],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert job.stdout is not None and job.stderr is not None
        assert job.stdout.readline().strip() == "blocked"
        job.send_signal(number)
        first = job.stderr.readline()
        assert f"received {name}: stopping at the next step boundary" in first
        assert "again to abort without saving" in first
        time.sleep(0.8)  # past the window in which a repeat counts as the same signal
        job.send_signal(number)
        assert job.wait(timeout=30) == 128 + number
        second = job.stderr.read()
        assert f"received {name} again: aborting now; the training state was NOT saved" in second
    finally:
        job.kill()
        job.wait()
    assert not list((maps / "training").glob("state-*0003*"))


def test_a_repeat_within_the_window_counts_as_the_same_signal() -> None:
    from trainbus.engine.signals import REPEAT_WINDOW, StopSignals

    with StopSignals() as signals:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)  # a launcher forwarding what the group got
        assert signals.received == signal.SIGTERM
    assert REPEAT_WINDOW <= 1.0
