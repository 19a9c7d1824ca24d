"""User-controlled text in log lines: MAPS paths, callback ids, stop reasons built from metrics.

The console view must show one line per record whatever a path or a name holds (no CR, LF,
terminal escape or other line break gets through), while ``logs/train.jsonl`` keeps the exact
text and stays one strict JSON object per line.
"""

from __future__ import annotations

import io
import json
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

import trainbus.handlers.logger as logger_module
from tests.conftest import make_loader, make_model
from trainbus import (
    Callback,
    LoggerCallback,
    MonitorCallback,
    Stop,
    Trainer,
    TrainerState,
    TrainingCheckpointCallback,
)

LINE = re.compile(r"^\d\d:\d\d:\d\d \[(\w+) *\] (\w+) ")
JSON_ONLY = {"epoch_start", "validation_metrics", "checkpoint"}
"""Records the logger writes to ``train.jsonl`` only (see LoggerCallback's handlers)."""

FORGERIES = [
    pytest.param("\r\n12:00:00 [info     ] train_end\x1b[2K\x1b]0;title\x07", id="crlf-ansi-osc"),
    pytest.param("\x9b2J\x9b31m", id="c1-csi"),
    pytest.param("\x85\u2028\u2029\x0b\x0c\x1c", id="unicode-line-breaks"),
    pytest.param("\t\x08\x7f", id="tab-backspace-delete"),
]
"""Text that, written raw, would start a forged line, erase one or drive the terminal."""


class StopsWithForgedText(Callback):
    """A user callback whose id, and whose stop reason (built from a metric key), hold ``text``.

    It stops (resumably) at the end of epoch 1, naming the monitored metric with ``text``
    appended, as a callback formatting an untrusted name would.
    """

    def __init__(self, text: str) -> None:
        self.callback_id = f"user{text}"
        self.text = text
        self.key = f"loss{text}"
        self.value: float | None = None

    def on_validation_end(self, *, metrics: Mapping[str, float]) -> None:
        self.value = metrics["loss"]

    def on_epoch_end(self, *, state: TrainerState) -> Stop | None:
        if state.current_epoch != 1:
            return None
        return Stop(f"{self.key}={self.value:.3f} did not improve", resumable=True)


@pytest.fixture
def every_loss_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """Time jumps at every look at the clock, so no console loss line is throttled away."""
    ticks = iter(range(0, 10**9, 1000))
    monkeypatch.setattr(logger_module, "_monotonic", lambda: float(next(ticks)))


def json_records(maps: Path) -> list[dict[str, Any]]:
    """Every line of ``logs/train.jsonl`` as strict JSON (only ``\\n`` ends a line)."""
    text = (maps / "logs" / "train.jsonl").read_text(encoding="utf-8")
    assert text.endswith("\n")
    return [json.loads(line, parse_constant=refuse_constant) for line in text.split("\n")[:-1]]


def refuse_constant(name: str) -> Any:
    raise AssertionError(f"{name} is not strict JSON")


def console_lines(output: str) -> list[str]:
    """The console lines, checked to be split by ``\\n`` alone and to hold printable text only."""
    assert output.endswith("\n")
    lines = output.split("\n")[:-1]
    assert output.splitlines() == lines  # no CR, VT, FF, FS, NEL, LS or PS inside a line
    for line in lines:
        assert line.isprintable(), line
        event_of(line)
    return lines


def event_of(line: str) -> str:
    """The record name of a console line (``HH:MM:SS [level] name key=value ...``)."""
    match = LINE.match(line)
    assert match is not None, f"not a console record line: {line!r}"
    return match.group(2)


def shown(key: str, value: str, line: str) -> bool:
    """Whether ``line`` shows ``key=value`` with each non-printable character as its escape.

    The console quotes a value (``repr``) only when it holds a space or a quote.
    """
    escaped = "".join(c if c.isprintable() else repr(c)[1:-1] for c in value)
    return f"{key}={value!r}" in line or f"{key}={escaped}" in line


@pytest.mark.fault(
    "CR/LF and ANSI escapes in MAPS paths and run names",
    outcome=(
        "a MAPS directory, a callback id and a stop reason naming a metric key: one "
        "escaped console line per shown record, across a resume; the JSON lines keep the "
        "exact text, one strict JSON object per line"
    ),
)
@pytest.mark.parametrize("text", FORGERIES)
def test_forged_paths_ids_and_reasons_cannot_forge_console_lines(
    tmp_path: Path, text: str, every_loss_line: None
) -> None:
    maps = tmp_path / f"run{text}"
    maps.mkdir()  # a real directory: Linux allows any character but '/' and NUL
    stream = io.StringIO()
    forger = StopsWithForgedText(text)
    trainer = Trainer(
        maps,
        make_model(),
        callbacks=[LoggerCallback(stream=stream), TrainingCheckpointCallback(), forger],
        default_callbacks=False,
        max_epochs=3,
        log_every_n_batches=2,
    )
    stopped = trainer.train(make_loader(), make_loader(16))
    assert stopped.stopped_by == f"user{text}.on_epoch_end"

    resumed = Trainer.from_maps(
        maps,
        make_model(),
        callbacks=[
            LoggerCallback(stream=stream),
            TrainingCheckpointCallback(),
            StopsWithForgedText(text),
        ],
    )
    final = resumed.train(make_loader(), make_loader(16))
    assert final.current_epoch == 2 and final.stopped_by is None

    output = stream.getvalue()
    for character in "\r\x1b\x07\x9b\x85\u2028":
        assert character not in output
    lines = console_lines(output)
    records = json_records(maps)
    events = [record["event"] for record in records]
    # One console line per record the console shows; the order is the same.
    assert [event_of(line) for line in lines] == [e for e in events if e not in JSON_ONLY]
    assert events.count("train_start") == 2 and events.count("resume") == 1
    assert events.count("train_loss") == 9  # 3 epochs x 3 intervals of 2 batches

    # The console shows the path and the reason, escaped, on their own record's line.
    starts = [line for line in lines if event_of(line) == "train_start"]
    assert len(starts) == 2
    assert all(shown("maps", str(maps), line) for line in starts)
    ends = [line for line in lines if event_of(line) == "train_end"]
    assert len(ends) == 2
    assert shown("stopped_by", f"user{text}.on_epoch_end", ends[0])
    assert "did not improve" in ends[0]

    # The JSON lines keep every character.
    by_event = {record["event"]: record for record in records}
    assert [r["maps"] for r in records if r["event"] == "train_start"] == [str(maps)] * 2
    first_end = next(r for r in records if r["event"] == "train_end")
    assert first_end["stopped_by"] == f"user{text}.on_epoch_end"
    assert first_end["reason"] == f"loss{text}={forger.value:.3f} did not improve"
    assert by_event["resume"]["checkpoint"] == str(maps / "training" / by_event["resume"]["state"])
    assert all(r["path"].startswith(f"{maps}/") for r in records if r["event"] == "checkpoint")


class SlowForgedHandler(Callback):
    """A per-batch handler slow enough to be among the monitor's top subscribers."""

    def __init__(self, text: str) -> None:
        self.callback_id = f"user{text}"

    def on_batch_end(self) -> None:
        time.sleep(0.002)


@pytest.mark.fault(
    "CR/LF and ANSI escapes in MAPS paths and run names",
    outcome="a callback id in the monitor's subscriber table: escaped, one line per row",
)
@pytest.mark.parametrize(
    # Short: the table cuts ids longer than 60 characters from the left.
    "text",
    [pytest.param("\r\nFORGED\x1b[2K", id="crlf-ansi"), pytest.param("\x9b2J\x85FORGED", id="c1")],
)
def test_callback_ids_cannot_forge_lines_of_the_monitor_table(tmp_path: Path, text: str) -> None:
    stream = io.StringIO()
    trainer = Trainer(
        tmp_path / "maps",
        make_model(),
        callbacks=[MonitorCallback(stream=stream, time_subscribers=1), SlowForgedHandler(text)],
        default_callbacks=False,
        max_epochs=2,
    )
    trainer.train(make_loader())
    output = stream.getvalue()
    assert "FORGED" in output  # the forged id's row is shown
    assert output.endswith("\n")
    lines = output.split("\n")[:-1]
    assert output.splitlines() == lines
    assert all(line.isprintable() for line in lines)
