"""The monitor's table: the text :class:`~trainbus.handlers.monitor.MonitorCallback` prints.

:func:`format_report` turns the ``monitor.json`` report into a readable summary: time per phase
with its share, throughput, memory, GPU, and the subscribers that cost the most.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from trainbus.handlers.text import escape_control

TOP_SUBSCRIBERS = 10
"""Subscribers shown in the printed table (``monitor.json`` lists every one that ran)."""


def format_report(report: Mapping[str, Any], *, top: int = TOP_SUBSCRIBERS) -> str:
    """The readable summary of a :meth:`MonitorCallback.report` (what ``table=True`` prints)."""
    total = float(report["total_seconds"])
    epochs = len(report["epochs"])
    lines = [
        f"Monitor: {epochs} epoch{'s' if epochs != 1 else ''}, {report['batches']} batches, "
        f"{report['samples']} samples in {total:.3f} s"
        + (f" ({report['resumes']} resumes)" if report["resumes"] else ""),
        f"  {'phase':<22}{'seconds':>10}{'share':>9}",
    ]
    saves = int(report.get("checkpoints", 0))
    waits = report.get("checkpoint_waits", {"count": 0, "seconds": 0.0})
    waited = (
        f", {waits['count']} waited {waits['seconds']:.3f} s for the previous background write"
        if waits["count"]
        else ""
    )
    phases = (
        ("training", "train_seconds", ""),
        ("  waiting for data", "data_seconds", ""),
        ("  compute (host)", "compute_seconds", ""),
        ("validation", "validation_seconds", ""),
        ("checkpoints", "checkpoint_seconds", f"  {saves} save{'s' if saves != 1 else ''}{waited}"),
        ("other", "other_seconds", ""),
    )
    for label, key, note in phases:
        seconds = float(report[key])
        share = f"{seconds / total:.1%}" if total > 0 else "-"
        lines.append(f"  {label:<22}{seconds:>10.3f}{share:>9}{note}")
    rate = report["samples_per_second"]
    lines.append(
        f"  {'throughput':<22}"
        + (f"{rate:.1f} samples/s of training time" if rate is not None else "-")
    )
    memory = report["memory"]
    text = f"peak RSS {_size(memory['peak_rss_bytes'])}"
    if memory["rss_bytes"] is not None:
        text = f"RSS {_size(memory['rss_bytes'])}, {text}"
    if "peak_cuda_allocated_bytes" in memory:
        text += f", peak CUDA allocated {_size(memory['peak_cuda_allocated_bytes'])}"
    lines.append(f"  {'memory':<22}{text}")
    gpu = report["gpu"]
    if gpu["available"]:
        text = (
            f"{gpu['name']}: peak {_size(gpu['peak_memory_used_bytes'])} used of "
            f"{_size(gpu['memory_total_bytes'])}"
        )
        if gpu["mean_utilization_percent"] is not None:
            text += (
                f", utilisation mean {gpu['mean_utilization_percent']:.0f}% "
                f"max {gpu['max_utilization_percent']}%"
            )
        text += f" ({gpu['readings']} readings)"
    else:
        text = f"not recorded: {gpu['reason']}"
    lines.append(f"  {'gpu':<22}{text}")
    lines.extend(_subscriber_lines(report["subscribers"], top))
    return "\n".join(lines) + "\n"


def _subscriber_lines(subscribers: Mapping[str, Any], top: int) -> list[str]:
    sample_every = subscribers["sample_every"]
    rows = list(subscribers["rows"])
    if not sample_every:
        return ["  subscribers: timing off (time_subscribers=0)"]
    timed = [row for row in rows if row["estimated_total_seconds"] is not None]
    timed.sort(key=lambda row: row["estimated_total_seconds"], reverse=True)
    shown = timed[:top]
    if not shown:
        return [f"  subscribers: none ran often enough to be timed (1 dispatch in {sample_every})"]
    width = min(max(len(escape_control(str(row["id"]))) for row in shown), 60)
    lines = [
        f"  top subscribers by estimated time (1 dispatch in {sample_every} timed per event)",
        f"    {'subscriber':<{width}}  {'event':<20}{'calls':>8}{'mean ms':>11}{'total s':>10}",
    ]
    for row in shown:
        name = escape_control(str(row["id"]))
        if len(name) > width:
            name = "..." + name[-(width - 3) :]
        lines.append(
            f"    {name:<{width}}  {row['event']:<20}{row['calls']:>8}"
            f"{row['mean_seconds'] * 1000:>11.4f}{row['estimated_total_seconds']:>10.4f}"
        )
    return lines


def _size(value: float) -> str:
    amount = float(value)
    if amount < 1024:
        return f"{int(amount)} B"
    units = ("KiB", "MiB", "GiB", "TiB")
    index = 0
    amount /= 1024
    while amount >= 1024 and index < len(units) - 1:
        amount /= 1024
        index += 1
    return f"{amount:.1f} {units[index]}"
