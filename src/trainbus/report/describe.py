"""A run in words: status, epochs, best metric, times, as both the page and the listing say them.

Epochs are numbered from 1, as in the training summary (``metrics.tsv`` counts from 0).
"""

from __future__ import annotations

import datetime as _dt
import math
from typing import Any

from trainbus.report.reading import Run, call_status, number, parse_time

__all__ = [
    "best_metric",
    "format_duration",
    "format_number",
    "format_time",
    "headline_metric",
    "progress",
    "started",
    "status_line",
    "stopped_by",
]


def status_line(run: Run) -> str:
    """The last call's outcome: ``completed``, ``stopped: <reason>``, ``failed: <error>``,
    ``running`` or ``interrupted``."""
    status = run.status
    calls = run.calls
    if not calls:
        return status
    call = calls[-1]
    if status == "stopped":
        stop = call.get("stop")
        reason = stop.get("reason") if isinstance(stop, dict) else None
        return f"stopped: {reason}" if reason else "stopped"
    if status == "failed" and call.get("error"):
        return f"failed: {call['error']}"
    return status


def stopped_by(call: dict[str, Any]) -> str | None:
    """Who stopped a call (a subscriber id), if one did."""
    stop = call.get("stop")
    by = stop.get("by") if isinstance(stop, dict) else None
    return str(by) if by else None


def progress(run: Run) -> tuple[int | None, int | None]:
    """Epochs done and the most planned, from the last train call (or the running one's
    logged losses)."""
    calls = run.train_calls
    planned = run.settings.get("max_epochs")
    limit = planned if isinstance(planned, int) else None
    if not calls:
        return None, limit
    call = calls[-1]
    summary = call.get("summary")
    if isinstance(summary, dict) and isinstance(summary.get("epochs_done"), int):
        most = summary.get("max_epochs")
        return summary["epochs_done"], most if isinstance(most, int) else limit
    if call_status(call) == "running":
        epochs = [number(r.get("epoch")) for r in run.losses.rows]
        finite = [e for e in epochs if math.isfinite(e)]
        return (int(max(finite)) if finite else 0), limit
    done = call.get("epochs")
    return (done if isinstance(done, int) else None), limit


def headline_metric(run: Run) -> str | None:
    """The metric a run is judged by: the one its best weights are kept for, else the first."""
    names = run.metric_names()
    for callback in run.document.get("callbacks") or []:
        if isinstance(callback, dict) and str(callback.get("id", "")).startswith(
            "ModelCheckpointCallback"
        ):
            config = callback.get("config")
            metric = config.get("metric") if isinstance(config, dict) else None
            if metric in names:
                return str(metric)
    return names[0] if names else None


def best_metric(run: Run, metric: str) -> tuple[float, int] | None:
    """The best validation value of ``metric`` and its epoch (from 1); from ``metrics.tsv``,
    else from the last train call's record."""
    best = run.best(metric)
    if best is not None:
        return best[0], best[1] + 1
    for call in reversed(run.train_calls):
        values, epochs = call.get("best_metrics"), call.get("best_epochs")
        if isinstance(values, dict) and metric in values:
            epoch = epochs.get(metric) if isinstance(epochs, dict) else None
            value = number(values[metric])
            if math.isfinite(value) and isinstance(epoch, int):
                return value, epoch + 1
    return None


def started(run: Run) -> _dt.datetime | None:
    """When the first call started."""
    for call in run.calls:
        moment = parse_time(call.get("started"))
        if moment is not None:
            return moment
    return None


def format_time(moment: _dt.datetime | None) -> str:
    """A time in the local zone, to the minute."""
    return "-" if moment is None else moment.astimezone().strftime("%Y-%m-%d %H:%M")


def format_duration(seconds: float | None) -> str:
    """Seconds for people: ``8.4s``, ``3m05s``, ``2h07m``."""
    if seconds is None or not math.isfinite(seconds):
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, rest = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{rest:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def format_number(value: object) -> str:
    """A metric value with four significant digits; text as it is."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return "-" if value is None else str(value)
    return f"{value:.4g}" if isinstance(value, float) else str(value)
