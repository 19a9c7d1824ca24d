"""The report's plots, drawn with matplotlib into SVG text for inlining in the page.

Figures are built from :class:`matplotlib.figure.Figure` directly: no pyplot, no backend
switch, no figure left registered anywhere. The few settings the drawing needs are applied
for the duration of one ``savefig`` only. Text is written as SVG ``<text>`` elements (escaped by
matplotlib) with math parsing off, so a metric or run name is drawn as written, ``$`` included.
Epochs are numbered from 1, as in the training summary and on the console.
"""

from __future__ import annotations

import importlib.util
import io
import math
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from trainbus.errors import MissingDependencyError
from trainbus.report.reading import Run, number

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "COLORS",
    "FIGURES",
    "color",
    "draw",
    "phase_seconds",
    "require_matplotlib",
    "top_subscribers",
]

COLORS = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
)
PHASES = (
    ("data", "data_seconds", "#9ecae1"),
    ("compute", "compute_seconds", "#3182bd"),
    ("validation", "validation_seconds", "#fd8d3c"),
    ("checkpoints", "checkpoint_seconds", "#74c476"),
    ("other", None, "#bdbdbd"),
)
TOP_SUBSCRIBERS = 10
_WIDTH = 7.2
_GIB = 1024.0**3
_STYLE: dict[str, Any] = {
    "svg.fonttype": "none",
    "text.parse_math": False,
    "text.usetex": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "font.size": 9.0,
    "axes.titlesize": 10.0,
    "legend.fontsize": 8.0,
    "figure.dpi": 72.0,
}
_COMMENT = re.compile(r"<!--.*?-->|<metadata>.*?</metadata>", re.DOTALL)


def require_matplotlib() -> None:
    """Raise a clear error when matplotlib, the report's optional dependency, is missing."""
    if importlib.util.find_spec("matplotlib") is None:
        raise MissingDependencyError(
            "the report draws its plots with matplotlib, which is not installed; install the "
            "report extra: pip install 'trainbus[report]'"
        )


def render(figure: Figure, key: str) -> str:
    """The figure as an ``<svg>`` element ready to inline (ids made unique by ``key``)."""
    import matplotlib

    buffer = io.StringIO()
    with matplotlib.rc_context({"svg.hashsalt": key, "svg.id": f"svg-{key}"}):
        figure.savefig(buffer, format="svg", metadata={"Date": None}, bbox_inches="tight")
    text = buffer.getvalue()
    text = text[text.index("<svg") :]
    return _COMMENT.sub("", text)


@contextmanager
def _styled() -> Iterator[None]:
    import matplotlib

    with matplotlib.rc_context(_STYLE):  # type: ignore[arg-type]
        yield


def _figure(rows: int = 1, columns: int = 1, height: float = 3.0) -> tuple[Figure, list[Axes]]:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(_WIDTH, height * rows), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False)
    return figure, [a for row in axes for a in row]


def _epoch_axis(axes: Axes) -> None:
    from matplotlib.ticker import MaxNLocator

    axes.set_xlabel("epoch")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))


def _marker(points: int) -> str:
    """Dots on short series: a line of one or two points is otherwise hard to see."""
    return "o" if points <= 30 else ""


def color(index: int) -> str:
    return COLORS[index % len(COLORS)]


def _mark_resumes(axes: Axes, run: Run, index: int, several: bool, *, steps: bool) -> None:
    for number_, resume in enumerate(run.resumes):
        position = resume.step if steps else resume.epoch + 1
        if not math.isfinite(position):
            continue
        axes.axvline(
            position,
            color=color(index) if several else "#555555",
            linestyle=":",
            linewidth=1.2,
            label=None if several or number_ else "resumed",
        )


def training_loss(runs: Sequence[Run]) -> Figure | None:
    """Training loss at each logged optimizer step, with the resumes marked."""
    drawn = [(i, r) for i, r in enumerate(runs) if r.losses.rows]
    if not drawn:
        return None
    several = len(runs) > 1
    figure, (axes,) = _figure()
    for index, run in drawn:
        axes.plot(
            run.losses.numbers("global_step"),
            run.losses.numbers("train_loss"),
            color=color(index),
            linewidth=1.3,
            marker=_marker(len(run.losses.rows)),
            markersize=3,
            label=run.name if several else "training loss",
            gid=f"data-loss-{index}",
        )
        _mark_resumes(axes, run, index, several, steps=True)
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("training loss")
    axes.legend(loc="best")
    return figure


def validation(runs: Sequence[Run]) -> Figure | None:
    """One panel per validation metric, per epoch, with the best epoch and resumes marked."""
    names: list[str] = []
    for run in runs:
        names.extend(n for n in run.metric_names() if n not in names)
    if not names:
        return None
    several = len(runs) > 1
    columns = 1 if len(names) == 1 else 2
    rows = math.ceil(len(names) / columns)
    figure, panels = _figure(rows, columns, height=2.8)
    for panel in panels[len(names) :]:
        panel.set_visible(False)
    for panel_index, (name, axes) in enumerate(zip(names, panels, strict=False)):
        for index, run in enumerate(runs):
            records = run.validation_rows()
            values = run.metrics.numbers(name, records)
            if not any(math.isfinite(v) for v in values):
                continue
            epochs = [number(r.get("epoch")) + 1 for r in records]
            axes.plot(
                epochs,
                values,
                color=color(index),
                marker="o",
                markersize=3,
                linewidth=1.3,
                label=run.name if several else "validation",
                gid=f"data-metric-{panel_index}-{index}",
            )
            best = run.best(name)
            if best is not None:
                axes.plot(
                    [best[1] + 1],
                    [best[0]],
                    marker="*",
                    markersize=13,
                    color=color(index),
                    markeredgecolor="black",
                    linestyle="none",
                    label=None if several else f"best (epoch {best[1] + 1})",
                )
            _mark_resumes(axes, run, index, several, steps=False)
        axes.set_title(name)
        _epoch_axis(axes)
        axes.legend(loc="best")
    return figure


def learning_rates(runs: Sequence[Run]) -> Figure | None:
    """The learning rate of each optimizer group at each logged step."""
    series: list[tuple[int, Run, list[float], list[list[float]]]] = []
    for index, run in enumerate(runs):
        if "learning_rates" not in run.losses.columns:
            continue
        steps = run.losses.numbers("global_step")
        groups = [
            [number(cell) for cell in row.get("learning_rates", "").split(",")]
            for row in run.losses.rows
        ]
        width = max((len(g) for g in groups), default=0)
        by_group = [[g[i] if i < len(g) else math.nan for g in groups] for i in range(width)]
        if any(math.isfinite(v) for group in by_group for v in group):
            series.append((index, run, steps, by_group))
    if not series:
        return None
    several = len(runs) > 1
    styles = ("-", "--", "-.", ":")
    figure, (axes,) = _figure(height=2.8)
    finite: list[float] = []
    for index, run, steps, by_group in series:
        for group, rates in enumerate(by_group):
            finite.extend(v for v in rates if math.isfinite(v))
            label = f"group {group}" if not several else f"{run.name}, group {group}"
            axes.plot(
                steps,
                rates,
                color=color(index if several else group),
                linestyle=styles[group % len(styles)] if several else "-",
                linewidth=1.3,
                label=label,
                drawstyle="steps-post",
                gid=f"data-lr-{index}-{group}",
            )
    if finite and min(finite) > 0 and max(finite) / min(finite) > 20:
        from matplotlib.ticker import LogFormatter

        axes.set_yscale("log")
        # The default log labels are mathtext, which is off so that names print as written.
        axes.yaxis.set_major_formatter(LogFormatter())
        axes.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=True))
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("learning rate")
    axes.legend(loc="best")
    return figure


def _epochs(run: Run) -> list[dict[str, Any]]:
    epochs = (run.monitor or {}).get("epochs")
    return [e for e in epochs if isinstance(e, dict)] if isinstance(epochs, list) else []


def throughput(runs: Sequence[Run]) -> Figure | None:
    """Training samples per second in each epoch (the Monitor's records)."""
    drawn = [(i, r, _epochs(r)) for i, r in enumerate(runs) if _epochs(r)]
    if not drawn:
        return None
    several = len(runs) > 1
    figure, (axes,) = _figure(height=2.6)
    for index, run, epochs in drawn:
        axes.plot(
            [number(e.get("epoch")) + 1 for e in epochs],
            [number(e.get("samples_per_second")) for e in epochs],
            color=color(index),
            marker="o",
            markersize=3,
            linewidth=1.3,
            label=run.name if several else "training samples/s",
            gid=f"data-throughput-{index}",
        )
    _epoch_axis(axes)
    axes.set_ylabel("samples/s")
    axes.set_ylim(bottom=0)
    axes.legend(loc="best")
    return figure


def phase_seconds(record: dict[str, Any], *, total: bool) -> list[float]:
    """Seconds in data, compute, validation, checkpoints and other, from a Monitor record."""
    values = [number(record.get(key)) if key else 0.0 for _, key, _ in PHASES]
    values = [v if math.isfinite(v) else 0.0 for v in values]
    train = number(record.get("train_seconds"))
    # Training time the loop did not split into data and compute counts as other.
    unsplit = max(0.0, train - values[0] - values[1]) if math.isfinite(train) else 0.0
    recorded_other = number(record.get("other_seconds")) if total else 0.0
    values[-1] = unsplit + (recorded_other if math.isfinite(recorded_other) else 0.0)
    return values


def time_split(runs: Sequence[Run]) -> Figure | None:
    """Where the time went: per epoch for one run, in total per run for several."""
    if len(runs) == 1:
        epochs = _epochs(runs[0])
        if not epochs:
            return None
        labels = [str(int(number(e.get("epoch"))) + 1) for e in epochs]
        table = [phase_seconds(e, total=False) for e in epochs]
        horizontal = False
    else:
        drawn = [r for r in runs if r.monitor]
        if not drawn:
            return None
        labels = [r.name for r in drawn]
        table = [phase_seconds(r.monitor or {}, total=True) for r in drawn]
        horizontal = True
    height = 0.45 * len(labels) + 1.2 if horizontal else 2.8
    figure, (axes,) = _figure(height=height)
    positions = list(range(len(labels)))
    base = [0.0] * len(labels)
    for phase, (name, _, shade) in enumerate(PHASES):
        values = [row[phase] for row in table]
        if horizontal:
            bars = axes.barh(positions, values, left=base, color=shade, label=name)
        else:
            bars = axes.bar(positions, values, bottom=base, color=shade, label=name)
        for number_, bar in enumerate(bars):
            bar.set_gid(f"data-time-{phase}-{number_}")
        base = [b + v for b, v in zip(base, values, strict=True)]
    if horizontal:
        axes.set_yticks(positions, labels)
        axes.invert_yaxis()
        axes.set_xlabel("seconds")
    else:
        axes.set_xticks(positions, labels)
        axes.set_xlabel("epoch")
        axes.set_ylabel("seconds")
    figure.legend(loc="outside upper center", ncols=len(PHASES))
    return figure


def top_subscribers(run: Run) -> list[dict[str, Any]]:
    """The subscribers that took the most time (estimated from the timed dispatches)."""
    section = (run.monitor or {}).get("subscribers")
    rows = section.get("rows") if isinstance(section, dict) else None
    if not isinstance(rows, list):
        return []
    timed = [
        r
        for r in rows
        if isinstance(r, dict) and math.isfinite(number(r.get("estimated_total_seconds")))
    ]
    timed.sort(key=lambda r: -number(r.get("estimated_total_seconds")))
    return timed[:TOP_SUBSCRIBERS]


def subscribers(runs: Sequence[Run]) -> Figure | None:
    """The top subscribers by time, for one run."""
    if len(runs) != 1:
        return None
    rows = top_subscribers(runs[0])
    if not rows:
        return None
    figure, (axes,) = _figure(height=0.3 * len(rows) + 1.0)
    positions = list(range(len(rows)))
    bars = axes.barh(
        positions,
        [number(r.get("estimated_total_seconds")) * 1000 for r in rows],
        color=COLORS[0],
    )
    for number_, bar in enumerate(bars):
        bar.set_gid(f"data-subscriber-{number_}")
    axes.set_yticks(positions, [str(r.get("id")) for r in rows])
    axes.invert_yaxis()
    axes.set_xlabel("estimated total milliseconds")
    return figure


def gpu(runs: Sequence[Run]) -> Figure | None:
    """Peak GPU memory and mean utilisation per epoch, where the Monitor recorded them."""
    drawn: list[tuple[int, Run, list[tuple[dict[str, Any], dict[str, Any]]]]] = []
    for index, run in enumerate(runs):
        readings = [(e, e["gpu"]) for e in _epochs(run) if isinstance(e.get("gpu"), dict)]
        if readings:
            drawn.append((index, run, readings))
    if not drawn:
        return None
    several = len(runs) > 1
    figure, (memory, utilization) = _figure(1, 2, height=2.8)
    for index, run, records in drawn:
        epochs = [number(epoch.get("epoch")) + 1 for epoch, _ in records]
        label = run.name if several else None
        memory.plot(
            epochs,
            [number(g.get("peak_memory_used_bytes")) / _GIB for _, g in records],
            color=color(index),
            marker="o",
            markersize=3,
            label=label,
            gid=f"data-gpu-memory-{index}",
        )
        utilization.plot(
            epochs,
            [number(g.get("mean_utilization_percent")) for _, g in records],
            color=color(index),
            marker="o",
            markersize=3,
            label=label,
            gid=f"data-gpu-utilization-{index}",
        )
    memory.set_title("peak GPU memory used (GiB)")
    utilization.set_title("mean GPU utilisation (%)")
    utilization.set_ylim(0, 100)
    for axes in (memory, utilization):
        _epoch_axis(axes)
        if several:
            axes.legend(loc="best")
    return figure


# In page order: id, title, builder.
FIGURES: tuple[tuple[str, str, Callable[[Sequence[Run]], Figure | None]], ...] = (
    ("training-loss", "Training loss", training_loss),
    ("validation", "Validation metrics", validation),
    ("learning-rates", "Learning rates", learning_rates),
    ("throughput", "Throughput", throughput),
    ("time-split", "Where the time went", time_split),
    ("subscribers", "Subscribers by time", subscribers),
    ("gpu", "GPU", gpu),
)


def draw(runs: Sequence[Run]) -> dict[str, str | None]:
    """Every figure of the page as inline SVG (None where nothing was recorded for it)."""
    require_matplotlib()
    drawn: dict[str, str | None] = {}
    with _styled():
        for key, _, build in FIGURES:
            figure = build(runs)
            drawn[key] = None if figure is None else render(figure, key)
    return drawn
