"""The report as one self-contained HTML page: inline SVG plots and tables, no script.

Every value read from a MAPS (run names, metric names, stop reasons, subscriber ids, settings)
is user text and is escaped here; the plots' text is escaped by matplotlib's SVG writer. The
page also forbids scripts through its Content-Security-Policy, so nothing a MAPS holds can run
when the page is opened.
"""

from __future__ import annotations

import datetime as _dt
import html
import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from trainbus.report import describe
from trainbus.report.figures import FIGURES, color, draw, phase_seconds, top_subscribers
from trainbus.report.reading import Run, call_status, number, parse_time
from trainbus.report.settings import differing, flatten

__all__ = ["page"]

POLICY = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"
_CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 62em;
       padding: 0 1em; color: #222; }
h1 { margin-bottom: 0.1em; } h2 { border-bottom: 1px solid #ddd; margin-top: 1.6em; }
.muted { color: #666; } .empty { color: #888; font-style: italic; }
table { border-collapse: collapse; margin: 0.5em 0; font-size: 0.9em; }
th, td { border: 1px solid #ddd; padding: 0.2em 0.5em; text-align: left;
         vertical-align: top; overflow-wrap: anywhere; }
th { background: #f4f4f4; white-space: nowrap; }
figure { margin: 0.8em 0; } figure svg { width: 100%; height: auto; }
figcaption { font-weight: 600; margin-bottom: 0.3em; }
.swatch { display: inline-block; width: 0.8em; height: 0.8em; margin-right: 0.4em; }
.status-completed { color: #1a7f37; } .status-failed, .status-interrupted { color: #c62828; }
.status-stopped { color: #9a6700; } .status-running { color: #0969da; }
details { margin: 0.5em 0; } summary { cursor: pointer; }
"""
_EMPTY = {
    "training-loss": "No training loss recorded yet (training_loss.tsv is empty or missing).",
    "validation": "No validation metrics recorded (no val_loader, or no validation yet).",
    "learning-rates": "No learning rates recorded (training_loss.tsv has no learning_rates).",
    "throughput": "No Monitor records (monitor.json is missing: MonitorCallback was off, or "
    "the run has not finished an epoch).",
    "time-split": "No Monitor records (monitor.json is missing).",
    "subscribers": "No subscriber timings recorded (no monitor.json, or no timed dispatch).",
    "gpu": "No GPU readings recorded (CPU training, or nvidia-ml-py absent).",
}


def e(value: object) -> str:
    """Text escaped for HTML content and attribute values."""
    return html.escape(str(value), quote=True)


def page(runs: Sequence[Run], *, refresh: float | None = None) -> str:
    """The whole report for one run or several; ``refresh`` makes the page reload itself."""
    several = len(runs) > 1
    figures = draw(runs)
    title = "trainbus: " + (f"{len(runs)} runs" if several else runs[0].name)
    parts = [_head(title, refresh), "<body>", _intro(runs, refresh)]
    parts.append(_comparison(runs) if several else _header(runs[0]))
    parts.append('<section id="figures">')
    for key, caption, _ in FIGURES:
        if several and key == "subscribers":
            continue
        parts.append(_figure(key, caption, figures[key]))
    parts.append("</section>")
    if several:
        parts.append(_settings_diff(runs))
    else:
        run = runs[0]
        parts.extend([_subscriber_table(run), _plan(run), _settings(run), _environment(run)])
    parts.append("</body></html>")
    return "\n".join(parts)


def _head(title: str, refresh: float | None) -> str:
    reload = (
        f'<meta http-equiv="refresh" content="{max(1, math.ceil(refresh))}">'
        if refresh is not None
        else ""
    )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{POLICY}">{reload}'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{e(title)}</title><style>{_CSS}</style></head>"
    )


def _intro(runs: Sequence[Run], refresh: float | None) -> str:
    now = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M:%S")
    heading = f"{len(runs)} runs" if len(runs) > 1 else runs[0].name
    watching = f" Watching: rewritten every {refresh:g} s while training runs." if refresh else ""
    paths = ", ".join(f"<code>{e(run.path)}</code>" for run in runs)
    return (
        f"<header><h1>{e(heading)}</h1><p class='muted'>Report written {e(now)} from "
        f"{paths}.{e(watching)} Epochs are numbered from 1, as in the training summary "
        "(metrics.tsv counts from 0).</p></header>"
    )


def _status_cell(run: Run) -> str:
    return f'<span class="status-{e(run.status)}">{e(describe.status_line(run))}</span>'


def _table(headers: Sequence[str], rows: Iterable[Sequence[str]], ident: str = "") -> str:
    """A table of cells already escaped (or built from escaped parts)."""
    head = "".join(f"<th>{e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    attribute = f' id="{e(ident)}"' if ident else ""
    return f"<table{attribute}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _header(run: Run) -> str:
    done, most = describe.progress(run)
    rows: list[tuple[str, str]] = [("status", _status_cell(run))]
    last = run.calls[-1] if run.calls else None
    by = describe.stopped_by(last) if last else None
    if by:
        rows.append(("stopped by", f"<code>{e(by)}</code>"))
    if done is not None:
        rows.append(("epochs", e(f"{done} of {most}" if most else done)))
    best = []
    for metric in run.metric_names():
        found = describe.best_metric(run, metric)
        if found is not None:
            best.append(f"{metric} {describe.format_number(found[0])} at epoch {found[1]}")
    rows.append(("best", e("; ".join(best)) if best else "<span class='empty'>none</span>"))
    rows.append(("duration", e(describe.format_duration(run.seconds()))))
    rows.append(("started", e(describe.format_time(describe.started(run)))))
    rows.append(("weights", _weights(run)))
    if run.resumes:
        rows.append(("resumed", e(", ".join(f"from {r.state}" for r in run.resumes))))
    summary = "".join(f"<tr><th>{e(k)}</th><td>{v}</td></tr>" for k, v in rows)
    return (
        f'<section id="summary"><table id="summary-table">{summary}</table>'
        f"<h3>Calls</h3>{_calls(run)}</section>"
    )


def _weights(run: Run) -> str:
    """The model checkpoints present now, best ones first, with what they were kept for."""
    folder = run.path / "checkpoints"
    try:
        tags = sorted(p.name for p in folder.iterdir() if (p / "manifest.json").is_file())
    except OSError:
        tags = []
    if not tags:
        return "<span class='empty'>no model checkpoint</span>"
    tags.sort(key=lambda tag: (not tag.startswith("best-"), tag != "last", tag))
    items = []
    for tag in tags:
        meta = _manifest_metadata(folder / tag / "manifest.json")
        note = ""
        if tag.startswith("best-") and "metric" in meta and "epoch" in meta:
            epoch = number(meta.get("epoch"))
            note = f" ({meta['metric']} {describe.format_number(meta.get('value'))}" + (
                f" at epoch {int(epoch) + 1})" if math.isfinite(epoch) else ")"
            )
        items.append(f"<li><code>{e(folder / tag)}</code>{e(note)}</li>")
    return f"<ul>{''.join(items)}</ul>"


def _manifest_metadata(path: Path) -> dict[str, Any]:
    try:
        metadata = json.loads(path.read_text(encoding="utf-8")).get("metadata")
    except (OSError, ValueError, AttributeError):
        return {}
    return metadata if isinstance(metadata, dict) else {}


def _calls(run: Run) -> str:
    rows = []
    for call in run.calls:
        metrics = call.get("metrics")
        shown = (
            ", ".join(f"{k} {describe.format_number(v)}" for k, v in metrics.items())
            if isinstance(metrics, dict)
            else ""
        )
        detail = call.get("error") or (call.get("stop") or {}).get("reason") or ""
        rows.append(
            (
                e(call.get("call", "?")),
                f'<span class="status-{e(call_status(call))}">{e(call_status(call))}</span>',
                e(describe.format_time(parse_time(call.get("started")))),
                e(detail),
                e(shown),
            )
        )
    if not rows:
        return "<p class='empty'>No call recorded.</p>"
    return _table(("call", "status", "started", "stop reason or error", "metrics"), rows)


def _comparison(runs: Sequence[Run]) -> str:
    rows = []
    for index, run in enumerate(runs):
        done, most = describe.progress(run)
        metric = describe.headline_metric(run)
        best = describe.best_metric(run, metric) if metric else None
        rows.append(
            (
                f'<span class="swatch" style="background:{color(index)}"></span>{e(run.name)}',
                _status_cell(run),
                e("-" if done is None else f"{done}/{most}" if most else done),
                e(
                    f"{metric} {describe.format_number(best[0])} at epoch {best[1]}"
                    if metric and best
                    else "-"
                ),
                e(describe.format_duration(run.seconds())),
                f"<code>{e(run.path)}</code>",
            )
        )
    return (
        '<section id="summary">'
        + _table(("run", "status", "epochs", "best", "duration", "MAPS"), rows, "runs-table")
        + "</section>"
    )


def _figure(key: str, caption: str, svg: str | None) -> str:
    inner = svg if svg is not None else f'<p class="empty">{e(_EMPTY[key])}</p>'
    return f'<figure id="fig-{e(key)}"><figcaption>{e(caption)}</figcaption>{inner}</figure>'


def _subscriber_table(run: Run) -> str:
    rows = [
        (
            f"<code>{e(r.get('id'))}</code>",
            e(r.get("event", "")),
            e(r.get("calls", "-")),
            e(describe.format_number(number(r.get("mean_seconds")) * 1e6)),
            e(describe.format_number(number(r.get("estimated_total_seconds")) * 1e3)),
        )
        for r in top_subscribers(run)
    ]
    monitor = run.monitor or {}
    totals = ""
    if monitor:
        split = phase_seconds(monitor, total=True)
        names = ("data", "compute", "validation", "checkpoints", "other")
        totals = _table(
            (*names, "total", "samples/s"),
            [
                (
                    *(e(describe.format_duration(s)) for s in split),
                    e(describe.format_duration(number(monitor.get("total_seconds")))),
                    e(describe.format_number(monitor.get("samples_per_second"))),
                )
            ],
            "time-table",
        )
    body = (
        _table(("subscriber", "event", "calls", "mean µs", "total ms"), rows, "subscriber-table")
        if rows
        else "<p class='empty'>No subscriber timings recorded.</p>"
    )
    return f'<section id="monitor"><h2>Monitor</h2>{totals}{body}</section>'


def _plan(run: Run) -> str:
    plan = run.document.get("plan")
    entries = [p for p in plan if isinstance(p, dict)] if isinstance(plan, list) else []
    rows = [
        (
            e(p.get("event", "")),
            e(p.get("position", "")),
            f"<code>{e(p.get('id', ''))}</code>",
            e(p.get("priority", "")),
            e(p.get("filter", "")),
            e(p.get("source", "")),
            e(p.get("on_error", "")),
        )
        for p in entries
    ]
    body = (
        _table(("event", "#", "subscriber", "priority", "filter", "source", "on_error"), rows)
        if rows
        else "<p class='empty'>No dispatch plan recorded.</p>"
    )
    return (
        f'<section id="plan"><h2>Dispatch plan</h2><details><summary>{len(rows)} '
        f"subscriptions, in dispatch order per event</summary>{body}</details></section>"
    )


def _settings(run: Run) -> str:
    flat = flatten(run)
    rows = [
        (f"<code>{e(name)}</code>", e(value))
        for name, value in flat.items()
        if not name.startswith(("package.", "version."))
    ]
    return f'<section id="settings"><h2>Settings</h2>{_table(("setting", "value"), rows)}</section>'


def _environment(run: Run) -> str:
    flat = flatten(run)
    versions = [
        (e(n.removeprefix("version.")), e(v)) for n, v in flat.items() if n[:8] == "version."
    ]
    environment = run.environment or {}
    for key in ("python", "platform", "executable"):
        if key in environment:
            versions.append((e(key), e(environment[key])))
    packages = [
        (e(n.removeprefix("package.")), e(v)) for n, v in flat.items() if n[:8] == "package."
    ]
    listing = (
        f"<details><summary>{len(packages)} installed packages</summary>"
        f"{_table(('package', 'version'), packages)}</details>"
        if packages
        else "<p class='empty'>No environment.json.</p>"
    )
    return (
        f'<section id="environment"><h2>Environment</h2>'
        f"{_table(('', 'version'), versions)}{listing}</section>"
    )


def _settings_diff(runs: Sequence[Run]) -> str:
    rows = differing(runs)
    if not rows:
        body = "<p class='empty'>Every recorded setting is the same in all runs.</p>"
    else:
        body = _table(
            ("setting", *(run.name for run in runs)),
            [(f"<code>{e(name)}</code>", *(e(v) for v in values)) for name, values in rows],
            "settings-diff",
        )
    return f'<section id="settings"><h2>Settings that differ</h2>{body}</section>'
