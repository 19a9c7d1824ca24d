"""The catalogue's map of where each event fires is checked against recorded runs.

The map in ``trainbus.events.catalog``'s docstring is parsed into one regular expression per
entry point (``repeat`` blocks become ``(...)*``, ``optionally`` blocks ``(...)?``); real runs
record the events they emit, with their payload names, and the sequence must match.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from trainbus import EVENTS, Callback, Model, SaveCheckpoint, SkipStep, Stop, Trainer
from trainbus.events import catalog
from trainbus.events.catalog import COMMON_PAYLOAD

from .conftest import make_loader, make_model

MAP_HEADER = "Where each event fires"


def parse_map() -> dict[str, str]:
    """Entry point name -> regular expression over space-separated event names."""
    doc = catalog.__doc__ or ""
    block = doc[doc.index(MAP_HEADER) :].split("::", 1)[1]
    lines = [line for line in block.splitlines() if line.strip()]
    body = []
    for line in lines:
        if not line.startswith("    "):
            break
        body.append(line[4:])
    entries: dict[str, list[tuple[int, str]]] = {}
    current = ""
    for line in body:
        indent = len(line) - len(line.lstrip())
        text = line.strip()
        if indent == 0:
            current = text.split("(")[0]
            entries[current] = []
        else:
            entries[current].append((indent, text))
    return {name: "^" + _compile(items) + "$" for name, items in entries.items()}


def _compile(items: list[tuple[int, str]]) -> str:
    pattern, rest = _block(items, items[0][0] if items else 0)
    assert not rest
    return pattern


def _block(items: list[tuple[int, str]], indent: int) -> tuple[str, list[tuple[int, str]]]:
    parts: list[str] = []
    while items and items[0][0] == indent:
        _, text = items[0]
        items = items[1:]
        if text.endswith(":"):
            inner, items = _block(items, items[0][0])
            suffix = "*" if text.startswith("repeat") else "?"
            assert text.startswith(("repeat", "optionally")), text
            parts.append(f"(?:{inner}){suffix}")
            continue
        token = text.split()[0]
        name = token.rstrip("?*")
        assert name in EVENTS, f"the map names {name!r}, which is not in the catalogue"
        quantifier = token[len(name) :]
        parts.append(f"(?:{name} ){quantifier}")
    return "".join(parts), items


class Recorder:
    """Subscribes to every event (lowest priority) and records names and payload keys."""

    def __init__(self, trainer: Trainer) -> None:
        self.events: list[tuple[str, frozenset[str]]] = []
        for name in EVENTS:
            if name != "trainer_init":
                trainer.bus.subscribe(name, self._recorder(name), priority=-(10**6))

    def _recorder(self, name: str) -> Callable[..., None]:
        def record(**payload: Any) -> None:
            self.events.append((name, frozenset(payload)))

        return record

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.events]

    def sequence(self) -> str:
        return "".join(f"{name} " for name in self.names)

    def clear(self) -> None:
        self.events.clear()


def assert_matches(entry: str, recorder: Recorder) -> None:
    pattern = parse_map()[entry]
    assert re.match(pattern, recorder.sequence()), (
        f"{entry}: recorded {recorder.names} does not follow the map {pattern}"
    )
    for name, payload in recorder.events:
        assert payload == set(COMMON_PAYLOAD) | set(EVENTS[name].payload), name


def build(tmp_path: Path, **options: Any) -> tuple[Trainer, Recorder]:
    defaults: dict[str, Any] = {"default_callbacks": False, "max_epochs": 2}
    defaults.update(options)
    trainer = Trainer(tmp_path / "maps", make_model(), **defaults)
    return trainer, Recorder(trainer)


def test_every_catalogue_event_appears_in_the_map() -> None:
    doc = catalog.__doc__ or ""
    mapped = set(re.findall(r"\b([a-z_]+)\b[?*]?", doc[doc.index(MAP_HEADER) :]))
    assert set(EVENTS) - mapped == set()
    assert set(parse_map()) == {"Trainer", "train", "validate", "test", "predict"}


def test_trainer_init_is_the_first_event(tmp_path: Path) -> None:
    seen: list[str] = []

    class First(Callback):
        def on_trainer_init(self, *, state: Any) -> None:
            seen.append(state.stage)

    Trainer(tmp_path / "maps", make_model(), callbacks=[First()], default_callbacks=False)
    assert seen == ["idle"]
    assert re.match(parse_map()["Trainer"], "trainer_init ")


def test_train_with_validation_accumulation_and_logging_follows_the_map(tmp_path: Path) -> None:
    trainer, recorder = build(
        tmp_path, accumulate_grad_batches=2, log_every_n_batches=2, max_epochs=2
    )
    trainer.train(make_loader(samples=40, batch_size=8), make_loader(samples=16, batch_size=8))
    assert_matches("train", recorder)
    names = recorder.names
    assert names.count("epoch_start") == 2
    assert names.count("batch_start") == 10
    # 5 batches per epoch with accumulation 2: steps after batches 2, 4 and the remainder 5.
    assert names.count("optimizer_step_end") == 6
    assert names.count("validation_start") == 2
    assert names.count("evaluation_step_start") == 4
    assert names.count("loss_logged") == 6
    assert names[-2:] == ["train_end", "teardown"]


def test_stop_at_a_batch_event_cuts_the_epoch_and_still_ends_cleanly(tmp_path: Path) -> None:
    trainer, recorder = build(tmp_path, max_epochs=3)

    @trainer.on("batch_end")
    def stop_at_third(*, state: Any) -> Stop | None:
        return Stop("enough") if state.iteration == 3 else None

    state = trainer.train(make_loader(), make_loader(samples=16))
    assert_matches("train", recorder)
    names = recorder.names
    assert names.count("batch_end") == 3
    assert "validation_start" not in names
    assert names[-4:] == ["batch_end", "epoch_end", "train_end", "teardown"]
    assert state.stopped_by is not None and state.stopped_by.endswith("stop_at_third")
    assert state.stop_reason == "enough"


def test_stop_at_epoch_end_finishes_that_epoch(tmp_path: Path) -> None:
    trainer, recorder = build(tmp_path, max_epochs=5)

    @trainer.on("epoch_end")
    def stop_after_second(*, state: Any) -> Stop | None:
        return Stop() if state.current_epoch == 1 else None

    trainer.train(make_loader(), make_loader(samples=16))
    assert_matches("train", recorder)
    assert recorder.names.count("epoch_end") == 2
    assert recorder.names.count("validation_end") == 2


def test_skips_and_checkpoints_follow_the_map(tmp_path: Path) -> None:
    trainer, recorder = build(tmp_path, max_epochs=1, accumulate_grad_batches=2)

    @trainer.on("batch_start")
    def skip_second(*, state: Any) -> SkipStep | None:
        return SkipStep("test") if state.iteration == 2 else None

    @trainer.on("backward_start")
    def skip_fourth_backward(*, state: Any) -> SkipStep | None:
        return SkipStep("test") if state.iteration == 4 else None

    @trainer.on("optimizer_step_start")
    def skip_steps(*, state: Any) -> SkipStep:
        return SkipStep("frozen")

    @trainer.on("batch_end")
    def save_at_third(*, state: Any) -> SaveCheckpoint | None:
        return SaveCheckpoint("third") if state.iteration == 3 else None

    @trainer.on("epoch_end")
    def save_twice(*, state: Any) -> list[SaveCheckpoint]:
        return [SaveCheckpoint("epoch"), SaveCheckpoint("last")]

    @trainer.on("train_end")
    def save_final(*, state: Any) -> SaveCheckpoint:
        return SaveCheckpoint("final")

    trainer.train(make_loader(samples=48, batch_size=8))
    assert_matches("train", recorder)
    names = recorder.names
    assert names.count("forward_start") == 5
    assert names.count("backward_end") == 4
    assert names.count("optimizer_step_start") == 2
    assert names.count("optimizer_step_end") == 0
    assert names.count("checkpoint") == 4
    assert names[-3:] == ["train_end", "checkpoint", "teardown"]


@pytest.mark.parametrize("entry", ["validate", "test"])
def test_evaluation_entry_points_follow_the_map(tmp_path: Path, entry: str) -> None:
    trainer, recorder = build(tmp_path)
    metrics = getattr(trainer, entry)(make_loader(samples=24, batch_size=8))
    assert set(metrics) == {"loss"}
    assert_matches(entry, recorder)
    assert recorder.names.count("evaluation_step_end") == 3


def test_predict_follows_the_map(tmp_path: Path) -> None:
    trainer, recorder = build(tmp_path)
    predictions = trainer.predict(make_loader(samples=24, batch_size=8))
    assert len(predictions) == 3
    assert_matches("predict", recorder)


class Exploding(Model):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 2)

    def forward_step(self, batch: Any) -> torch.Tensor:
        raise RuntimeError("boom")


def test_an_exception_sends_exception_then_teardown(tmp_path: Path) -> None:
    trainer = Trainer(tmp_path / "maps", Exploding(), default_callbacks=False)
    recorder = Recorder(trainer)
    with pytest.raises(RuntimeError, match="boom"):
        trainer.train(make_loader())
    assert recorder.names[-2:] == ["exception", "teardown"]
    before_failure = recorder.sequence().rsplit("exception ", 1)[0]
    assert before_failure == "train_start epoch_start batch_start forward_start "


def test_a_resume_in_the_middle_of_an_epoch_follows_the_map(tmp_path: Path) -> None:
    from trainbus import TrainingCheckpointCallback

    class InterruptionError(Exception):
        pass

    first = Trainer(
        tmp_path / "maps",
        make_model(),
        callbacks=[TrainingCheckpointCallback(every_n_steps=4)],
        default_callbacks=False,
        max_epochs=2,
    )

    @first.on("checkpoint")
    def interrupt(*, kind: str) -> None:
        if kind == "training":
            raise InterruptionError

    with pytest.raises(InterruptionError):
        first.train(make_loader())
    trainer = Trainer.from_maps(
        tmp_path / "maps", make_model(), callbacks=[TrainingCheckpointCallback(every_n_steps=4)]
    )
    recorder = Recorder(trainer)
    trainer.train(make_loader(), make_loader(samples=16))
    assert_matches("train", recorder)
    names = recorder.names
    assert names[:3] == ["train_start", "resume", "batch_start"]
    assert names.count("epoch_start") == 1
    assert names.count("batch_start") == 2 + 6
