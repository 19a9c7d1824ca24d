"""LoggerCallback: structured logs (JSON lines in the MAPS), readable console, progress display.

structlog is used through loggers this callback builds for the run (``structlog.wrap_logger``
with every setting given explicitly): the user's global structlog and ``logging``
configuration are neither read nor changed. On a terminal the progress is a tqdm bar; when
output is not a terminal (CI, a file, a pipe) it is plain lines, never a carriage return, and
a bounded number of them: at most one training-loss line per ``console_interval`` seconds, one
summary line per epoch, and the start and end lines. Runs on rank 0 only. The training loss is
read from the device only at log intervals (the ``loss_logged`` event), never per batch.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable, Iterator, Mapping, MutableMapping, Sequence
from pathlib import Path
from typing import IO, Any

import structlog
from tqdm import tqdm

from trainbus.engine.checkpoint import training_state_name
from trainbus.engine.compute import finite_number
from trainbus.engine.maps import LOGS_DIR, Maps
from trainbus.engine.state import TrainerState
from trainbus.errors import ConfigurationError, ConfigurationTypeError
from trainbus.events.callback import Callback
from trainbus.events.catalog import EventSpec
from trainbus.events.marker import Options
from trainbus.handlers import priorities
from trainbus.handlers.text import escape_control

LOG_FILE = "train.jsonl"

_monotonic: Callable[[], float] = time.monotonic
"""The clock of the console throttle and the epoch times (a module attribute, so it can be
replaced by a controlled clock)."""


class LoggerCallback(Callback):
    """Log the run: JSON lines in ``logs/train.jsonl``, a console view, and progress.

    - ``console``: print progress and summaries (default True).
    - ``progress_bar``: ``None`` picks a bar on a terminal and plain lines elsewhere.
    - ``stream``: where console output goes (any object with a ``write`` method; default
      ``sys.stderr``, looked up at each write).
    - ``console_interval``: without a bar, the least number of seconds between two console
      lines of the training loss (default 10.0); the JSON lines are never throttled.

    Every record goes to ``logs/train.jsonl``, one JSON object per line (non-finite numbers
    as the strings ``"NaN"``, ``"Infinity"``, ``"-Infinity"``, so every line is strict JSON):
    ``train_start``; ``resume`` (the training state's path and name, the epoch and batch
    training continues from); ``epoch_start`` (with the learning rates); ``train_loss`` (each
    log interval); ``<stage>_metrics``; ``checkpoint`` (with its ``kind``); ``epoch_end`` (the
    epoch summary: mean training loss of the epoch, validation metrics, seconds since the epoch
    started or, for an epoch resumed in its middle, since the resume); ``train_end`` (with the
    stop reason); ``exception`` (with the traceback). A resumed run appends to the file: the
    batches redone after the training state are logged again, after the ``resume`` record.

    Epochs are numbered for people on the console and for programs in the file: console
    lines and the progress bar count from 1 out of ``max_epochs`` (``epoch=1/3`` is the
    first of three), while the JSON lines keep ``epoch`` as ``state.current_epoch``
    (0-based), like checkpoint names (``epoch-0``), ``metrics.tsv`` and ``maps.json``.

    Console text is escaped: a metric name, a stop reason or an exception message cannot break
    a line or send terminal escape sequences.
    """

    priorities = priorities.framing(priorities.FIRST, priorities.LAST)
    rank_zero_only = True

    def __init__(
        self,
        *,
        console: bool = True,
        progress_bar: bool | None = None,
        stream: IO[str] | None = None,
        console_interval: float = 10.0,
    ) -> None:
        if not isinstance(console, bool):
            raise ConfigurationTypeError(
                f"LoggerCallback: console={console!r} is not a bool; pass True to print "
                "progress and summaries or False for the JSON lines only"
            )
        if progress_bar is not None and not isinstance(progress_bar, bool):
            raise ConfigurationTypeError(
                f"LoggerCallback: progress_bar={progress_bar!r} is not True, False or None; "
                "None draws a bar only when the stream is a terminal"
            )
        if stream is not None and not callable(getattr(stream, "write", None)):
            raise ConfigurationTypeError(
                f"LoggerCallback: stream={stream!r} has no write method; pass a text stream "
                "(sys.stdout, an open file, io.StringIO()) or None for sys.stderr"
            )
        if isinstance(console_interval, bool) or not isinstance(console_interval, int | float):
            raise ConfigurationTypeError(
                f"LoggerCallback: console_interval={console_interval!r} is not a number; pass "
                "the seconds between two console lines of the training loss, e.g. 10.0"
            )
        if not finite_number(console_interval) or console_interval <= 0:
            raise ConfigurationError(
                f"LoggerCallback: console_interval={console_interval!r} is not a positive "
                "finite number of seconds; pass e.g. console_interval=10.0"
            )
        self.console = console
        self.progress_bar = progress_bar
        self.console_interval = float(console_interval)
        self._stream = stream
        self._with_bar: bool | None = None
        self._file: IO[str] | None = None
        self._log: Any = None
        self._console_log: Any = None
        self._bar: tqdm[Any] | None = None
        self._clear_run()

    def _clear_run(self) -> None:
        """The state before a run opens its log: no file, no bar, no epoch summed up."""
        self._close()
        self._last_loss_line: float | None = None
        # The epoch summary; part of the training state, so a resumed epoch sums up alike.
        self._loss_sum = 0.0
        self._loss_batches = 0
        self._logged_position = 0
        self._epoch_started: float | None = None
        self._epoch_metrics: dict[str, float] | None = None
        self._epoch_improved: list[str] = []

    def reset(self) -> None:
        """Forget the earlier run's epoch summary and close what it left open.

        Whether a bar is drawn stays as decided when the handlers were subscribed (the
        per-batch update is subscribed or not by then); the next run opens the log of its
        own MAPS at ``train_start``.
        """
        self._clear_run()

    # ------------------------------------------------------------ plumbing
    @property
    def stream(self) -> IO[str]:
        """The console stream (resolved late, so pytest's capture and redirections apply)."""
        return self._stream if self._stream is not None else sys.stderr

    def _uses_bar(self) -> bool:
        if self._with_bar is not None:
            return self._with_bar  # decided when the per-batch update was subscribed, or not
        if not self.console:
            return False
        if self.progress_bar is not None:
            return self.progress_bar
        isatty: Callable[[], bool] | None = getattr(self.stream, "isatty", None)
        return bool(isatty and isatty())

    def handlers(
        self, known_events: Mapping[str, EventSpec] | None = None
    ) -> Iterator[tuple[str, Any, Options]]:
        """The logger's handlers; the per-batch bar update only when a bar is shown."""
        found = super().handlers() if known_events is None else super().handlers(known_events)
        uses_bar = self._with_bar = self._uses_bar()
        for event, handler, options in found:
            if event == "batch_end" and not uses_bar:
                continue
            yield event, handler, options

    def _open(self, maps: Maps) -> None:
        if self._file is not None:
            return
        path = maps.file(LOGS_DIR, LOG_FILE)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = path.open("a", encoding="utf-8", buffering=1)
        self._log = _private_logger(
            structlog.WriteLogger(self._file),
            [
                structlog.processors.add_log_level,
                structlog.processors.TimeStamper(fmt="iso", utc=True),
                structlog.processors.format_exc_info,
                _finite_json,
                structlog.processors.JSONRenderer(json.dumps, sort_keys=False, allow_nan=False),
            ],
        )
        if self.console:
            self._console_log = _private_logger(
                _LineWriter(lambda: self.stream),
                [
                    structlog.processors.add_log_level,
                    structlog.processors.TimeStamper(fmt="%H:%M:%S", utc=False),
                    _drop_empty,
                    _join_lists,
                    structlog.dev.ConsoleRenderer(colors=False, pad_event_to=16, sort_keys=False),
                    _escape_line,
                ],
            )

    def _emit(
        self,
        level: str,
        event: str,
        fields: Mapping[str, Any],
        *,
        console: Mapping[str, Any] | bool = True,
        error: BaseException | None = None,
    ) -> None:
        """Write one record as a JSON line and, unless ``console`` is False, to the console.

        ``console`` may give the console its own fields (shorter, flattened).
        """
        if self._log is not None:
            extra = {} if error is None else {"exc_info": error}
            getattr(self._log, level)(event, **fields, **extra)
        if console is False or self._console_log is None:
            return
        shown = fields if console is True else console
        if self._bar is not None:
            self._bar.clear()
        getattr(self._console_log, level)(event, **shown)
        if self._bar is not None:
            self._bar.refresh()

    def _open_bar(self, state: TrainerState, done: int) -> None:
        self._close_bar()
        if self._uses_bar():
            self._bar = tqdm(
                total=state.num_batches,
                initial=done,
                desc=f"epoch {state.epoch_number}/{state.max_epochs}",
                file=self.stream,
                leave=False,
                dynamic_ncols=True,
            )

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def _begin_epoch(self) -> None:
        self._loss_sum = 0.0
        self._loss_batches = 0
        self._logged_position = 0
        self._epoch_metrics = None
        self._epoch_improved = []
        self._epoch_started = _monotonic()

    # -------------------------------------------------------------- events
    def on_train_start(self, *, state: TrainerState, maps: Maps) -> None:
        self._open(maps)
        self._last_loss_line = None
        self._emit("info", "train_start", {"maps": str(maps.path), "max_epochs": state.max_epochs})

    def on_resume(self, *, state: TrainerState, checkpoint: Path) -> None:
        path = Path(checkpoint)
        # Mid-epoch states are named without the epoch-end suffix: epoch_start will not fire
        # for the resumed epoch, so its bar and its clock start here.
        in_epoch = path.name == training_state_name(state.iteration, epoch_end=False)
        done = state.batch_idx + 1
        batch = f"{done}/{state.num_batches or '?'}" if in_epoch else None
        # The epoch training continues with: an epoch-end state holds the finished one.
        epoch = state.current_epoch if in_epoch else state.current_epoch + 1
        fields = {
            "checkpoint": str(path),
            "state": path.name,
            "epoch": epoch,
            "in_epoch": in_epoch,
            "batch": batch,
            "iteration": state.iteration,
            "global_step": state.global_step,
        }
        shown = {
            "state": path.name,
            "epoch": _epoch_label(epoch, state),
            "batch": batch,
            "iteration": state.iteration,
        }
        self._emit("info", "resume", fields, console=shown)
        if in_epoch:
            self._epoch_started = _monotonic()
            self._open_bar(state, done)

    def on_validate_start(self, *, maps: Maps) -> None:
        self._open(maps)

    on_test_start = on_validate_start
    on_predict_start = on_validate_start

    def on_epoch_start(self, *, state: TrainerState) -> None:
        self._begin_epoch()
        fields = {
            "epoch": state.current_epoch,
            "num_batches": state.num_batches,
            "lr": [_round(rate) for rate in state.learning_rates],
        }
        self._emit("info", "epoch_start", fields, console=False)
        self._open_bar(state, 0)

    def on_batch_end(self) -> None:
        if self._bar is not None:
            self._bar.update(1)

    def on_loss_logged(self, *, state: TrainerState, train_loss: float) -> None:
        position = state.batch_idx + 1
        covered = position - self._logged_position
        if covered > 0:
            # Weighted by the batches the interval's mean covers: an epoch mean, no extra sync.
            self._loss_sum += train_loss * covered
            self._loss_batches += covered
            self._logged_position = position
        fields = {
            "epoch": state.current_epoch,
            "batch": f"{position}/{state.num_batches or '?'}",
            "loss": _round(train_loss),
            "lr": [_round(rate) for rate in state.learning_rates],
        }
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{train_loss:.4g}", refresh=False)
            self._emit("info", "train_loss", fields, console=False)
            return
        now = _monotonic()
        shown = self._last_loss_line is None or now - self._last_loss_line >= self.console_interval
        if shown:
            self._last_loss_line = now
        console = {**fields, "epoch": _epoch_label(state.current_epoch, state)} if shown else False
        self._emit("info", "train_loss", fields, console=console)

    def on_metrics_computed(self, *, state: TrainerState, metrics: Mapping[str, float]) -> None:
        values = {name: _round(value) for name, value in metrics.items()}
        if state.stage == "validation":
            improved = [
                name for name in metrics if state.best_epochs.get(name) == state.current_epoch
            ]
            self._epoch_metrics = values
            self._epoch_improved = improved
            fields = {"epoch": state.current_epoch, "metrics": values, "improved": improved}
            # On the console, validation is part of the epoch's summary line.
            self._emit("info", "validation_metrics", fields, console=False)
            return
        shown = {f"{state.stage}_{name}": value for name, value in values.items()}
        self._emit("info", f"{state.stage}_metrics", {"metrics": values}, console=shown)

    def on_epoch_end(self, *, state: TrainerState) -> None:
        self._close_bar()
        loss = self._loss_sum / self._loss_batches if self._loss_batches else None
        seconds = None if self._epoch_started is None else _monotonic() - self._epoch_started
        fields = {
            "epoch": state.current_epoch,
            "train_loss": None if loss is None else _round(loss),
            "metrics": self._epoch_metrics,
            "improved": self._epoch_improved,
            "seconds": None if seconds is None else round(seconds, 3),
        }
        shown: dict[str, Any] = {
            "epoch": _epoch_label(state.current_epoch, state),
            "train_loss": fields["train_loss"],
            **{f"val_{name}": value for name, value in (self._epoch_metrics or {}).items()},
            "improved": self._epoch_improved or None,
            "time": None if seconds is None else f"{seconds:.1f}s",
        }
        self._emit("info", "epoch_end", fields, console=shown)
        self._epoch_started = None

    def on_checkpoint(self, *, checkpoint: Any, tag: str, kind: str) -> None:
        fields = {"kind": kind, "tag": tag, "path": str(checkpoint)}
        self._emit("info", "checkpoint", fields, console=False)

    def on_train_end(self, *, state: TrainerState) -> None:
        self._close_bar()
        fields = {
            "epochs": state.current_epoch + 1,
            "global_step": state.global_step,
            "stopped_by": state.stopped_by,
            "reason": state.stop_reason,
        }
        self._emit("info", "train_end", fields)

    def on_exception(self, *, state: TrainerState, exception: BaseException) -> None:
        self._close_bar()
        fields = {
            "stage": state.stage,
            "epoch": state.current_epoch,
            "iteration": state.iteration,
            "error": f"{type(exception).__name__}: {exception}",
        }
        training = state.stage in ("train", "validation")
        shown = {**fields, "epoch": _epoch_label(state.current_epoch, state) if training else None}
        self._emit("error", "exception", fields, console=shown, error=exception)

    def on_teardown(self) -> None:
        self._close()

    def _close(self) -> None:
        self._close_bar()
        if self._file is not None:
            self._file.close()
        self._file = None
        self._log = None
        self._console_log = None

    def state_dict(self) -> dict[str, Any]:
        """The running epoch's loss sums, so the summary of a resumed epoch is the same."""
        return {
            "loss_sum": self._loss_sum,
            "loss_batches": self._loss_batches,
            "logged_position": self._logged_position,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._loss_sum = float(state.get("loss_sum", 0.0))
        self._loss_batches = int(state.get("loss_batches", 0))
        self._logged_position = int(state.get("logged_position", 0))

    def config(self) -> dict[str, Any]:
        return {
            "console": self.console,
            "progress_bar": self.progress_bar,
            "console_interval": self.console_interval,
        }


class _LineWriter:
    """A structlog logger writing each rendered record as one line to a stream looked up late."""

    def __init__(self, stream: Callable[[], IO[str]]) -> None:
        self._stream = stream

    def msg(self, message: str) -> None:
        stream = self._stream()
        stream.write(message + "\n")
        flush: Callable[[], object] | None = getattr(stream, "flush", None)
        if callable(flush):
            flush()

    debug = info = warning = error = critical = msg


def _private_logger(logger: object, processors: Sequence[Any]) -> Any:
    """A bound logger whose every setting is explicit: the global configuration is never read."""
    return structlog.wrap_logger(
        logger,
        processors=list(processors),
        wrapper_class=structlog.BoundLogger,
        context_class=dict,
        cache_logger_on_first_use=False,
    ).bind()


def _drop_empty(_: Any, __: str, event: MutableMapping[str, Any]) -> Mapping[str, Any]:
    """Console only: leave out fields without a value."""
    return {key: value for key, value in event.items() if value is not None}


def _join_lists(_: Any, __: str, event: MutableMapping[str, Any]) -> Mapping[str, Any]:
    """Console only: lists as comma-separated values (``lr=0.1,0.01``)."""
    return {
        key: ",".join(map(str, value)) if isinstance(value, list | tuple) else value
        for key, value in event.items()
    }


def _escape_line(_: Any, __: str, line: str) -> str:
    """Console only, after rendering: one line, whatever a name, a reason or an error holds."""
    return escape_control(line)


def _finite_json(_: Any, __: str, event: MutableMapping[str, Any]) -> Mapping[str, Any]:
    """JSON only: non-finite numbers as strings, so every line is strict JSON."""
    return {key: _finite(value) for key, value in event.items()}


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, Mapping):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(item) for item in value]
    return value


def _epoch_label(epoch: int, state: TrainerState) -> str:
    """An epoch as the console shows it: counted from 1, out of ``max_epochs`` (``2/10``)."""
    return f"{epoch + 1}/{state.max_epochs}"


def _round(value: float) -> float:
    if math.isnan(value) or math.isinf(value) or value == 0:
        return value
    return float(f"{value:.6g}")
