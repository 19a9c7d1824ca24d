"""LoggerCallback: structured logs (JSON lines in the MAPS), readable console, progress display.

structlog is used through loggers this callback builds for the run (``structlog.wrap_logger``):
the user's global structlog and ``logging`` configuration are never touched. On a terminal the
progress is a tqdm bar; when output is not a terminal (CI, a file, a pipe) it is plain lines at
log intervals and epoch ends, never a carriage return. Runs on rank 0 only. The training loss
is read from the device only at log intervals (the ``loss_logged`` event), never per batch.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from typing import IO, Any

import structlog
from tqdm import tqdm

from trainbus.engine.maps import LOGS_DIR, Maps
from trainbus.engine.state import TrainerState
from trainbus.errors import ConfigurationTypeError
from trainbus.events.callback import Callback
from trainbus.events.catalog import EventSpec
from trainbus.events.marker import Options
from trainbus.handlers import priorities

LOG_FILE = "train.jsonl"


class LoggerCallback(Callback):
    """Log the run: JSON lines in ``logs/train.jsonl``, a console view, and progress.

    - ``console``: print progress and summaries (default True).
    - ``progress_bar``: ``None`` picks a bar on a terminal and plain lines elsewhere.
    - ``stream``: where console output goes (default ``sys.stderr``).
    """

    priorities = priorities.framing(priorities.FIRST, priorities.LAST)
    rank_zero_only = True

    def __init__(
        self,
        *,
        console: bool = True,
        progress_bar: bool | None = None,
        stream: IO[str] | None = None,
    ) -> None:
        for name, value in (("console", console),):
            if not isinstance(value, bool):
                raise ConfigurationTypeError(f"LoggerCallback: {name}={value!r} is not a bool")
        if progress_bar is not None and not isinstance(progress_bar, bool):
            raise ConfigurationTypeError(
                f"LoggerCallback: progress_bar={progress_bar!r} is not True, False or None"
            )
        self.console = console
        self.progress_bar = progress_bar
        self._stream = stream
        self._file: IO[str] | None = None
        self._log: Any = None
        self._console_log: Any = None
        self._bar: tqdm[Any] | None = None

    # ------------------------------------------------------------ plumbing
    @property
    def stream(self) -> IO[str]:
        """The console stream (resolved late, so pytest's capture and redirections apply)."""
        return self._stream if self._stream is not None else sys.stderr

    def _uses_bar(self) -> bool:
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
        uses_bar = self._uses_bar()
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
        self._log = structlog.wrap_logger(
            structlog.WriteLogger(self._file),
            processors=[
                structlog.processors.add_log_level,
                structlog.processors.TimeStamper(fmt="iso", utc=True),
                structlog.processors.format_exc_info,
                structlog.processors.JSONRenderer(sort_keys=False),
            ],
        )
        if self.console:
            self._console_log = structlog.wrap_logger(
                structlog.PrintLogger(self.stream),  # type: ignore[arg-type]
                processors=[
                    structlog.processors.add_log_level,
                    structlog.processors.TimeStamper(fmt="%H:%M:%S", utc=False),
                    _drop_empty,
                    structlog.dev.ConsoleRenderer(colors=False, pad_event_to=16),
                ],
            )

    def _emit(
        self, level: str, event: str, fields: Mapping[str, Any], *, console: bool = True
    ) -> None:
        if self._log is not None:
            getattr(self._log, level)(event, **fields)
        if console and self._console_log is not None:
            if self._bar is not None:
                self._bar.clear()
            getattr(self._console_log, level)(event, **fields)
            if self._bar is not None:
                self._bar.refresh()

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    # -------------------------------------------------------------- events
    def on_train_start(self, *, state: TrainerState, maps: Maps) -> None:
        self._open(maps)
        self._emit("info", "train_start", {"maps": str(maps.path), "max_epochs": state.max_epochs})

    def on_validate_start(self, *, maps: Maps) -> None:
        self._open(maps)

    on_test_start = on_validate_start
    on_predict_start = on_validate_start

    def on_epoch_start(self, *, state: TrainerState) -> None:
        if self._uses_bar():
            self._bar = tqdm(
                total=state.num_batches,
                desc=f"epoch {state.current_epoch + 1}/{state.max_epochs}",
                file=self.stream,
                leave=False,
                dynamic_ncols=True,
            )

    def on_batch_end(self) -> None:
        if self._bar is not None:
            self._bar.update(1)

    def on_loss_logged(self, *, state: TrainerState, train_loss: float) -> None:
        fields = {
            "epoch": state.current_epoch,
            "batch": f"{state.batch_idx + 1}/{state.num_batches or '?'}",
            "loss": _round(train_loss),
            "lr": [_round(rate) for rate in state.learning_rates],
        }
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{train_loss:.4g}", refresh=False)
        self._emit("info", "train_loss", fields, console=self._bar is None)

    def on_metrics_computed(self, *, state: TrainerState, metrics: Mapping[str, float]) -> None:
        best = [
            name
            for name in metrics
            if state.stage == "validation" and state.best_epochs.get(name) == state.current_epoch
        ]
        fields: dict[str, Any] = {
            "epoch": state.current_epoch if state.stage == "validation" else None,
            **{name: _round(value) for name, value in metrics.items()},
            "improved": best or None,
        }
        self._emit("info", f"{state.stage}_metrics", fields)

    def on_epoch_end(self) -> None:
        self._close_bar()

    def on_checkpoint(self, *, checkpoint: Any, tag: str) -> None:
        self._emit("debug", "checkpoint", {"tag": tag, "path": str(checkpoint)}, console=False)

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
        self._emit("error", "exception", fields)

    def on_teardown(self) -> None:
        self._close_bar()
        if self._file is not None:
            self._file.close()
        self._file = None
        self._log = None
        self._console_log = None

    def config(self) -> dict[str, Any]:
        return {"console": self.console, "progress_bar": self.progress_bar}


def _drop_empty(_: Any, __: str, event: MutableMapping[str, Any]) -> Mapping[str, Any]:
    """Console only: leave out fields without a value."""
    return {key: value for key, value in event.items() if value is not None}


def _round(value: float) -> float:
    if math.isnan(value) or math.isinf(value) or value == 0:
        return value
    return float(f"{value:.6g}")
