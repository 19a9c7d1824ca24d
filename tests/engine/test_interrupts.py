"""Stop signals during validation, the line saying how to resume, and interactive sessions."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader

from tests.conftest import ValidationCounter, make_dataset, make_loader, make_model
from trainbus import (
    MetricsWriterCallback,
    Trainer,
    TrainerState,
    TrainingCheckpointCallback,
)

ROOT = Path(__file__).parents[2]


def long_val_loader() -> DataLoader[tuple[torch.Tensor, ...]]:
    # shuffle=True without a generator: creating its iterator draws from the global RNG.
    return DataLoader(make_dataset(40, seed=3), batch_size=2, shuffle=True)


@pytest.fixture
def default_handlers() -> Iterator[None]:
    originals = {n: signal.getsignal(n) for n in (signal.SIGTERM, signal.SIGINT)}
    yield
    for number, handler in originals.items():
        signal.signal(number, handler)


def build(maps: Path, counter: ValidationCounter, **options: Any) -> Trainer:
    return Trainer(
        maps,
        make_model(),
        default_callbacks=[MetricsWriterCallback],
        callbacks=[TrainingCheckpointCallback(), counter],
        max_epochs=3,
        **options,
    )


@pytest.mark.parametrize(
    ("options", "at_validation"),
    [({}, 2), ({"val_check_interval": 4}, 3)],
    ids=["at-epoch-end", "inside-an-epoch"],
)
def test_a_signal_during_validation_stops_at_the_next_batch_and_the_resume_is_exact(
    tmp_path: Path,
    default_handlers: None,
    capfd: pytest.CaptureFixture[str],
    options: dict[str, Any],
    at_validation: int,
) -> None:
    straight_counter = ValidationCounter()
    straight = build(tmp_path / "straight", straight_counter, **options)
    straight.train(make_loader(shuffle=True), long_val_loader())

    cut_counter = ValidationCounter()
    cut = build(tmp_path / "cut", cut_counter, **options)
    validations = 0
    evaluated_after_signal: list[int] = []

    @cut.on("validation_start")
    def count(*, state: TrainerState) -> None:
        nonlocal validations
        validations += 1

    @cut.on("evaluation_step_end")
    def interrupt(*, state: TrainerState) -> None:
        if validations == at_validation and state.batch_idx == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        elif validations == at_validation and state.batch_idx > 3:
            evaluated_after_signal.append(state.batch_idx)

    with pytest.raises(SystemExit) as stopped:
        cut.train(make_loader(shuffle=True), long_val_loader())
    assert stopped.value.code == 128 + signal.SIGTERM
    assert evaluated_after_signal == []  # not the other 16 batches of the pass
    assert cut.state.stopped_by == "trainbus.signal"
    final_line = capfd.readouterr().err.strip().splitlines()[-1]
    assert final_line.startswith("trainbus: stopped by SIGTERM; training state ")
    assert "written; resume with train(..., resume=True)" in final_line
    assert f"Trainer.from_maps({str(tmp_path / 'cut')!r}, model)" in final_line

    resumed_counter = ValidationCounter()
    resumed = Trainer.from_maps(
        tmp_path / "cut",
        make_model(),
        callbacks=[TrainingCheckpointCallback(), resumed_counter],
    )
    resumed.train(make_loader(shuffle=True), long_val_loader())
    for name, tensor in straight.model.state_dict().items():
        assert torch.equal(tensor, resumed.model.state_dict()[name]), name
    assert resumed_counter.seen == straight_counter.seen
    straight_rows = (tmp_path / "straight" / "metrics.tsv").read_text().splitlines()
    assert (tmp_path / "cut" / "metrics.tsv").read_text().splitlines() == straight_rows


JOB = """
import os, signal, sys
sys.path.insert(0, {root!r})
from tests.conftest import make_loader, make_model
from trainbus import Trainer, TrainingCheckpointCallback
from trainbus.errors import TrainingInterrupted

trainer = Trainer(sys.argv[1], make_model(), default_callbacks=False,
                  callbacks=[TrainingCheckpointCallback()], max_epochs=3)

@trainer.on("batch_end")
def interrupt(*, state):
    if state.iteration == 2:
        os.kill(os.getpid(), signal.SIGINT)

try:
    trainer.train(make_loader())
except TrainingInterrupted as interrupted:
    print("interrupted", interrupted.signal, os.path.basename(interrupted.training_state))
    print("still alive", trainer.state.iteration)
"""


def test_an_interactive_session_gets_training_interrupted_not_an_exit(tmp_path: Path) -> None:
    # `python -c` runs without a __main__ file, as a notebook kernel does.
    done = subprocess.run(
        [sys.executable, "-c", JOB.format(root=str(ROOT)), str(tmp_path / "maps")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines()[-2:] == [
        f"interrupted {int(signal.SIGINT)} state-0000000002",
        "still alive 2",
    ]
    assert "trainbus: stopped by SIGINT; training state" in done.stderr


def test_a_script_exits_with_128_plus_the_signal(tmp_path: Path) -> None:
    script = tmp_path / "job.py"
    script.write_text(JOB.format(root=str(ROOT)))
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "maps")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 128 + signal.SIGINT, done.stderr[-2000:]
    assert "interrupted" not in done.stdout
    assert "resume with train(..., resume=True)" in done.stderr.splitlines()[-1]
