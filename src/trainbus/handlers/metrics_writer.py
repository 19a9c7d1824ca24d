"""MetricsWriterCallback: ``metrics.tsv`` (one row per evaluation) and ``training_loss.tsv``."""

from __future__ import annotations

from collections.abc import Mapping

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
    row it computed.
    """

    priority = priorities.DEFAULT
    rank_zero_only = True

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
        maps.append_row(LOSS_COLUMNS, row, TRAINING_LOSS_FILE)
