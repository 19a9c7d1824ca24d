"""Writing the report: once, or again and again while a run trains (``--watch``).

The page is replaced atomically (a temporary file in the same folder, then a rename), so a
browser reloading it never reads half a page. Watching only reads the MAPS: it never takes the
lock, and it stops when no watched run is running any more (its last call ended, or the process
holding its lock is gone).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TextIO

from trainbus.engine.files import create_file
from trainbus.errors import ConfigurationError, MapsError
from trainbus.report.figures import require_matplotlib
from trainbus.report.page import page
from trainbus.report.reading import Run, read_run

__all__ = ["default_output", "read_runs", "write_report"]

REPORT_FILE = "report.html"


def default_output(paths: Sequence[Path]) -> Path:
    """``<MAPS>/report.html`` for one run, ``report.html`` here for several."""
    return paths[0] / REPORT_FILE if len(paths) == 1 else Path(REPORT_FILE)


def run_names(paths: Sequence[Path]) -> list[str]:
    """Short names telling the runs apart: paths relative to their common folder."""
    if len(paths) == 1:
        resolved = paths[0].resolve()
        return [resolved.name or str(resolved)]
    every = [p.resolve() for p in paths]
    common = Path(os.path.commonpath(every))
    names = [str(p.relative_to(common)) if p != common else p.name for p in every]
    return [name or str(path) for name, path in zip(names, every, strict=True)]


def read_runs(paths: Sequence[Path], previous: Sequence[Run] | None = None) -> list[Run]:
    """Every MAPS read; while watching, a run that cannot be read right now keeps its last
    reading."""
    runs = []
    for index, (path, name) in enumerate(zip(paths, run_names(paths), strict=True)):
        try:
            runs.append(read_run(path, name))
        except MapsError:
            if previous is None:
                raise
            runs.append(previous[index])
    return runs


def write_report(
    paths: Sequence[Path],
    output: Path | None = None,
    *,
    watch: float | None = None,
    stream: TextIO | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> Path:
    """Write the report of the MAPS at ``paths`` to ``output`` and return its path.

    With ``watch`` (seconds), write it again every ``watch`` seconds while a run is running,
    the page reloading itself as often; the last page written has no reload.
    """
    if not paths:
        raise ConfigurationError("no MAPS given; pass at least one run directory")
    if watch is not None and not (watch > 0):
        raise ConfigurationError(f"--watch {watch!r} is not a positive number of seconds")
    require_matplotlib()
    out = stream or sys.stderr
    target = output or default_output(paths)
    runs = read_runs(paths)
    if watch is not None and any(run.running for run in runs):
        print(f"trainbus report: watching, writing {target} every {watch:g} s", file=out)
        try:
            while any(run.running for run in runs):
                _write(target, page(runs, refresh=watch))
                sleep(watch)
                runs = read_runs(paths, runs)
        except KeyboardInterrupt:
            _write(target, page(runs))
            raise
    _write(target, page(runs))
    states = ", ".join(f"{run.name}: {run.status}" for run in runs)
    print(f"trainbus report: wrote {target} ({states})", file=out)
    return target


def _write(target: Path, text: str) -> None:
    folder = target.parent
    try:
        # The mode an ordinary open() gives under the umask, as for every file trainbus writes.
        descriptor, temporary = create_file(folder or Path("."), f".{target.name}.")
    except OSError as exc:
        raise MapsError(
            f"cannot write the report into {str(folder)!r}: {exc.strerror or exc}; choose "
            "another file with -o FILE"
        ) from None
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
