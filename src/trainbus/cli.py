"""The ``trainbus`` command: ``demo`` trains the bundled example, ``plan`` shows what runs when,
``plugins`` what the installed plugin packages add, ``report`` and ``runs`` look at runs."""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import runpy
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from trainbus.errors import ConfigurationError, TrainbusError
from trainbus.events.text import escape_control

# The status a shell reports for a writer killed by SIGPIPE (128 + 13), as `yes | head` does.
EXIT_BROKEN_PIPE = 141


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``trainbus`` console script; returns the exit status.

    When the reader of the output goes away early (``trainbus plan | head -1``), the command
    stops quietly with status 141, as a program killed by SIGPIPE does.
    """
    try:
        status = _run(argv)
        sys.stdout.flush()  # a closed pipe shows here, rather than at interpreter exit
    except BrokenPipeError:
        _discard_stdout()
        return EXIT_BROKEN_PIPE
    return status


def _run(argv: Sequence[str] | None) -> int:
    parser = _parser()
    arguments = parser.parse_args(argv)
    try:
        status: int = arguments.run(arguments)
    except TrainbusError as exc:
        print(f"trainbus: error: {exc}", file=sys.stderr)
        return 2
    return status


def _discard_stdout() -> None:
    """Point stdout at the null device: what is still buffered would fail again at exit."""
    try:
        descriptor = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):
        return  # not a file (a test's capture): nothing is flushed at exit
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, descriptor)
    finally:
        os.close(null)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trainbus",
        description="A PyTorch training engine built as a publish/subscribe system.",
    )
    parser.add_argument("--version", action="version", version=f"trainbus {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser(
        "demo",
        help="train a small CNN on scikit-learn's handwritten digits",
        description="Train a small CNN on scikit-learn's handwritten digits into a new MAPS.",
    )
    demo.add_argument(
        "--maps",
        type=Path,
        default=None,
        help="experiment directory to create (default: runs/demo-<date>-<time>)",
    )
    demo.add_argument("--epochs", type=_positive, default=None, help="maximum epochs (default 15)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    demo.set_defaults(run=_demo)

    plan = commands.add_parser(
        "plan",
        help="print the dispatch plan: per event, who runs in which order",
        description="Print the dispatch plan of a Trainer: per event, the subscribers in "
        "order with their priority, filter, ordering constraints, source (builtin, user or "
        "plugin:<distribution>), the ranks it runs on and whether it may return a command, "
        "for this process's rank. Without FILE, the demo's Trainer; with FILE, the "
        "last Trainer the Python file builds (the file runs as a script until it calls "
        "train/validate/test/predict, which are not carried out).",
    )
    plan.add_argument("--event", default=None, help="only this event")
    plan.add_argument("--json", action="store_true", help="print JSON instead of a table")
    plan.add_argument("file", nargs="?", type=Path, help="a Python file that builds a Trainer")
    plan.add_argument("arguments", nargs=argparse.REMAINDER, help="command-line arguments for FILE")
    plan.set_defaults(run=_plan)

    plugins = commands.add_parser(
        "plugins",
        help="list the plugin packages installed, and what loading them gives",
        description="Print the plugin load report for this environment: every entry point "
        "of the group 'trainbus.plugins', its distribution and version, and whether it "
        "loads (honouring TRAINBUS_DISABLE_PLUGIN_AUTOLOAD and TRAINBUS_PLUGINS), with the "
        "subscribers it registers or the reason it does not.",
    )
    plugins.add_argument("--block", action="append", default=[], help="a plugin not to load")
    plugins.add_argument("--json", action="store_true", help="print JSON instead of a table")
    plugins.set_defaults(run=_plugins)

    report = commands.add_parser(
        "report",
        help="write one self-contained HTML page about one or several runs",
        description="Write one HTML file that opens offline (plots inlined as SVG, no script): "
        "for one MAPS, its outcome, learning curves, learning rates, throughput and time split, "
        "subscribers by time, GPU use, dispatch plan, settings and environment; for several, "
        "the same curves overlaid and the settings that differ. Needs matplotlib: "
        "pip install 'trainbus[report]'. Only reads the MAPS: safe while a run trains.",
    )
    report.add_argument("maps", nargs="+", type=Path, metavar="MAPS", help="run directories")
    report.add_argument(
        "-o",
        "--output",
        type=Path,
        default=None,
        metavar="FILE",
        help="HTML file to write (default: MAPS/report.html for one run, ./report.html for "
        "several)",
    )
    report.add_argument(
        "--watch",
        type=_positive_seconds,
        default=None,
        metavar="SECONDS",
        help="rewrite the page every SECONDS while a run trains (the page reloads itself); "
        "stops when the run's call ends",
    )
    report.set_defaults(run=_report)

    runs = commands.add_parser(
        "runs",
        help="list the runs under a folder: status, epochs, best metric, times",
        description="One line per MAPS found under DIR (recursively, symbolic links not "
        "followed): its path relative to DIR, the status of its last call, epochs, best "
        "metric, start time and duration.",
    )
    runs.add_argument("directory", type=Path, metavar="DIR", help="folder holding runs")
    runs.add_argument(
        "--sort",
        default=None,
        metavar="METRIC",
        help="best first by this validation metric (direction from maps.json)",
    )
    runs.add_argument("--json", action="store_true", help="print JSON instead of a table")
    runs.set_defaults(run=_runs)
    return parser


def _report(arguments: argparse.Namespace) -> int:
    from trainbus.report import write_report

    try:
        write_report(arguments.maps, arguments.output, watch=arguments.watch)
    except KeyboardInterrupt:
        return 130
    return 0


def _runs(arguments: argparse.Namespace) -> int:
    from trainbus.report import format_rows, list_runs

    rows, note = list_runs(arguments.directory, arguments.sort)
    if note:
        print(f"trainbus runs: {escape_control(note)}", file=sys.stderr)
    if arguments.json:
        print(json.dumps(rows, indent=2))
    else:
        print(format_rows(rows))
    return 0


def _demo(arguments: argparse.Namespace) -> int:
    from trainbus.demo.run import DEFAULT_EPOCHS, run_demo

    maps = arguments.maps or Path("runs") / _dt.datetime.now().strftime("demo-%Y%m%d-%H%M%S")
    epochs = arguments.epochs or DEFAULT_EPOCHS
    # Flushed now: a reader sees it before training starts, in order with the log on stderr.
    print(f"trainbus demo: training a small CNN on the digits data set into {maps}", flush=True)
    result = run_demo(maps, epochs=epochs, seed=arguments.seed)
    # The Trainer printed its summary (epochs, outcome, best metrics, weights); what follows
    # is the demo's own: its headline figure and where to look next.
    print()
    print(
        f"validation accuracy {result.best_accuracy:.2%} (best epoch {result.best_epoch + 1} "
        f"of {result.epochs})"
    )
    print(f"experiment files    {result.maps}")
    print(f"  metrics           {result.maps / 'metrics.tsv'}")
    print(f"  best weights      {result.maps / 'checkpoints' / 'best-accuracy'}")
    print(f"  configuration     {result.maps / 'maps.json'}")
    print(f"look at the run:    trainbus report {result.maps}")
    return 0


def _plan(arguments: argparse.Namespace) -> int:
    if arguments.file is not None:
        trainer = _trainer_of_file(arguments.file, arguments.arguments)
        rows = trainer.plan(arguments.event)
    else:
        from trainbus.demo.run import build_trainer

        with tempfile.TemporaryDirectory() as scratch:
            # The MAPS is only created by train(); building the Trainer writes nothing there.
            trainer = build_trainer(Path(scratch) / "unused")
            rows = trainer.plan(arguments.event)
    placement = trainer.placement
    if arguments.json:
        print(json.dumps(rows, indent=2))
    else:
        print(f"dispatch plan of rank {placement.rank} of {placement.world_size}")
        print()
        print(format_settings(trainer.settings.record()))
        print()
        print(format_plan(rows))
    return 0


def format_settings(settings: dict[str, Any]) -> str:
    """The loop settings (what ``maps.json`` records under ``trainer``) as aligned lines."""
    width = max(len(name) for name in settings)
    lines = ["loop settings"]
    lines.extend(f"  {name.ljust(width)}  {value!r}" for name, value in settings.items())
    return "\n".join(lines)


class _TrainerBuilt(BaseException):
    """Raised in place of train/validate/test/predict while a file is run for its plan."""


def _trainer_of_file(path: Path, argv: Sequence[str] = ()) -> Any:
    """Run ``path`` as a script until it starts a call; return the last Trainer it built."""
    from trainbus.trainer import Trainer

    if not path.is_file():
        raise ConfigurationError(f"{str(path)!r} is not a file; pass a Python file")
    built: list[Trainer] = []
    original_init = Trainer.__init__
    calls = ("train", "validate", "test", "predict")
    originals = {name: getattr(Trainer, name) for name in calls}

    def record(self: Trainer, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        built.append(self)

    def interrupt(self: Trainer, *_: Any, **__: Any) -> None:
        raise _TrainerBuilt

    saved_argv = sys.argv
    Trainer.__init__ = record  # type: ignore[method-assign]
    for name in calls:
        setattr(Trainer, name, interrupt)
    try:
        sys.argv = [str(path), *argv]
        runpy.run_path(str(path), run_name="__main__")
    except _TrainerBuilt:
        pass
    except SystemExit as exc:
        if not built:
            raise ConfigurationError(
                f"{str(path)!r} exited (status {exc.code!r}) before building a Trainer; give "
                "it its arguments after the file name: trainbus plan [--event E] FILE ARGS..."
            ) from None
    finally:
        sys.argv = saved_argv
        Trainer.__init__ = original_init  # type: ignore[method-assign]
        for name, method in originals.items():
            setattr(Trainer, name, method)
    if not built:
        raise ConfigurationError(
            f"{str(path)!r} ran to its end without building a trainbus Trainer; pass a file "
            "that builds one (at top level or under `if __name__ == '__main__':`)"
        )
    return built[-1]


def _plugins(arguments: argparse.Namespace) -> int:
    from trainbus.events.plugins import GROUP, report

    records = [record.as_dict() for record in report(block=arguments.block)]
    if arguments.json:
        print(json.dumps(records, indent=2))
        return 0
    if not records:
        print(f"no plugin installed (no entry point in the group {GROUP!r})")
        return 0
    for record in records:
        print(
            escape_control(
                f"{record['name']}  {record['distribution']} {record['version']}  "
                f"({record['entry_point']})  {record['status']}"
                + (f": {record['reason']}" if record["reason"] else "")
            )
        )
        for subscriber in record["subscribers"]:
            print(f"    {escape_control(str(subscriber))}")
    return 0


def format_plan(rows: Sequence[dict[str, Any]]) -> str:
    """The plan as an aligned text table, one block per event."""
    if not rows:
        return "(no subscribers)"
    headers = (
        "#",
        "subscriber",
        "priority",
        "filter",
        "order",
        "source",
        "on_error",
        "ranks",
        "commands",
    )
    lines: list[str] = []
    table: list[tuple[str, ...]] = [
        (
            str(row["position"]),
            escape_control(str(row["id"])),
            str(row["priority"]),
            str(row["filter"]),
            str(row.get("order", "-")),
            str(row["source"]),
            str(row["on_error"]),
            "rank 0" if row["rank_zero_only"] else "all",
            "may" if row.get("commands", True) else "-",
        )
        for row in rows
    ]
    widths = [max(len(h), *(len(r[i]) for r in table)) for i, h in enumerate(headers)]
    current = None
    for row, cells in zip(rows, table, strict=True):
        if row["event"] != current:
            current = row["event"]
            if lines:
                lines.append("")
            lines.append(escape_control(str(current)))
            lines.append("  " + "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)))
        lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)))
    return "\n".join(line.rstrip() for line in lines)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return value


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return value


def _version() -> str:
    import trainbus

    return trainbus.__version__


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
