"""The summary of a ``train()`` call: what a person reads first when a run ends.

Stored in the call's record in ``maps.json`` and printed as one block on rank 0. Epochs are
numbered from 1 here, as on every line meant for people (``state.current_epoch`` counts
from 0).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from trainbus.engine.maps import CHECKPOINTS_DIR, Maps
from trainbus.engine.state import TrainerState


def train_summary(
    snapshot: TrainerState,
    maps: Maps,
    *,
    epochs_done: int,
    seconds: float,
    failed: bool,
) -> dict[str, Any]:
    """The summary of a training call as plain values, ready for ``maps.json``."""
    if failed:
        outcome = "failed"
    elif snapshot.stopped_by is None:
        outcome = "completed"
    else:
        outcome = "paused" if snapshot.stop_resumable else "stopped"
    folder = maps.file(CHECKPOINTS_DIR)
    weights = (
        {
            p.name: str(p)
            for p in sorted(folder.iterdir())
            if p.is_dir() and (p.name.startswith("best-") or p.name == "last")
        }
        if folder.is_dir()
        else {}
    )
    return {
        "outcome": outcome,
        "epochs_done": epochs_done,
        "max_epochs": snapshot.max_epochs,
        "global_step": snapshot.global_step,
        "stopped_by": snapshot.stopped_by,
        "stop_reason": snapshot.stop_reason,
        "best": {
            name: {"value": value, "epoch": snapshot.best_epochs.get(name, 0) + 1}
            for name, value in snapshot.best_metrics.items()
        },
        "last_metrics": dict(snapshot.metrics),
        "weights": weights,
        "seconds": round(seconds, 3),
    }


def format_summary(summary: Mapping[str, Any], maps: Maps) -> str:
    """The summary as the block printed at the end of ``train()``."""
    rows = [
        (
            "epochs",
            f"{summary['epochs_done']} of {summary['max_epochs']} done, "
            f"{summary['global_step']} optimizer steps",
        ),
        ("outcome", _outcome(summary)),
    ]
    if summary["best"]:
        rows.append(
            (
                "best",
                "; ".join(
                    f"{name} {_number(best['value'])} at epoch {best['epoch']}"
                    for name, best in summary["best"].items()
                ),
            )
        )
    if summary["last_metrics"]:
        rows.append(
            (
                "last metrics",
                ", ".join(f"{k} {_number(v)}" for k, v in summary["last_metrics"].items()),
            )
        )
    rows.extend((f"weights {tag}", path) for tag, path in summary["weights"].items())
    rows.append(("time", _duration(summary["seconds"])))
    width = max(len(label) for label, _ in rows)
    lines = [f"trainbus: training summary ({maps.path})"]
    lines.extend(f"  {label.ljust(width)}  {text}" for label, text in rows)
    return "\n".join(lines)


def _outcome(summary: Mapping[str, Any]) -> str:
    outcome = str(summary["outcome"])
    if summary["stopped_by"] is None:
        return outcome
    reason = summary["stop_reason"] or "no reason given"
    resume = " (resumable)" if outcome == "paused" else ""
    return f"{outcome}{resume} by {summary['stopped_by']}: {reason}"


def _number(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _duration(seconds: float) -> str:
    minutes, rest = divmod(seconds, 60)
    hours, minutes = divmod(int(minutes), 60)
    if hours:
        return f"{hours}h {minutes:02d}m {rest:02.0f}s"
    if minutes:
        return f"{minutes}m {rest:02.0f}s"
    return f"{rest:.1f}s"
