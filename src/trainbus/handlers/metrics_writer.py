"""MetricsWriterCallback: ``metrics.tsv`` (one row per evaluation) and ``training_loss.tsv``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from trainbus.engine.maps import METRICS_FILE, TRAINING_LOSS_FILE, Maps, sync_file
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
    the training rows (validation metrics, training losses) written after the state it resumes
    from, as it writes them again, so no row is ever duplicated or missing. Rows of
    ``validate()`` and ``test()`` calls are never dropped.
    """

    priority = priorities.DEFAULT
    rank_zero_only = True

    def __init__(self) -> None:
        self._clear_run()

    def _clear_run(self) -> None:
        """The state before a run: no rows counted, nothing restored, no MAPS written to."""
        self.rows: dict[str, int] = {}
        self._restored: dict[str, int] | None = None
        self._maps: Maps | None = None

    def reset(self) -> None:
        """Forget the earlier run's row counts and MAPS; ``train_start`` counts the new one's."""
        self._clear_run()

    def on_train_start(self, *, maps: Maps) -> None:
        if self._restored is None:
            self.rows = {name: maps.count_rows(name) for name in (METRICS_FILE, TRAINING_LOSS_FILE)}

    def on_resume(self, *, maps: Maps) -> None:
        if self._restored is None:
            return
        maps.drop_rows(self._restored.get(METRICS_FILE, 0), METRICS_FILE, when=_from_training)
        maps.drop_rows(self._restored.get(TRAINING_LOSS_FILE, 0), TRAINING_LOSS_FILE)
        self.rows = {name: maps.count_rows(name) for name in (METRICS_FILE, TRAINING_LOSS_FILE)}
        self._restored = None

    def state_dict(self) -> dict[str, Any]:
        if self._maps is not None:
            sync_file(self._maps.file(TRAINING_LOSS_FILE))
        return {"rows": dict(self.rows)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        rows = state.get("rows") or {}
        self._restored = {str(k): int(v) for k, v in rows.items()}

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
        maps.append_row(columns, row, METRICS_FILE)
        self.rows[METRICS_FILE] = self.rows.get(METRICS_FILE, 0) + 1

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
        # Not fsynced here (~0.5 ms every few batches): a killed process keeps the row anyway
        # (the kernel has it), and state_dict makes the rows durable before a training state
        # counts them.
        maps.append_row(LOSS_COLUMNS, row, TRAINING_LOSS_FILE, durable=False)
        self._maps = maps
        self.rows[TRAINING_LOSS_FILE] = self.rows.get(TRAINING_LOSS_FILE, 0) + 1


def _from_training(row: Mapping[str, str]) -> bool:
    return row.get("stage") == "validation"
