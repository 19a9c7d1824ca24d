"""MetricsWriterCallback: ``metrics.tsv`` (one row per evaluation) and ``training_loss.tsv``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from trainbus.engine.maps import METRICS_FILE, TRAINING_LOSS_FILE, Maps
from trainbus.engine.state import TrainerState
from trainbus.events.callback import Callback
from trainbus.handlers import priorities

METRIC_COLUMNS = ("stage", "epoch", "global_step", "iteration")
LOSS_COLUMNS = (
    "epoch",
    "batch",
    "iteration",
    "global_step",
    "samples_seen",
    "train_loss",
    "learning_rates",
)


class MetricsWriterCallback(Callback):
    """Append every evaluation's metrics and every logged training loss to TSV files.

    Rows are written by rank 0 and flushed to disk as they come, so a crashed run keeps every
    row it computed. The row counts are part of the training state: a resumed run first drops
    the rows written after the state it resumes from, so no row is ever duplicated or missing.
    """

    priority = priorities.DEFAULT
    rank_zero_only = True

    def __init__(self) -> None:
        self.rows: dict[str, int] | None = None
        self._restored: dict[str, int] | None = None

    def _count(self, maps: Maps) -> dict[str, int]:
        if self.rows is None:
            self.rows = {name: maps.count_rows(name) for name in (METRICS_FILE, TRAINING_LOSS_FILE)}
        return self.rows

    def on_resume(self, *, maps: Maps) -> None:
        if self._restored is None:
            return
        for name, rows in self._restored.items():
            maps.truncate_rows(rows, name)
        self.rows, self._restored = dict(self._restored), None

    def state_dict(self) -> dict[str, Any]:
        return {"rows": self.rows}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        rows = state.get("rows")
        self._restored = None if rows is None else {str(k): int(v) for k, v in rows.items()}

    def on_metrics_computed(
        self, *, state: TrainerState, maps: Maps, metrics: Mapping[str, float]
    ) -> None:
        columns = (*METRIC_COLUMNS, *sorted(metrics))
        row = {
            "stage": state.stage,
            "epoch": state.current_epoch if state.stage == "validation" else None,
            "global_step": state.global_step,
            "iteration": state.iteration,
            **metrics,
        }
        counts = self._count(maps)
        maps.append_row(columns, row, METRICS_FILE)
        counts[METRICS_FILE] += 1

    def on_loss_logged(self, *, state: TrainerState, maps: Maps, train_loss: float) -> None:
        row = {
            "epoch": state.current_epoch,
            "batch": state.batch_idx,
            "iteration": state.iteration,
            "global_step": state.global_step,
            "samples_seen": state.samples_seen,
            "train_loss": train_loss,
            "learning_rates": ",".join(f"{rate:.6g}" for rate in state.learning_rates),
        }
        counts = self._count(maps)
        maps.append_row(LOSS_COLUMNS, row, TRAINING_LOSS_FILE)
        counts[TRAINING_LOSS_FILE] += 1
