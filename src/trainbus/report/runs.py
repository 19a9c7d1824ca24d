"""``trainbus runs``: one line per MAPS under a folder, sortable by a metric."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from trainbus.errors import ConfigurationError, MapsError
from trainbus.events.text import escape_control
from trainbus.report import describe
from trainbus.report.reading import Run, find_maps, parse_time, read_run

__all__ = ["format_rows", "list_runs"]


def list_runs(directory: Path, sort: str | None = None) -> tuple[list[dict[str, Any]], str]:
    """The rows of every MAPS under ``directory`` and a note for the reader ("" if none).

    Without ``sort`` the rows are in path order; with it, best first by that metric (its
    direction from the runs' ``maps.json``), runs without the metric last.
    """
    runs: list[Run] = []
    unreadable: list[str] = []
    for path in find_maps(directory):
        name = "." if path == directory else str(path.relative_to(directory))
        try:
            runs.append(read_run(path, name))
        except MapsError:
            unreadable.append(name)
    note = (
        f"skipped {len(unreadable)} unreadable maps.json: {', '.join(unreadable)}"
        if unreadable
        else ""
    )
    if sort is None:
        return [_row(run, describe.headline_metric(run)) for run in runs], note
    higher = _direction(runs, sort)
    rows = [_row(run, sort) for run in runs]
    if higher is None:
        higher = False
        note = "; ".join(
            filter(None, [note, f"no run declares whether higher {sort} is better: lowest first"])
        )

    def key(row: dict[str, Any]) -> tuple[bool, float]:
        value = row["best"]
        if value is None:
            return True, 0.0
        return False, -value if higher else value

    rows.sort(key=key)
    return rows, note


def _direction(runs: Sequence[Run], metric: str) -> bool | None:
    known = [run for run in runs if metric in run.metric_names() or metric in run.directions()]
    if not known:
        names = sorted({name for run in runs for name in run.metric_names()})
        raise ConfigurationError(
            f"--sort {metric!r}: no run under this folder records that metric; choose one of "
            f"{names or 'the metrics your runs record (none found)'}"
        )
    for run in known:
        direction = run.directions().get(metric)
        if direction is not None:
            return bool(direction)
    return None


def _row(run: Run, metric: str | None) -> dict[str, Any]:
    done, most = describe.progress(run)
    best = describe.best_metric(run, metric) if metric else None
    began = describe.started(run)
    calls = run.calls
    return {
        "name": run.name,
        "path": str(run.path),
        "status": run.status,
        "status_line": describe.status_line(run),
        "stopped_by": describe.stopped_by(calls[-1]) if calls else None,
        "epochs": done,
        "max_epochs": most,
        "metric": metric,
        "best": best[0] if best else None,
        "best_epoch": best[1] if best else None,
        "started": began.isoformat() if began else None,
        "seconds": run.seconds(),
    }


def format_rows(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as an aligned table, control characters escaped."""
    if not rows:
        return "(no MAPS found)"
    headers = ("run", "status", "epochs", "best", "started", "duration")
    table = [
        (
            row["name"],
            row["status_line"],
            "-" if row["epochs"] is None else f"{row['epochs']}/{row['max_epochs'] or '?'}",
            (
                f"{row['metric']} {describe.format_number(row['best'])} (epoch {row['best_epoch']})"
                if row["best"] is not None and math.isfinite(row["best"])
                else "-"
            ),
            describe.format_time(parse_time(row["started"])),
            describe.format_duration(row["seconds"]),
        )
        for row in rows
    ]
    cells = [tuple(escape_control(str(c)) for c in line) for line in table]
    # The status line can be long (a stop reason): it goes last, after the aligned columns.
    order = (0, 2, 3, 4, 5, 1)
    widths = {i: max(len(headers[i]), *(len(c[i]) for c in cells)) for i in order}
    lines = ["  ".join(headers[i].ljust(widths[i]) for i in order).rstrip()]
    lines.extend("  ".join(c[i].ljust(widths[i]) for i in order).rstrip() for c in cells)
    return "\n".join(lines)
