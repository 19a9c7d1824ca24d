"""SIGTERM and SIGINT during ``train()``: remembered, acted on at the next step boundary.

A cluster preempting a job sends SIGTERM; a person at the terminal presses Ctrl-C. Either way
the handler installed here only records the signal: the loop, at its next step boundary,
writes a training state, stops (a resumable stop), lets ``train_end`` and ``teardown`` run,
and then exits with status 128 + the signal number, as a shell expects. A second signal while
the state is written changes nothing: it is recorded, not raised. The previous handlers are
put back when ``train()`` returns or raises.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

HANDLED = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
    """Context manager: install the recording handlers (main thread only), restore on exit."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for number in HANDLED:
                self._previous[number] = signal.signal(number, self._record)
        return self

    def __exit__(self, *_: object) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()

    def _record(self, number: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received = number
