"""SIGTERM and SIGINT during ``train()``: remembered, acted on at the next step boundary.

A cluster preempting a job sends SIGTERM; a person at the terminal presses Ctrl-C. Either way
the handler installed here records the signal and prints one line saying what will happen: the
loop, at its next step boundary, writes a training state, stops (a resumable stop), lets
``train_end`` and ``teardown`` run, and then exits with status 128 + the signal number, as a
shell expects.

A second signal is the way out of a handler or a loader that blocks: the process ends at once
with status 128 + its number, after a line saying that no training state was written (the last
one written stays valid). A repeat that arrives within :data:`REPEAT_WINDOW` seconds of the
first is taken as the same signal delivered twice (a launcher forwarding the signal its
process group also received), so that a preemption still saves. The previous handlers are put
back when ``train()`` returns or raises.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from types import FrameType
from typing import Any

from trainbus.errors import TrainingInterrupted

HANDLED = (signal.SIGTERM, signal.SIGINT)

REPEAT_WINDOW = 0.5
"""Seconds during which a repeated signal counts as the first one delivered again."""


class StopSignals:
    """Context manager: install the recording handlers (main thread only), restore on exit."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._first_at = 0.0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        self.received = None
        if threading.current_thread() is threading.main_thread():
            for number in HANDLED:
                self._previous[number] = signal.signal(number, self._record)
        return self

    def __exit__(self, *_: object) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()

    def _record(self, number: int, frame: FrameType | None) -> None:
        name = signal.Signals(number).name
        if self.received is None:
            self.received = number
            self._first_at = time.monotonic()
            again = "Ctrl-C" if number == signal.SIGINT else name
            _say(
                f"trainbus: received {name}: stopping at the next step boundary and writing a "
                f"training state; {again} again to abort without saving"
            )
            return
        if time.monotonic() - self._first_at < REPEAT_WINDOW:
            return
        _say(
            f"trainbus: received {name} again: aborting now; the training state was NOT "
            "saved (the last one written is intact: resume from it)"
        )
        # A handler or loader may be blocked where no exception would ever reach the loop.
        os._exit(128 + number)


def interactive_session() -> bool:
    """Whether Python runs a notebook, a REPL or ``python -c`` rather than a script file."""
    main = sys.modules.get("__main__")
    return (
        hasattr(sys, "ps1")
        or bool(sys.flags.interactive)
        or "ipykernel" in sys.modules
        or "IPython" in sys.modules
        or main is None
        or not hasattr(main, "__file__")
    )


def interruption(number: int, *, saved: str | None, maps: str, announce: bool) -> BaseException:
    """What ``train()`` raises once a stop signal was acted on; says how to resume first.

    A script exits with 128 + the signal number, as a shell expects; an interactive session
    gets :class:`~trainbus.errors.TrainingInterrupted` (a ``KeyboardInterrupt``), which
    ends the cell and keeps the kernel alive. ``announce``: print the line (rank 0).
    """
    name = signal.Signals(number).name
    if saved is None:
        where = "no training state was written"
        how = "start again (no training state to resume from)"
    else:
        where = f"training state {saved} written"
        how = (
            f"resume with train(..., resume=True) (or resume='auto'), or "
            f"Trainer.from_maps({maps!r}, model).train(...)"
        )
    line = f"trainbus: stopped by {name}; {where}; {how}"
    if announce:
        _say(line)
    if interactive_session():
        return TrainingInterrupted(line, signal=number, training_state=saved)
    return SystemExit(128 + number)


def _say(line: str) -> None:
    # Written straight to the file descriptor: a signal handler must not wait on a lock that
    # the interrupted code may hold inside sys.stderr.
    with contextlib.suppress(OSError):
        os.write(2, (line + "\n").encode("utf-8", "replace"))
