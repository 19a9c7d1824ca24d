from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from trainbus import LoggerCallback, Trainer
from trainbus.errors import ConfigurationTypeError

from ..conftest import make_loader


def console_run(
    quiet_trainer: Callable[..., Trainer],
    *,
    samples: int = 48,
    log_every_n_batches: int = 50,
    **logger_options: Any,
) -> tuple[Trainer, str]:
    stream = io.StringIO()
    trainer_options: dict[str, Any] = {"log_every_n_batches": log_every_n_batches}
    if "maps" in logger_options:
        trainer_options["maps"] = logger_options.pop("maps")
    trainer = quiet_trainer(
        callbacks=[LoggerCallback(stream=stream, **logger_options)], **trainer_options
    )
    trainer.train(make_loader(samples), make_loader(16))
    return trainer, stream.getvalue()


def log_entries(trainer: Trainer) -> list[dict[str, Any]]:
    lines = trainer.maps.file("logs", "train.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


@pytest.fixture
def custom_structlog() -> Iterator[dict[str, Any]]:
    saved = structlog.get_config()
    structlog.configure(
        processors=[structlog.processors.add_log_level, structlog.processors.KeyValueRenderer()],
        logger_factory=structlog.ReturnLoggerFactory(),
        cache_logger_on_first_use=False,
    )
    configured = structlog.get_config()
    snapshot = {
        key: list(value) if isinstance(value, list) else value for key, value in configured.items()
    }
    try:
        yield snapshot
    finally:
        structlog.configure(**saved)


def test_progress_on_a_non_terminal_stream_is_plain_lines(
    quiet_trainer: Callable[..., Trainer],
) -> None:
    _, output = console_run(quiet_trainer)
    assert "\r" not in output
    lines = output.splitlines()
    assert re.findall(r"^\S+ \[info +\] (\w+)", output, flags=re.MULTILINE) == [
        "train_start",
        "train_loss",
        "validation_metrics",
        "train_loss",
        "validation_metrics",
        "train_end",
    ]
    assert "batch=6/6" in lines[1]


def test_the_number_of_console_lines_does_not_grow_with_the_batches(
    quiet_trainer: Callable[..., Trainer], tmp_path: Path
) -> None:
    _, short = console_run(quiet_trainer, samples=48, maps=tmp_path / "short")
    _, long = console_run(quiet_trainer, samples=192, maps=tmp_path / "long")
    assert len(long.splitlines()) == len(short.splitlines()) == 6


def test_loss_lines_appear_at_each_log_interval(quiet_trainer: Callable[..., Trainer]) -> None:
    _, output = console_run(quiet_trainer, log_every_n_batches=2)
    batches = re.findall(r"train_loss +batch=(\d+/\d+) epoch=(\d)", output)
    assert batches == [
        ("2/6", "0"),
        ("4/6", "0"),
        ("6/6", "0"),
        ("2/6", "1"),
        ("4/6", "1"),
        ("6/6", "1"),
    ]
    assert len(output.splitlines()) == 10


def test_progress_bar_true_draws_a_bar_and_keeps_loss_lines_off_the_console(
    quiet_trainer: Callable[..., Trainer],
) -> None:
    trainer, output = console_run(quiet_trainer, progress_bar=True, log_every_n_batches=2)
    assert "\r" in output
    assert "epoch 1/2" in output
    assert re.search(r"epoch 2/2: +\d+%\|[^|]*\| *\d/6", output)
    assert "train_loss" not in output
    assert [e["event"] for e in log_entries(trainer)].count("train_loss") == 6


def test_progress_bar_knows_the_number_of_batches_in_the_first_epoch(
    quiet_trainer: Callable[..., Trainer],
) -> None:
    _, output = console_run(quiet_trainer, progress_bar=True)
    assert re.search(r"epoch 1/2: +\d+%\|[^|]*\| *\d/6", output)


def test_the_json_lines_file_records_the_run(quiet_trainer: Callable[..., Trainer]) -> None:
    trainer, _ = console_run(quiet_trainer, log_every_n_batches=3)
    entries = log_entries(trainer)
    assert [e["event"] for e in entries] == [
        "train_start",
        "train_loss",
        "train_loss",
        "validation_metrics",
        "train_loss",
        "train_loss",
        "validation_metrics",
        "train_end",
    ]
    assert all(e["level"] == "info" and e["timestamp"].endswith("Z") for e in entries)
    assert entries[0]["max_epochs"] == 2
    assert entries[0]["maps"] == str(trainer.maps.path)
    assert entries[1]["batch"] == "3/6"
    assert entries[1]["lr"] == [0.05]
    validation = entries[-2]
    assert validation["epoch"] == 1
    assert validation["loss"] == pytest.approx(trainer.state.metrics["loss"], rel=1e-5)
    assert entries[-1]["global_step"] == 12
    assert entries[-1]["epochs"] == 2
    assert entries[-1]["stopped_by"] is None


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
    assert [e["event"] for e in entries] == ["validate_metrics", "train_start", "exception"]
    failure = entries[-1]
    assert failure["level"] == "error"
    assert failure["error"] == "RuntimeError: kaboom"
    assert failure["iteration"] == 2
    assert logger._file is None


def test_console_false_writes_nothing_to_the_stream(
    quiet_trainer: Callable[..., Trainer],
) -> None:
    trainer, output = console_run(quiet_trainer, console=False, progress_bar=True)
    assert output == ""
    assert len(log_entries(trainer)) == 6


def test_training_leaves_the_global_structlog_configuration_alone(
    quiet_trainer: Callable[..., Trainer], custom_structlog: dict[str, Any]
) -> None:
    root_handlers = list(logging.getLogger().handlers)
    root_level = logging.getLogger().level
    trainer, output = console_run(quiet_trainer)
    after = structlog.get_config()
    assert set(after) == set(custom_structlog)
    for key, value in custom_structlog.items():
        if isinstance(value, list):
            assert len(after[key]) == len(value)
            assert all(a is b for a, b in zip(after[key], value, strict=True))
        else:
            assert after[key] is value or after[key] == value
    assert structlog.get_logger().info("probe") == "event='probe' level='info'"
    assert logging.getLogger().handlers == root_handlers
    assert logging.getLogger().level == root_level
    assert "train_start" in output
    assert log_entries(trainer)[0]["event"] == "train_start"


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"console": 1}, r"LoggerCallback: console=1 is not a bool"),
        ({"progress_bar": "yes"}, r"progress_bar='yes' is not True, False or None"),
    ],
)
def test_bad_logger_arguments_are_refused(arguments: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationTypeError, match=message):
        LoggerCallback(**arguments)
