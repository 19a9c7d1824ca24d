"""Documented priorities of the built-in callbacks (higher runs first; user default is 0).

Logger and Monitor run first at start events and last at end events, so what they report
frames everything else; checkpoint writers decide after every other end-of-epoch handler, so
what they save is the state after the epoch (early-stopping counters included).
"""

FIRST = 1000
"""Logger at start events."""
MONITOR_FIRST = 900
"""Monitor at start events (right after the logger)."""
DEFAULT = 0
"""User callbacks, early stopping, LR scheduling and the metrics writer."""
CHECKPOINT = -500
"""Model checkpoints at end-of-epoch events (after user handlers, early stopping, schedulers)."""
TRAINING_CHECKPOINT = -800
"""Training checkpoints: after every other handler but the monitor and the logger. The state
itself is written by the Trainer once the event's dispatch is over, so it includes them too."""
MONITOR_LAST = -900
"""Monitor at end events."""
LAST = -1000
"""Logger at end events."""

START_EVENTS = (
    "trainer_init",
    "train_start",
    "resume",
    "epoch_start",
    "batch_start",
    "validation_start",
    "validate_start",
    "test_start",
    "predict_start",
)
END_EVENTS = (
    "batch_end",
    "loss_logged",
    "metrics_computed",
    "validation_end",
    "epoch_end",
    "checkpoint",
    "train_end",
    "validate_end",
    "test_end",
    "predict_end",
    "exception",
    "teardown",
)


def framing(first: int, last: int) -> dict[str, int]:
    """Per-event priorities for a callback that frames the others: first at starts, last at ends."""
    return {**dict.fromkeys(START_EVENTS, first), **dict.fromkeys(END_EVENTS, last)}
