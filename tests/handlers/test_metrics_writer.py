from __future__ import annotations

import csv
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest
import torchmetrics

from trainbus import LossMetricConfig, MetricsWriterCallback, Trainer, TrainerState
from trainbus.errors import MapsError

from ..conftest import make_loader


def read_tsv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="") as stream:
        reader = csv.DictReader(stream, delimiter="\t")
        rows = list(reader)
        return list(reader.fieldnames or []), rows


def test_metrics_tsv_has_one_column_per_metric_and_one_row_per_evaluation(
    quiet_trainer: Callable[..., Trainer],
) -> None:
    trainer = quiet_trainer(
        metrics={
            "loss": LossMetricConfig(),
            "accuracy": torchmetrics.Accuracy(task="multiclass", num_classes=2),
        },
        callbacks=[MetricsWriterCallback()],
        max_epochs=3,
    )
    delivered: list[tuple[str, int, dict[str, float]]] = []

    @trainer.on("metrics_computed")
    def record(*, state: TrainerState, metrics: Mapping[str, float]) -> None:
        delivered.append((state.stage, state.global_step, dict(metrics)))

    trainer.train(make_loader(), make_loader(16))
    trainer.validate(make_loader(16, seed=1))
    trainer.test(make_loader(24, seed=2))
    columns, rows = read_tsv(trainer.maps.path / "metrics.tsv")
    assert columns == ["stage", "epoch", "global_step", "iteration", "accuracy", "loss"]
    assert [(row["stage"], row["epoch"]) for row in rows] == [
        ("validation", "0"),
        ("validation", "1"),
        ("validation", "2"),
        ("validate", ""),
        ("test", ""),
    ]
    assert [int(row["global_step"]) for row in rows] == [6, 12, 18, 18, 18]
    assert [int(row["iteration"]) for row in rows] == [6, 12, 18, 18, 18]
    for row, (stage, _, metrics) in zip(rows, delivered, strict=True):
        assert row["stage"] == stage
        assert float(row["loss"]) == metrics["loss"]
        assert float(row["accuracy"]) == metrics["accuracy"]


def test_validation_every_two_epochs_writes_a_row_every_two_epochs_and_at_the_last(
    quiet_trainer: Callable[..., Trainer],
) -> None:
    trainer = quiet_trainer(callbacks=[MetricsWriterCallback()], max_epochs=5, val_every_n_epochs=2)
    trainer.train(make_loader(16), make_loader(16))
    _, rows = read_tsv(trainer.maps.path / "metrics.tsv")
    assert [row["epoch"] for row in rows] == ["1", "3", "4"]


def test_training_loss_tsv_has_columns_and_rows_at_each_logged_loss(
    quiet_trainer: Callable[..., Trainer],
) -> None:
    trainer = quiet_trainer(
        callbacks=[MetricsWriterCallback()], log_every_n_batches=5, accumulate_grad_batches=2
    )
    logged: list[float] = []

    @trainer.on("loss_logged")
    def record(*, train_loss: float) -> None:
        logged.append(train_loss)

    trainer.train(make_loader())
    columns, rows = read_tsv(trainer.maps.path / "training_loss.tsv")
    assert columns == [
        "epoch",
        "batch",
        "iteration",
        "global_step",
        "samples_seen",
        "train_loss",
        "learning_rates",
    ]
    assert [
        (row["epoch"], row["batch"], row["iteration"], row["global_step"], row["samples_seen"])
        for row in rows
    ] == [
        ("0", "4", "5", "2", "40"),
        ("0", "5", "6", "3", "48"),
        ("1", "3", "10", "5", "80"),
        ("1", "5", "12", "6", "96"),
    ]
    assert [float(row["train_loss"]) for row in rows] == logged
    assert {row["learning_rates"] for row in rows} == {"0.05"}


def test_rows_are_on_disk_when_training_fails(quiet_trainer: Callable[..., Trainer]) -> None:
    trainer = quiet_trainer(callbacks=[MetricsWriterCallback()], max_epochs=3)

    @trainer.on("epoch_start", when=lambda s: s.current_epoch == 2)
    def explode() -> None:
        raise RuntimeError("crash in epoch 3")

    with pytest.raises(RuntimeError, match="crash in epoch 3"):
        trainer.train(make_loader(16), make_loader(16))
    _, rows = read_tsv(trainer.maps.path / "metrics.tsv")
    assert [row["epoch"] for row in rows] == ["0", "1"]


def test_a_second_trainer_with_other_metrics_cannot_mix_layouts(
    quiet_trainer: Callable[..., Trainer], maps_path: Path
) -> None:
    first = quiet_trainer(callbacks=[MetricsWriterCallback()], max_epochs=1)
    first.validate(make_loader(16))
    second = Trainer(
        first.maps,
        first.model,
        metrics={"error": LossMetricConfig()},
        callbacks=[MetricsWriterCallback()],
        default_callbacks=False,
    )
    with pytest.raises(MapsError, match=r"has columns .*'loss'\], but the row has .*'error'\]"):
        second.validate(make_loader(16))
    _, rows = read_tsv(maps_path / "metrics.tsv")
    assert len(rows) == 1


def test_reset_forgets_the_row_counts_the_maps_and_a_restored_state(
    quiet_trainer: Callable[..., Trainer],
) -> None:
    writer = MetricsWriterCallback()
    trainer = quiet_trainer(callbacks=[writer], max_epochs=1)
    trainer.train(make_loader(16), make_loader(16))
    writer.load_state_dict({"rows": {"metrics.tsv": 1}})  # a restored state no resume consumed
    fresh = MetricsWriterCallback()
    assert writer.state_dict() != fresh.state_dict()

    writer.reset()

    assert writer.state_dict() == fresh.state_dict() == {"rows": {}}
    assert vars(writer) == vars(fresh)


def test_a_writer_reset_for_a_second_trainer_counts_the_rows_of_its_own_maps(
    quiet_trainer: Callable[..., Trainer], tmp_path: Path
) -> None:
    writer = MetricsWriterCallback()
    quiet_trainer(callbacks=[writer], max_epochs=1).train(make_loader(16), make_loader(16))
    writer.load_state_dict(writer.state_dict())  # as a resume that failed before it resumed

    writer.reset()
    second = quiet_trainer(maps=tmp_path / "second", callbacks=[writer], max_epochs=2)
    second.train(make_loader(16), make_loader(16))

    _, rows = read_tsv(second.maps.path / "metrics.tsv")
    assert [row["epoch"] for row in rows] == ["0", "1"]
    assert writer.state_dict() == {"rows": {"metrics.tsv": 2, "training_loss.tsv": 2}}
