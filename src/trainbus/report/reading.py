"""Tolerant, read-only readers of a MAPS, for looking at a run while it trains or after.

Nothing here takes the MAPS lock or writes into the directory. A TSV line still being written
(no newline yet) is left out, a ``maps.json`` replaced while it is read is read again, and an
optional file that is missing or damaged reads as absent. Only a directory that is not a MAPS
at all is an error.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as _dt
import json
import math
import os
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainbus.errors import MapsError

__all__ = [
    "Resume",
    "Run",
    "Table",
    "best_of",
    "call_status",
    "find_maps",
    "read_run",
]

MAPS_FILE = "maps.json"
MAPS_FORMAT = "trainbus-maps/"
# Rows of metrics.tsv that are not metric values.
METRIC_KEYS = frozenset({"stage", "epoch", "global_step", "iteration"})
# A maps.json replaced between our open and read yields a short read: tried again, briefly.
_JSON_ATTEMPTS = 5
_JSON_PAUSE = 0.05


@dataclass(frozen=True, slots=True)
class Table:
    """The rows of a TSV file: columns in file order, one dict per complete row."""

    columns: tuple[str, ...] = ()
    rows: tuple[dict[str, str], ...] = ()

    def numbers(self, column: str, rows: tuple[dict[str, str], ...] | None = None) -> list[float]:
        """The column as floats (NaN where a cell is empty or not a number)."""
        return [number(row.get(column)) for row in (self.rows if rows is None else rows)]


@dataclass(frozen=True, slots=True)
class Resume:
    """Where a train call resumed: its optimizer step and its epoch position (0-based)."""

    step: float
    epoch: float
    state: str


@dataclass(slots=True)
class Run:
    """Everything a report shows about one MAPS, read once."""

    path: Path
    name: str
    document: dict[str, Any]
    metrics: Table = field(default_factory=Table)
    losses: Table = field(default_factory=Table)
    monitor: dict[str, Any] | None = None
    environment: dict[str, Any] | None = None
    resumes: list[Resume] = field(default_factory=list)
    owner_alive: bool | None = None

    @property
    def calls(self) -> list[dict[str, Any]]:
        calls = self.document.get("calls")
        return [c for c in calls if isinstance(c, dict)] if isinstance(calls, list) else []

    @property
    def train_calls(self) -> list[dict[str, Any]]:
        return [c for c in self.calls if c.get("call") == "train"]

    @property
    def settings(self) -> dict[str, Any]:
        settings = self.document.get("trainer")
        return settings if isinstance(settings, dict) else {}

    @property
    def status(self) -> str:
        """The last call's status, ``interrupted`` for a running call whose process is gone."""
        calls = self.calls
        if not calls:
            return "created"
        status = call_status(calls[-1])
        if status == "running" and self.owner_alive is False:
            return "interrupted"
        return status

    @property
    def running(self) -> bool:
        return self.status == "running"

    def directions(self) -> dict[str, bool | None]:
        """Per metric declared in ``maps.json``: True when higher is better, None if unknown."""
        declared = self.document.get("metrics")
        if not isinstance(declared, dict):
            return {}
        return {
            str(name): spec.get("higher_is_better") if isinstance(spec, dict) else None
            for name, spec in declared.items()
        }

    def validation_rows(self) -> tuple[dict[str, str], ...]:
        return tuple(
            row
            for row in self.metrics.rows
            if row.get("stage") == "validation" and math.isfinite(number(row.get("epoch")))
        )

    def metric_names(self) -> list[str]:
        """Metric columns of ``metrics.tsv`` holding at least one number (extra ones too)."""
        rows = self.validation_rows()
        return [
            column
            for column in self.metrics.columns
            if column not in METRIC_KEYS
            and any(math.isfinite(v) for v in self.metrics.numbers(column, rows))
        ]

    def best(self, metric: str) -> tuple[float, int] | None:
        """The best validation value of ``metric`` and its epoch (0-based), or None."""
        rows = self.validation_rows()
        return best_of(
            self.metrics.numbers(metric, rows),
            [int(number(r.get("epoch"))) for r in rows],
            self.directions().get(metric),
        )

    def seconds(self) -> float | None:
        """Wall time of every call together (a running call counts until now)."""
        total = 0.0
        found = False
        for call in self.calls:
            summary = call.get("summary")
            measured = number(summary.get("seconds")) if isinstance(summary, dict) else math.nan
            if math.isfinite(measured):
                total += measured  # to the millisecond; the call's times are to the second
                found = True
                continue
            started = parse_time(call.get("started"))
            finished = parse_time(call.get("finished"))
            if started is None:
                continue
            if finished is None:
                if call_status(call) != "running" or self.owner_alive is False:
                    continue
                finished = _dt.datetime.now(_dt.UTC)
            total += max(0.0, (finished - started).total_seconds())
            found = True
        return total if found else None


def best_of(
    values: list[float], epochs: list[int], higher_is_better: bool | None
) -> tuple[float, int] | None:
    """The best finite value and its epoch; the first one wins a tie. None if none or unknown."""
    if higher_is_better is None:
        return None
    best: tuple[float, int] | None = None
    for value, epoch in zip(values, epochs, strict=True):
        if not math.isfinite(value):
            continue
        if best is None or (value > best[0] if higher_is_better else value < best[0]):
            best = (value, epoch)
    return best


def call_status(call: Mapping[str, Any]) -> str:
    """A call's status as recorded: completed, stopped, failed, running or interrupted."""
    status = call.get("status")
    return status if isinstance(status, str) and status else "unknown"


def number(text: object) -> float:
    """A cell as a float; NaN when empty or not a number."""
    if isinstance(text, int | float) and not isinstance(text, bool):
        return float(text)
    if not isinstance(text, str) or not text.strip():
        return math.nan
    try:
        return float(text)
    except ValueError:
        return math.nan


def parse_time(text: object) -> _dt.datetime | None:
    """An ISO time from ``maps.json`` (UTC when it names no zone); None if absent or bad."""
    if not isinstance(text, str):
        return None
    try:
        moment = _dt.datetime.fromisoformat(text)
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=_dt.UTC)


def read_run(path: Path, name: str | None = None) -> Run:
    """Read the MAPS at ``path``; raises :class:`MapsError` when it is not a trainbus MAPS."""
    document = read_document(path)
    run = Run(path=path, name=name or path.name or str(path), document=document)
    run.metrics = read_table(path / "metrics.tsv")
    run.losses = read_table(path / "training_loss.tsv")
    monitor = read_optional_json(path / "monitor.json")
    run.monitor = monitor if isinstance(monitor, dict) else None
    environment = read_optional_json(path / "environment.json")
    run.environment = environment if isinstance(environment, dict) else None
    run.resumes = _resumes(run)
    if run.calls and call_status(run.calls[-1]) == "running":
        run.owner_alive = owner_alive(path / ".lock")
    return run


def read_document(path: Path) -> dict[str, Any]:
    """The ``maps.json`` of a MAPS, checked to be one written by trainbus."""
    if not path.exists():
        raise MapsError(f"{str(path)!r} does not exist; pass the directory of a trainbus run")
    if not path.is_dir():
        raise MapsError(f"{str(path)!r} is not a directory; pass the directory of a trainbus run")
    target = path / MAPS_FILE
    if not target.is_file():
        raise MapsError(
            f"{str(path)!r} is not a trainbus MAPS: it holds no {MAPS_FILE}; pass the directory "
            "a Trainer wrote (the `maps` argument), or use `trainbus runs DIR` to find them"
        )
    document: Any = None
    for attempt in range(_JSON_ATTEMPTS):
        try:
            document = json.loads(target.read_text(encoding="utf-8"))
            break
        except (OSError, ValueError) as exc:
            if attempt == _JSON_ATTEMPTS - 1:
                raise MapsError(
                    f"cannot read {str(target)!r}: {exc}; expected the JSON trainbus writes. "
                    "If a run is writing it, try again; otherwise the file is damaged"
                ) from None
            time.sleep(_JSON_PAUSE)
    if not (
        isinstance(document, dict)
        and isinstance(document.get("format"), str)
        and document["format"].startswith(MAPS_FORMAT)
    ):
        found = document.get("format") if isinstance(document, dict) else type(document).__name__
        raise MapsError(
            f"{str(target)!r} is not a trainbus maps.json (format {found!r}, expected "
            f"'{MAPS_FORMAT}N'); pass the directory a trainbus Trainer wrote"
        )
    return document


def read_optional_json(path: Path) -> Any:
    """A JSON file, or None when it is missing or unreadable (e.g. being replaced)."""
    for attempt in range(_JSON_ATTEMPTS):
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            if attempt < _JSON_ATTEMPTS - 1:
                time.sleep(_JSON_PAUSE)
    return None


def read_table(path: Path) -> Table:
    """A TSV file of the MAPS; a last line without its newline (still being written) is left
    out, and so is a row with another number of cells than the header."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return Table()
    if not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
    lines = list(csv.reader(text.splitlines(), delimiter="\t"))
    if not lines:
        return Table()
    header = tuple(lines[0])
    rows = tuple(
        dict(zip(header, line, strict=True)) for line in lines[1:] if len(line) == len(header)
    )
    return Table(header, rows)


def owner_alive(lock: Path) -> bool | None:
    """Whether the process named in a MAPS lock record still runs (None when unknowable).

    The record is only read, never locked: looking at a run must not get in its way.
    """
    try:
        raw = lock.read_bytes()[:4096]
        record = json.loads(raw.replace(b"\0", b" ").decode("utf-8", errors="replace"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict):
        return None
    if record.get("released"):
        return False
    pid = record.get("pid")
    if not isinstance(pid, int) or record.get("host") != socket.gethostname():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # it exists, owned by another user
    return True


def _resumes(run: Run) -> list[Resume]:
    """The resumes of the train calls, at the optimizer step the logs name (exact) or else at
    the iteration divided by the accumulation (exact without accumulation)."""
    logged = _logged_resume_steps(run.path / "logs" / "train.jsonl")
    accumulate = run.settings.get("accumulate_grad_batches")
    accumulate = accumulate if isinstance(accumulate, int) and accumulate > 0 else 1
    resumes = []
    for call in run.train_calls:
        origin = call.get("resumed_from")
        if not isinstance(origin, dict):
            continue
        iteration = number(origin.get("iteration"))
        state = str(origin.get("state", ""))
        epoch = number(origin.get("epoch"))
        step = logged.pop(0) if logged else iteration // accumulate
        # A state saved at an epoch end resumes with the next epoch: the mark goes between.
        position = epoch + 0.5 if state.endswith("epoch-end") else epoch
        resumes.append(Resume(step=step, epoch=position, state=state))
    return resumes


def _logged_resume_steps(path: Path) -> list[float]:
    steps: list[float] = []
    with contextlib.suppress(OSError), path.open(encoding="utf-8", errors="replace") as stream:
        for line in stream:
            if '"resume"' not in line:
                continue
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and record.get("event") == "resume":
                steps.append(number(record.get("global_step")))
    return [s for s in steps if math.isfinite(s)]


def find_maps(directory: Path) -> list[Path]:
    """Every MAPS under ``directory`` (itself included), sorted; symbolic links are not
    followed and a MAPS's own folders are not searched."""
    if not directory.is_dir():
        raise MapsError(
            f"{str(directory)!r} is not a directory; pass the folder that holds your runs"
        )
    found = []
    for root, folders, files in os.walk(directory, followlinks=False):
        if MAPS_FILE in files:
            found.append(Path(root))
            folders[:] = []
        else:
            folders.sort()
    return sorted(found)
