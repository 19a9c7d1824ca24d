from __future__ import annotations

import io
import json
import logging
import math
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import pytest
import structlog
import torch

import trainbus.handlers.logger as logger_module
from trainbus import (
    LoggerCallback,
    Maps,
    ModelCheckpointCallback,
    Stop,
    Trainer,
    TrainerState,
    TrainingCheckpointCallback,
)
from trainbus.engine.state import FrozenDict
from trainbus.errors import ConfigurationError, ConfigurationTypeError

from ..conftest import make_loader, make_model

LINE = re.compile(r"^\d\d:\d\d:\d\d \[(\w+) *\] (\w+) ")


class FakeTerminal(io.StringIO):
    """A text stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


class Clock:
    """A controlled clock for the console throttle: time moves only when told to."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    controlled = Clock()
    monkeypatch.setattr(logger_module, "_monotonic", controlled)
    return controlled


def console_run(
    quiet_trainer: Callable[..., Trainer],
    *,
    samples: int = 48,
    log_every_n_batches: int = 50,
    stream: IO[str] | None = None,
    clock: Clock | None = None,
    seconds_per_batch: float = 0.0,
    maps: Path | None = None,
    trainer_options: dict[str, Any] | None = None,
    **logger_options: Any,
) -> tuple[Trainer, str]:
    """Train with a LoggerCallback writing to ``stream``; returns the trainer and the output.

    With a ``clock``, time moves by ``seconds_per_batch`` at each batch and nowhere else.
    """
    target = io.StringIO() if stream is None else stream
    options: dict[str, Any] = {
        "log_every_n_batches": log_every_n_batches,
        **(trainer_options or {}),
    }
    if maps is not None:
        options["maps"] = maps
    trainer = quiet_trainer(callbacks=[LoggerCallback(stream=target, **logger_options)], **options)
    if clock is not None:

        @trainer.on("batch_start")
        def tick() -> None:
            clock.now += seconds_per_batch

    trainer.train(make_loader(samples), make_loader(16))
    output = target.getvalue() if isinstance(target, io.StringIO) else ""
    return trainer, output


def log_entries(trainer: Trainer) -> list[dict[str, Any]]:
    lines = trainer.maps.file("logs", "train.jsonl").read_text().splitlines()
    return [json.loads(line, parse_constant=refuse_constant) for line in lines]


def refuse_constant(name: str) -> Any:
    raise AssertionError(f"{name} is not valid JSON")


def console_events(output: str) -> list[str]:
    return [match.group(2) for match in map(LINE.match, output.splitlines()) if match]


def of_kind(entries: list[dict[str, Any]], event: str) -> list[dict[str, Any]]:
    return [entry for entry in entries if entry["event"] == event]


# ----------------------------------------------------------------- console, not a terminal
def test_progress_on_a_non_terminal_stream_is_plain_lines(
    quiet_trainer: Callable[..., Trainer], clock: Clock
) -> None:
    trainer, output = console_run(quiet_trainer, clock=clock)
    assert "\r" not in output
    lines = output.splitlines()
    assert all(LINE.match(line) for line in lines), output
    assert console_events(output) == [
        "train_start",
        "train_loss",
        "epoch_end",
        "epoch_end",
        "train_end",
    ]
    # People read epochs from 1, as the progress bar counts them; the JSON lines from 0.
    assert "epoch=1/2 batch=6/6 loss=" in lines[1]
    assert re.search(r"epoch_end +epoch=1/2 train_loss=[\d.]+ val_loss=[\d.]+ ", lines[2])
    assert re.search(r"epoch_end +epoch=2/2 train_loss=[\d.]+ val_loss=[\d.]+ ", lines[3])
    entries = log_entries(trainer)
    assert [e["epoch"] for e in of_kind(entries, "epoch_end")] == [0, 1]


@pytest.mark.parametrize("console_interval", [10.0, 0.05])
def test_console_lines_to_a_file_are_bounded_however_often_the_loss_is_logged(
    quiet_trainer: Callable[..., Trainer], tmp_path: Path, console_interval: float
) -> None:
    epochs, batches = 3, 40
    log_path = tmp_path / "console.log"
    with log_path.open("w", encoding="utf-8") as stream:
        started = time.monotonic()
        trainer, _ = console_run(
            quiet_trainer,
            samples=8 * batches,
            log_every_n_batches=1,
            stream=stream,
            console_interval=console_interval,
            trainer_options={"max_epochs": epochs},
        )
        elapsed = time.monotonic() - started
    output = log_path.read_text(encoding="utf-8")
    assert "\r" not in output
    events = console_events(output)
    assert len(events) == len(output.splitlines())
    # Start and end, one summary per epoch, and loss lines at least console_interval apart.
    loss_lines_bound = 1 + math.floor(elapsed / console_interval)
    assert events.count("train_loss") <= loss_lines_bound
    assert len(events) <= 2 + epochs + loss_lines_bound
    assert events[0] == "train_start" and events[-1] == "train_end"
    assert events.count("epoch_end") == epochs
    assert events.count("train_loss") >= 1
    # The JSON lines are not throttled: one train_loss record per batch.
    assert len(of_kind(log_entries(trainer), "train_loss")) == epochs * batches


@pytest.mark.parametrize(
    ("console_interval", "seconds_per_batch", "shown"),
    [
        (10.0, 4.0, [("1", "1/6"), ("1", "4/6"), ("2", "1/6"), ("2", "4/6")]),
        (25.0, 4.0, [("1", "1/6"), ("2", "2/6")]),
        (4.0, 4.0, [(str(i // 6 + 1), f"{i % 6 + 1}/6") for i in range(12)]),
        (10.0, 0.0, [("1", "1/6")]),
    ],
)
def test_loss_lines_are_at_least_console_interval_apart(
    quiet_trainer: Callable[..., Trainer],
    clock: Clock,
    console_interval: float,
    seconds_per_batch: float,
    shown: list[tuple[str, str]],
) -> None:
    trainer, output = console_run(
        quiet_trainer,
        log_every_n_batches=1,
        clock=clock,
        seconds_per_batch=seconds_per_batch,
        console_interval=console_interval,
    )
    assert re.findall(r"train_loss +epoch=(\d)/2 batch=(\d/6)", output) == shown
    assert len(output.splitlines()) == 2 + 2 + len(shown)
    assert len(of_kind(log_entries(trainer), "train_loss")) == 12
    seconds = 6 * seconds_per_batch
    assert [e["seconds"] for e in of_kind(log_entries(trainer), "epoch_end")] == [seconds] * 2
    assert re.findall(r"time=([\d.]+)s", output) == [f"{seconds:.1f}"] * 2


def test_the_number_of_console_lines_does_not_grow_with_the_batches(
    quiet_trainer: Callable[..., Trainer], tmp_path: Path, clock: Clock
) -> None:
    _, short = console_run(quiet_trainer, samples=48, maps=tmp_path / "short", clock=clock)
    _, long = console_run(quiet_trainer, samples=192, maps=tmp_path / "long", clock=clock)
    assert len(long.splitlines()) == len(short.splitlines()) == 5


def test_the_epoch_summary_line_has_loss_metrics_improvement_and_time(
    quiet_trainer: Callable[..., Trainer], clock: Clock
) -> None:
    trainer, output = console_run(
        quiet_trainer, log_every_n_batches=2, clock=clock, seconds_per_batch=1.5
    )
    summaries = [line for line in output.splitlines() if " epoch_end " in line]
    entries = of_kind(log_entries(trainer), "epoch_end")
    assert len(summaries) == len(entries) == 2
    for line, entry in zip(summaries, entries, strict=True):
        assert f"epoch={entry['epoch'] + 1}/2 train_loss={entry['train_loss']} " in line
        assert f"val_loss={entry['metrics']['loss']} " in line
        assert line.endswith(" time=9.0s")
        assert ("improved=loss" in line) == (entry["improved"] == ["loss"])


def test_standalone_evaluation_prints_one_line_per_call(
    quiet_trainer: Callable[..., Trainer],
) -> None:
    stream = io.StringIO()
    trainer = quiet_trainer(callbacks=[LoggerCallback(stream=stream)])
    validated = trainer.validate(make_loader(16))
    tested = trainer.test(make_loader(16))
    lines = stream.getvalue().splitlines()
    assert console_events(stream.getvalue()) == ["validate_metrics", "test_metrics"]
    shown_validated = re.search(r"validate_metrics +validate_loss=([\d.]+)$", lines[0])
    shown_tested = re.search(r"test_metrics +test_loss=([\d.]+)$", lines[1])
    assert shown_validated and shown_tested
    assert float(shown_validated.group(1)) == pytest.approx(validated["loss"], rel=1e-5)
    assert float(shown_tested.group(1)) == pytest.approx(tested["loss"], rel=1e-5)
    entries = log_entries(trainer)
    assert [(e["event"], set(e["metrics"])) for e in entries] == [
        ("validate_metrics", {"loss"}),
        ("test_metrics", {"loss"}),
    ]
    assert entries[0]["metrics"]["loss"] == pytest.approx(validated["loss"], rel=1e-5)
    assert entries[1]["metrics"]["loss"] == pytest.approx(tested["loss"], rel=1e-5)


# --------------------------------------------------------------------------- terminal
def test_a_terminal_stream_shows_a_bar_and_summaries_without_loss_lines(
    quiet_trainer: Callable[..., Trainer],
) -> None:
    trainer, output = console_run(quiet_trainer, stream=FakeTerminal(), log_every_n_batches=1)
    assert "\r" in output
    assert re.search(r"epoch 1/2: +\d+%\|[^|]*\| *\d/6", output)
    assert re.search(r"epoch 2/2: +\d+%\|[^|]*\| *\d/6", output)
    assert "train_loss " not in output
    assert console_events(output.replace("\r", "\n")).count("epoch_end") == 2
    assert len(of_kind(log_entries(trainer), "train_loss")) == 12


@pytest.mark.parametrize(
    ("stream", "progress_bar", "bar"),
    [
        (FakeTerminal, None, True),
        (FakeTerminal, False, False),
        (io.StringIO, None, False),
        (io.StringIO, True, True),
    ],
)
def test_progress_bar_option_against_the_kind_of_stream(
    quiet_trainer: Callable[..., Trainer],
    stream: Callable[[], io.StringIO],
    progress_bar: bool | None,
    bar: bool,
) -> None:
    trainer, output = console_run(quiet_trainer, stream=stream(), progress_bar=progress_bar)
    assert ("\r" in output) is bar
    assert (re.search(r"epoch 1/2: +\d+%\|", output) is not None) is bar
    batch_handlers = [
        row["id"] for row in trainer.plan("batch_end") if row["id"].startswith("LoggerCallback")
    ]
    assert batch_handlers == (["LoggerCallback.on_batch_end"] if bar else [])


def test_progress_bar_knows_the_number_of_batches_in_the_first_epoch(
    quiet_trainer: Callable[..., Trainer],
) -> None:
    _, output = console_run(quiet_trainer, progress_bar=True)
    assert re.search(r"epoch 1/2: +\d+%\|[^|]*\| *\d/6", output)


def test_console_false_writes_nothing_to_the_stream(
    quiet_trainer: Callable[..., Trainer],
) -> None:
    trainer, output = console_run(quiet_trainer, console=False, progress_bar=True)
    assert output == ""
    assert [e["event"] for e in log_entries(trainer)].count("epoch_end") == 2


# ------------------------------------------------------------------------ JSON lines
def test_the_json_lines_file_records_the_run(quiet_trainer: Callable[..., Trainer]) -> None:
    trainer, _ = console_run(quiet_trainer, log_every_n_batches=3)
    entries = log_entries(trainer)
    epoch = [
        "epoch_start",
        "train_loss",
        "train_loss",
        "validation_metrics",
        "epoch_end",
    ]
    assert [e["event"] for e in entries] == ["train_start", *epoch, *epoch, "train_end"]
    assert all(e["level"] == "info" and e["timestamp"].endswith("Z") for e in entries)
    start = entries[0]
    assert start["max_epochs"] == 2
    assert start["maps"] == str(trainer.maps.path)
    epoch_starts = of_kind(entries, "epoch_start")
    assert [(e["epoch"], e["num_batches"], e["lr"]) for e in epoch_starts] == [
        (0, 6, [0.05]),
        (1, 6, [0.05]),
    ]
    losses = of_kind(entries, "train_loss")
    assert [(e["epoch"], e["batch"]) for e in losses] == [
        (0, "3/6"),
        (0, "6/6"),
        (1, "3/6"),
        (1, "6/6"),
    ]
    assert all(e["lr"] == [0.05] and isinstance(e["loss"], float) for e in losses)
    validation = of_kind(entries, "validation_metrics")[-1]
    assert validation["epoch"] == 1
    assert validation["metrics"]["loss"] == pytest.approx(trainer.state.metrics["loss"], rel=1e-5)
    assert validation["improved"] == (["loss"] if trainer.state.best_epochs["loss"] == 1 else [])
    for summary in of_kind(entries, "epoch_end"):
        interval = [e["loss"] for e in losses if e["epoch"] == summary["epoch"]]
        assert summary["train_loss"] == pytest.approx(sum(interval) / 2, rel=1e-5)
        assert summary["seconds"] >= 0
        assert (
            summary["metrics"]
            == of_kind(entries, "validation_metrics")[summary["epoch"]]["metrics"]
        )
    end = entries[-1]
    assert (end["global_step"], end["epochs"], end["stopped_by"], end["reason"]) == (
        12,
        2,
        None,
        None,
    )


def test_epoch_train_loss_weights_each_interval_by_its_batches(
    quiet_trainer: Callable[..., Trainer],
) -> None:
    # 6 batches, logged every 4 iterations: intervals of 4 and 2 batches, then 2 and 4.
    trainer, _ = console_run(quiet_trainer, log_every_n_batches=4, console=False)
    entries = log_entries(trainer)
    losses = of_kind(entries, "train_loss")
    assert [(e["epoch"], e["batch"]) for e in losses] == [
        (0, "4/6"),
        (0, "6/6"),
        (1, "2/6"),
        (1, "6/6"),
    ]
    first, second = of_kind(entries, "epoch_end")
    assert first["train_loss"] == pytest.approx((4 * losses[0]["loss"] + 2 * losses[1]["loss"]) / 6)
    assert second["train_loss"] == pytest.approx(
        (2 * losses[2]["loss"] + 4 * losses[3]["loss"]) / 6
    )


def test_checkpoints_are_recorded_with_their_kind(quiet_trainer: Callable[..., Trainer]) -> None:
    trainer = quiet_trainer(
        callbacks=[
            LoggerCallback(console=False),
            ModelCheckpointCallback("loss", save_last=False),
            TrainingCheckpointCallback(save_on_train_end=False),
        ]
    )
    trainer.train(make_loader(), make_loader(16))
    records = of_kind(log_entries(trainer), "checkpoint")
    kinds = {record["kind"] for record in records}
    assert kinds == {"weights", "training"}
    for record in records:
        assert Path(record["path"]).is_dir()
        assert Path(record["path"]).name == record["tag"]
    training = [r["tag"] for r in records if r["kind"] == "training"]
    assert training == ["state-0000000006-epoch-end", "state-0000000012-epoch-end"]


def test_the_stop_reason_is_recorded_at_train_end(
    quiet_trainer: Callable[..., Trainer],
) -> None:
    stream = io.StringIO()
    trainer = quiet_trainer(callbacks=[LoggerCallback(stream=stream)], max_epochs=5)

    @trainer.on("epoch_end", id="plateau")
    def stop() -> Stop:
        return Stop("no progress")

    trainer.train(make_loader(), make_loader(16))
    end = log_entries(trainer)[-1]
    assert (end["event"], end["epochs"], end["stopped_by"], end["reason"]) == (
        "train_end",
        1,
        "plateau",
        "no progress",
    )
    assert (
        stream.getvalue()
        .splitlines()[-1]
        .endswith("epochs=1 global_step=6 stopped_by=plateau reason='no progress'")
    )


def test_validate_and_exception_are_logged(quiet_trainer: Callable[..., Trainer]) -> None:
    logger = LoggerCallback(console=False)
    trainer = quiet_trainer(callbacks=[logger])
    trainer.validate(make_loader(16))

    @trainer.on("batch_end", when=lambda s: s.iteration == 2)
    def explode() -> None:
        raise RuntimeError("kaboom")

    with pytest.raises(RuntimeError, match="kaboom"):
        trainer.train(make_loader())
    entries = log_entries(trainer)
    assert [e["event"] for e in entries] == [
        "validate_metrics",
        "train_start",
        "epoch_start",
        "exception",
    ]
    failure = entries[-1]
    assert failure["level"] == "error"
    assert failure["error"] == "RuntimeError: kaboom"
    assert (failure["stage"], failure["epoch"], failure["iteration"]) == ("train", 0, 2)
    assert failure["exception"].startswith("Traceback (most recent call last):")
    assert "in explode" in failure["exception"]
    assert logger._file is None


def test_an_exception_line_names_the_epoch_as_the_console_does(
    quiet_trainer: Callable[..., Trainer],
) -> None:
    stream = io.StringIO()
    trainer = quiet_trainer(callbacks=[LoggerCallback(stream=stream)])

    @trainer.on("batch_end", when=lambda s: s.iteration == 8)
    def explode() -> None:
        raise RuntimeError("kaboom")

    with pytest.raises(RuntimeError, match="kaboom"):
        trainer.train(make_loader())

    @trainer.on("evaluation_step_end")
    def fail_evaluation() -> None:
        raise RuntimeError("evaluation failed")

    with pytest.raises(RuntimeError, match="evaluation failed"):
        trainer.validate(make_loader(16))
    failures = [line for line in stream.getvalue().splitlines() if " exception " in line]
    assert len(failures) == 2
    assert " stage=train epoch=2/2 iteration=8 " in failures[0]
    # Outside training no epoch runs: none is named.
    assert " stage=validate iteration=8 " in failures[1]
    assert [e["epoch"] for e in of_kind(log_entries(trainer), "exception")] == [1, 1]


def test_non_finite_numbers_keep_every_line_strict_json(
    quiet_trainer: Callable[..., Trainer],
) -> None:
    trainer = quiet_trainer(
        model=make_model(lr=1e30),
        callbacks=[LoggerCallback(console=False)],
        max_epochs=1,
        log_every_n_batches=1,
    )
    trainer.train(make_loader(), make_loader(16))  # stops at the first non-finite loss
    trainer.validate(make_loader(16))
    assert not math.isfinite(trainer.state.metrics["loss"])
    entries = log_entries(trainer)  # parse_constant refuses NaN and Infinity
    assert of_kind(entries, "train_loss")[-1]["loss"] in {"NaN", "Infinity", "-Infinity"}
    assert of_kind(entries, "validate_metrics")[0]["metrics"]["loss"] in {"NaN", "Infinity"}
    assert of_kind(entries, "train_end")[0]["stopped_by"] == "trainbus.nonfinite_loss"


# --------------------------------------------------------------- no host-device sync
def test_the_logger_reads_no_tensor_per_batch(
    quiet_trainer: Callable[..., Trainer], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reads: list[str] = []
    item, to_float = torch.Tensor.item, torch.Tensor.__float__

    def counted_item(self: torch.Tensor) -> Any:
        reads.append("item")
        return item(self)

    def counted_float(self: torch.Tensor) -> float:
        reads.append("float")
        return to_float(self)

    monkeypatch.setattr(torch.Tensor, "item", counted_item)
    monkeypatch.setattr(torch.Tensor, "__float__", counted_float)
    counts = []
    for name, callbacks in (("without", []), ("with", [LoggerCallback(stream=FakeTerminal())])):
        reads.clear()
        trainer = quiet_trainer(maps=tmp_path / name, callbacks=callbacks)
        trainer.train(make_loader(96), make_loader(16))
        counts.append(len(reads))
    # 24 batches, one log interval per epoch: the logger adds no read of its own.
    assert counts[0] == counts[1]
    assert counts[1] < 24


# -------------------------------------------------------------------------- escaping
FORGED = "\r\n12:00:00 [info     ] train_end\x1b[2K\x1b]0;title\x07"


@pytest.mark.fault(
    "CR/LF, ANSI and OSC escapes in stop reasons and exception messages",
    outcome="escaped on the console, exact in the JSON lines",
)
def test_console_lines_cannot_be_forged_by_reasons_or_errors(
    quiet_trainer: Callable[..., Trainer],
) -> None:
    stream = io.StringIO()
    trainer = quiet_trainer(callbacks=[LoggerCallback(stream=stream)], max_epochs=3)

    @trainer.on("epoch_end", once=1, id="stopper")
    def stop() -> Stop:
        return Stop(f"plateau{FORGED}")

    trainer.train(make_loader(), make_loader(16))

    fresh = quiet_trainer(
        maps=trainer.maps.path.with_name("second"), callbacks=[LoggerCallback(stream=stream)]
    )

    @fresh.on("batch_end", when=lambda s: s.iteration == 2)
    def explode() -> None:
        raise ValueError(f"bad{FORGED}")

    with pytest.raises(ValueError, match="bad"):
        fresh.train(make_loader())

    output = stream.getvalue()
    assert "\r" not in output and "\x1b" not in output and "\x07" not in output
    assert console_events(output) == [
        "train_start",
        "train_loss",
        "epoch_end",
        "train_end",
        "train_start",
        "exception",
    ]
    escaped = r"\r\n12:00:00 [info     ] train_end\x1b[2K\x1b]0;title\x07"
    lines = output.splitlines()
    assert lines[3].endswith(f"reason='plateau{escaped}'")
    assert lines[5].endswith(f"error='ValueError: bad{escaped}'")
    # The JSON lines keep the exact text.
    assert log_entries(trainer)[-1]["reason"] == f"plateau{FORGED}"
    assert log_entries(fresh)[-1]["error"] == f"ValueError: bad{FORGED}"


@pytest.mark.fault(
    "Control characters in metric names",
    outcome="escaped on the console",
)
@pytest.mark.parametrize(
    "name",
    ["acc\r\nforged=1", "acc\x1b[31m", "acc\u2028x", "acc\x9b2J", "acc\tx"],
)
def test_metric_names_are_escaped_on_the_console(tmp_path: Path, name: str) -> None:
    # A Trainer only accepts identifiers as metric names; the logger does not rely on it.
    stream = io.StringIO()
    maps = Maps(tmp_path / "maps")
    maps.create()
    logger = LoggerCallback(stream=stream)
    logger.on_validate_start(maps=maps)
    logger.on_metrics_computed(state=TrainerState(stage="test"), metrics={name: 0.5})
    logger.on_teardown()
    output = stream.getvalue()
    assert output.count("\n") == 1 and output.endswith("\n")
    assert output[:-1].isprintable()
    assert "test_acc" in output
    record = json.loads((tmp_path / "maps" / "logs" / "train.jsonl").read_text())
    assert record["metrics"] == {name: 0.5}


# --------------------------------------------------------------------------- isolation
def assert_same_config(after: dict[str, Any], before: dict[str, Any]) -> None:
    assert set(after) == set(before)
    for key, value in before.items():
        if isinstance(value, list):
            assert len(after[key]) == len(value)
            assert all(a is b for a, b in zip(after[key], value, strict=True))
        else:
            assert after[key] is value or after[key] == value


def without_run_details(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records without what differs between two identical runs (time, place)."""
    varying = {"timestamp", "seconds", "maps"}
    return [{k: v for k, v in e.items() if k not in varying} for e in entries]


def test_training_leaves_the_global_structlog_and_logging_configuration_alone(
    quiet_trainer: Callable[..., Trainer],
) -> None:
    configured = structlog.is_configured()
    before = structlog.get_config()
    before = {k: list(v) if isinstance(v, list) else v for k, v in before.items()}
    root = logging.getLogger()
    root_handlers, root_level = list(root.handlers), root.level
    trainer, output = console_run(quiet_trainer, stream=FakeTerminal())
    assert_same_config(structlog.get_config(), before)
    assert structlog.is_configured() is configured
    assert root.handlers == root_handlers
    assert root.level == root_level
    assert "train_start" in output
    assert log_entries(trainer)[0]["event"] == "train_start"


def test_a_user_structlog_configuration_neither_changes_the_logs_nor_is_changed(
    quiet_trainer: Callable[..., Trainer], tmp_path: Path, clock: Clock
) -> None:
    plain, plain_output = console_run(quiet_trainer, maps=tmp_path / "plain", clock=clock)
    saved = structlog.get_config()
    structlog.configure(
        processors=[structlog.processors.add_log_level, structlog.processors.KeyValueRenderer()],
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        context_class=type("UserContext", (dict,), {}),
        logger_factory=structlog.ReturnLoggerFactory(),
        cache_logger_on_first_use=True,
    )
    try:
        configured = structlog.get_config()
        configured = {k: list(v) if isinstance(v, list) else v for k, v in configured.items()}
        root = logging.getLogger()
        root_handlers, root_level = list(root.handlers), root.level
        custom, custom_output = console_run(quiet_trainer, maps=tmp_path / "custom", clock=clock)
        assert_same_config(structlog.get_config(), configured)
        assert (root.handlers, root.level) == (root_handlers, root_level)
        user_logger = structlog.get_logger()
        assert user_logger.warning("probe", step=1) == "step=1 event='probe' level='warning'"
        assert user_logger.info("filtered") is None
    finally:
        structlog.configure(**saved)
    assert without_run_details(log_entries(custom)) == without_run_details(log_entries(plain))
    assert all(e["timestamp"].endswith("Z") for e in log_entries(custom))
    assert console_events(custom_output) == console_events(plain_output)
    assert len(custom_output.splitlines()) == len(plain_output.splitlines()) == 5


# ----------------------------------------------------------------------------- resume
class RunInterruptedError(Exception):
    """Raised from a checkpoint handler to cut a run short once a training state is saved."""


def interrupted_run(maps: Path, at_iteration: int) -> list[dict[str, Any]]:
    trainer = Trainer(
        maps,
        make_model(),
        callbacks=[
            LoggerCallback(stream=io.StringIO()),
            TrainingCheckpointCallback(every_n_steps=4),
        ],
        default_callbacks=False,
        max_epochs=2,
        log_every_n_batches=1,
    )

    @trainer.on("checkpoint")
    def interrupt(*, state: TrainerState, kind: str) -> None:
        if kind == "training" and state.iteration == at_iteration:
            raise RunInterruptedError(f"stopped at iteration {at_iteration}")

    with pytest.raises(RunInterruptedError):
        trainer.train(make_loader(), make_loader(16))
    return log_entries(trainer)


def resumed_run(maps: Path, stream: io.StringIO) -> Trainer:
    trainer = Trainer.from_maps(
        maps,
        make_model(),
        callbacks=[LoggerCallback(stream=stream), TrainingCheckpointCallback(every_n_steps=4)],
        default_callbacks=False,
    )
    trainer.train(make_loader(), make_loader(16))
    return trainer


@pytest.mark.parametrize(
    ("at_iteration", "state_name", "in_epoch", "batch"),
    [
        (8, "state-0000000008", True, "2/6"),
        (4, "state-0000000004", True, "4/6"),
        (6, "state-0000000006-epoch-end", False, None),
    ],
)
def test_a_resume_is_recorded_with_the_state_it_resumed_from(
    tmp_path: Path, at_iteration: int, state_name: str, in_epoch: bool, batch: str | None
) -> None:
    maps = tmp_path / "maps"
    before = interrupted_run(maps, at_iteration)
    assert before[-1]["event"] == "exception"
    # The interruption came from a handler that runs before the logger at `checkpoint`.
    saved = maps / "training" / state_name
    assert saved.is_dir()
    assert state_name not in {e["tag"] for e in of_kind(before, "checkpoint")}

    stream = FakeTerminal()
    trainer = resumed_run(maps, stream)
    entries = log_entries(trainer)
    after = entries[len(before) :]
    resume = after[1]
    assert [after[0]["event"], resume["event"]] == ["train_start", "resume"]
    assert resume["checkpoint"] == str(saved)
    assert resume["state"] == state_name
    assert (resume["epoch"], resume["in_epoch"], resume["batch"]) == (
        at_iteration // 6,
        in_epoch,
        batch,
    )
    assert (resume["iteration"], resume["global_step"]) == (at_iteration, at_iteration)
    # An epoch resumed in its middle has no epoch_start; the next one does.
    resumed_epoch = at_iteration // 6
    starts = [e["epoch"] for e in of_kind(after, "epoch_start")]
    assert starts == list(range(resumed_epoch + in_epoch, 2))
    assert [e["epoch"] for e in of_kind(after, "epoch_end")] == list(range(resumed_epoch, 2))
    first_loss = of_kind(after, "train_loss")[0]
    assert first_loss["batch"] == f"{at_iteration % 6 + 1}/6"
    assert after[-1]["event"] == "train_end"

    output = stream.getvalue()
    resume_line = next(line for line in output.splitlines() if " resume " in line)
    # Counted from 1 like the bar below, which opens on the same epoch.
    assert f"state={state_name} epoch={resumed_epoch + 1}/2" in resume_line
    assert (f"batch={batch}" in resume_line) is in_epoch
    # The bar of the resumed epoch opens at the position the run resumes from.
    opened = re.findall(rf"epoch {resumed_epoch + 1}/2: +\d+%\|[^|]*\| *(\d)/6", output)
    assert opened[0] == str(at_iteration % 6)


def test_a_resumed_epoch_sums_up_like_an_uninterrupted_one(tmp_path: Path) -> None:
    whole = Trainer(
        tmp_path / "whole",
        make_model(),
        callbacks=[LoggerCallback(console=False), TrainingCheckpointCallback(every_n_steps=4)],
        default_callbacks=False,
        max_epochs=2,
        log_every_n_batches=1,
    )
    whole.train(make_loader(), make_loader(16))
    expected = of_kind(log_entries(whole), "epoch_end")

    maps = tmp_path / "maps"
    interrupted_run(maps, 8)
    trainer = resumed_run(maps, io.StringIO())
    summaries = of_kind(log_entries(trainer), "epoch_end")
    assert [s["epoch"] for s in summaries] == [0, 1]
    for got, want in zip(summaries, expected, strict=True):
        assert got["train_loss"] == pytest.approx(want["train_loss"], rel=1e-6)
        assert got["metrics"] == pytest.approx(want["metrics"], rel=1e-6)


def test_the_logger_state_survives_a_weights_only_round_trip(tmp_path: Path) -> None:
    logger = LoggerCallback(console=False)
    maps = Maps(tmp_path / "maps")
    maps.create()
    logger.on_validate_start(maps=maps)
    state = TrainerState(stage="train", batch_idx=2, num_batches=6)
    logger.on_epoch_start(state=TrainerState(stage="train", num_batches=6))
    logger.on_loss_logged(state=state, train_loss=0.5)
    logger.on_teardown()
    torch.save(logger.state_dict(), tmp_path / "state.pt")
    restored = LoggerCallback(console=False)
    restored.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    assert (
        restored.state_dict()
        == logger.state_dict()
        == {
            "loss_sum": 1.5,
            "loss_batches": 3,
            "logged_position": 3,
        }
    )
    restored.load_state_dict({})
    assert restored.state_dict() == {"loss_sum": 0.0, "loss_batches": 0, "logged_position": 0}


def test_reset_forgets_the_epoch_summary_and_closes_the_log_and_the_bar(tmp_path: Path) -> None:
    stream = FakeTerminal()
    logger = LoggerCallback(stream=stream, progress_bar=True, console_interval=2.0)
    maps = Maps(tmp_path / "maps")
    maps.create()
    logger.on_train_start(state=TrainerState(stage="train", max_epochs=2), maps=maps)
    logger.on_epoch_start(state=TrainerState(stage="train", num_batches=6))
    logger.on_loss_logged(
        state=TrainerState(stage="train", batch_idx=2, num_batches=6), train_loss=0.5
    )
    logger.on_metrics_computed(
        state=TrainerState(stage="validation", best_epochs=FrozenDict(loss=0)),
        metrics={"loss": 0.4},
    )
    log, bar = logger._file, logger._bar
    assert log is not None and bar is not None
    fresh = LoggerCallback(stream=stream, progress_bar=True, console_interval=2.0)
    assert logger.state_dict() != fresh.state_dict()

    logger.reset()

    assert log.closed
    assert bar.disable  # tqdm marks a closed bar disabled
    assert logger.state_dict() == fresh.state_dict()
    assert logger.config() == fresh.config()
    assert vars(logger) == vars(fresh)


def test_reset_keeps_the_bar_decision_made_when_subscribed(
    quiet_trainer: Callable[..., Trainer],
) -> None:
    stream = FakeTerminal()
    logger = LoggerCallback(stream=stream)
    quiet_trainer(callbacks=[logger])
    stream.isatty = lambda: False  # type: ignore[method-assign]

    logger.reset()

    # batch_end (the bar's update) is subscribed: a bar must still be drawn.
    assert logger._uses_bar()


# ------------------------------------------------------------------------------ options
def test_the_logger_runs_on_rank_zero_only(quiet_trainer: Callable[..., Trainer]) -> None:
    trainer = quiet_trainer(callbacks=[LoggerCallback(console=False)])
    rows = [row for row in trainer.plan() if row["id"].startswith("LoggerCallback.")]
    assert {row["event"] for row in rows} >= {"train_start", "resume", "loss_logged", "epoch_end"}
    assert all(row["rank_zero_only"] for row in rows)


@pytest.mark.parametrize(
    ("arguments", "config"),
    [
        ({}, {"console": True, "progress_bar": None, "console_interval": 10.0}),
        ({"console": False}, {"console": False, "progress_bar": None, "console_interval": 10.0}),
        ({"progress_bar": True}, {"console": True, "progress_bar": True, "console_interval": 10.0}),
        ({"console_interval": 3}, {"console": True, "progress_bar": None, "console_interval": 3.0}),
        ({"stream": sys.stdout}, {"console": True, "progress_bar": None, "console_interval": 10.0}),
    ],
)
def test_good_logger_arguments_are_kept_in_the_configuration(
    arguments: dict[str, Any], config: dict[str, Any]
) -> None:
    logger = LoggerCallback(**arguments)
    assert logger.config() == config
    assert json.loads(json.dumps(logger.config())) == config


@pytest.mark.parametrize(
    ("arguments", "error", "message"),
    [
        ({"console": 1}, ConfigurationTypeError, r"LoggerCallback: console=1 is not a bool"),
        ({"console": "yes"}, ConfigurationTypeError, r"console='yes' is not a bool; pass True"),
        (
            {"progress_bar": "yes"},
            ConfigurationTypeError,
            r"progress_bar='yes' is not True, False or None",
        ),
        ({"progress_bar": 0}, ConfigurationTypeError, r"progress_bar=0 is not True, False or None"),
        (
            {"console_interval": 0},
            ConfigurationError,
            r"console_interval=0 is not a positive finite number of seconds; pass e\.g\.",
        ),
        ({"console_interval": -1.5}, ConfigurationError, r"console_interval=-1\.5 is not a posit"),
        ({"console_interval": math.nan}, ConfigurationError, r"console_interval=nan is not a pos"),
        ({"console_interval": math.inf}, ConfigurationError, r"console_interval=inf is not a pos"),
        ({"console_interval": 10**400}, ConfigurationError, r"console_interval=1000+ is not a p"),
        ({"console_interval": True}, ConfigurationTypeError, r"console_interval=True is not a num"),
        ({"console_interval": "10"}, ConfigurationTypeError, r"console_interval='10' is not a num"),
        ({"console_interval": None}, ConfigurationTypeError, r"console_interval=None is not a num"),
        ({"stream": "log.txt"}, ConfigurationTypeError, r"stream='log.txt' has no write method"),
        ({"stream": 2}, ConfigurationTypeError, r"stream=2 has no write method; pass a text str"),
    ],
)
def test_bad_logger_arguments_are_refused(
    arguments: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        LoggerCallback(**arguments)
