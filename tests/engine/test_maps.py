from __future__ import annotations

import io
import json
import platform
import sys
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import pytest
import torch
import torchmetrics

import trainbus
from trainbus import (
    EarlyStoppingCallback,
    LoggerCallback,
    LossMetricConfig,
    Maps,
    MetricsWriterCallback,
    Trainer,
)
from trainbus.errors import MapsError, MapsExistsError, TrainbusWarning, UnsafePathError

from ..conftest import make_loader, make_model


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Trainer, list[float]]:
    path = tmp_path_factory.mktemp("run") / "maps"
    # make_model seeds its own weights: seed=7 covers what comes after them only.
    with pytest.warns(TrainbusWarning, match="initial weights were not seeded"):
        trainer = Trainer(
            path,
            make_model(),
            metrics={
                "loss": LossMetricConfig(),
                "accuracy": torchmetrics.Accuracy(task="multiclass", num_classes=2),
            },
            callbacks=[
                EarlyStoppingCallback("loss", patience=5),
                LoggerCallback(stream=io.StringIO()),
            ],
            default_callbacks=[MetricsWriterCallback],
            max_epochs=2,
            log_every_n_batches=4,
            accumulate_grad_batches=2,
            device="cpu",
            seed=7,
        )
    batch_losses: list[float] = []

    @trainer.on("batch_end")
    def record(*, loss: torch.Tensor) -> None:
        batch_losses.append(loss.item())

    trainer.train(make_loader(), make_loader(16))
    trainer.validate(make_loader(16))
    trainer.test(make_loader(16))
    return trainer, batch_losses


def test_maps_json_records_versions_seed_and_trainer_configuration(
    finished_run: tuple[Trainer, list[float]],
) -> None:
    trainer, _ = finished_run
    maps = trainer.maps.read_json("maps.json")
    assert maps["format"] == "trainbus-maps/1"
    assert list(maps) == [
        "format",
        "versions",
        "command",
        "seed",
        "initial_weights_seeded",
        "trainer",
        "model",
        "optimizers",
        "metrics",
        "callbacks",
        "plan",
        "plugins",
        "calls",
    ]
    assert maps["versions"] == {
        "trainbus": trainbus.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    assert maps["seed"] == 7
    assert maps["initial_weights_seeded"] is False
    assert maps["trainer"] == {
        "max_epochs": 2,
        "val_every_n_epochs": 1,
        "log_every_n_batches": 4,
        "accumulate_grad_batches": 2,
        "gradient_clip_val": None,
        "gradient_clip_algorithm": "norm",
        "device": "cpu",
        "precision": "32",
        "strategy": "ddp",
        "compile": None,
        "deterministic": False,
        "nonfinite_loss": "stop",
        "max_steps": None,
        "max_time": None,
        "limit_train_batches": 1.0,
        "limit_val_batches": 1.0,
        "val_check_interval": None,
        "validate_last_epoch": True,
        "fast_dev_run": False,
        "default_callbacks": ["MetricsWriterCallback"],
    }


def test_maps_json_records_model_optimizers_and_metrics(
    finished_run: tuple[Trainer, list[float]],
) -> None:
    trainer, _ = finished_run
    maps = trainer.maps.read_json("maps.json")
    assert maps["model"]["class"] == "trainbus.engine.model.SupervisedModel"
    assert maps["model"]["parameters"] == 4 * 8 + 8 + 8 * 2 + 2
    assert maps["model"]["trainable_parameters"] == maps["model"]["parameters"]
    assert "Linear(in_features=4, out_features=8" in maps["model"]["structure"]
    assert len(maps["optimizers"]) == 1
    assert maps["optimizers"][0]["class"] == "SGD"
    assert maps["optimizers"][0]["defaults"]["lr"] == 0.05
    assert maps["metrics"]["loss"]["higher_is_better"] is False
    assert maps["metrics"]["accuracy"]["higher_is_better"] is True


def test_maps_json_records_callbacks_and_the_dispatch_plan(
    finished_run: tuple[Trainer, list[float]],
) -> None:
    trainer, _ = finished_run
    maps = trainer.maps.read_json("maps.json")
    callbacks = {entry["id"]: entry for entry in maps["callbacks"]}
    assert set(callbacks) == {"MetricsWriterCallback", "EarlyStoppingCallback", "LoggerCallback"}
    early = callbacks["EarlyStoppingCallback"]
    assert early["class"] == "trainbus.handlers.early_stopping.EarlyStoppingCallback"
    assert early["source"] == "builtin"
    assert early["config"]["metric"] == "loss"
    assert early["config"]["patience"] == 5
    assert early["config"]["mode"] == "min"
    assert maps["plan"] == trainer.plan()
    validation_end = [row["id"] for row in maps["plan"] if row["event"] == "validation_end"]
    assert "EarlyStoppingCallback.on_validation_end" in validation_end
    user_rows = [row for row in maps["plan"] if row["event"] == "batch_end"]
    assert [row["source"] for row in user_rows] == ["user"]


def test_maps_json_records_every_call_with_its_outcome(
    finished_run: tuple[Trainer, list[float]],
) -> None:
    trainer, _ = finished_run
    calls = trainer.maps.read_json("maps.json")["calls"]
    assert [call["call"] for call in calls] == ["train", "validate", "test"]
    assert all(call["status"] == "completed" for call in calls)
    train = calls[0]
    assert (train["epochs"], train["global_step"], train["iteration"]) == (2, 6, 12)
    assert set(train["metrics"]) == {"loss", "accuracy"}
    assert train["best_epochs"]["loss"] in (0, 1)
    assert train["handler_failures"] == []
    assert train["started"] <= train["finished"]


def test_environment_json_lists_installed_packages(
    finished_run: tuple[Trainer, list[float]],
) -> None:
    trainer, _ = finished_run
    environment = trainer.maps.read_json("environment.json")
    assert environment["python"] == sys.version
    assert environment["packages"]["torch"] == metadata.version("torch")
    assert environment["packages"]["blinker"] == metadata.version("blinker")
    assert len(environment["packages"]) >= 8


def test_metrics_tsv_has_one_row_per_validation_and_per_validate_or_test(
    finished_run: tuple[Trainer, list[float]],
) -> None:
    trainer, _ = finished_run
    rows = trainer.maps.read_rows("metrics.tsv")
    assert [(row["stage"], row["epoch"]) for row in rows] == [
        ("validation", "0"),
        ("validation", "1"),
        ("validate", ""),
        ("test", ""),
    ]


def test_training_loss_tsv_has_rows_at_log_intervals_and_epoch_ends(
    finished_run: tuple[Trainer, list[float]],
) -> None:
    trainer, batch_losses = finished_run
    rows = trainer.maps.read_rows("training_loss.tsv")
    assert [(row["epoch"], row["batch"], row["iteration"]) for row in rows] == [
        ("0", "3", "4"),
        ("0", "5", "6"),
        ("1", "1", "8"),
        ("1", "5", "12"),
    ]
    intervals = [(0, 4), (4, 6), (6, 8), (8, 12)]
    expected = [sum(batch_losses[a:b]) / (b - a) for a, b in intervals]
    assert [float(row["train_loss"]) for row in rows] == pytest.approx(expected, rel=1e-5)


def test_log_file_lines_are_valid_json(finished_run: tuple[Trainer, list[float]]) -> None:
    trainer, _ = finished_run
    lines = trainer.maps.file("logs", "train.jsonl").read_text().splitlines()
    entries = [json.loads(line) for line in lines]
    assert len(entries) >= 8
    assert all(isinstance(entry, dict) and "event" in entry for entry in entries)


@pytest.mark.parametrize(
    "name",
    ["..", ".", "", "/abs", "a/b", "a\\b", "tab\tname", "new\nline", "nul\x00", "bell\x07"],
)
def test_file_refuses_names_that_are_not_one_safe_component(tmp_path: Path, name: str) -> None:
    maps = Maps(tmp_path / "maps")
    with pytest.raises(UnsafePathError, match=r"cannot be written into a MAPS: it must be one"):
        maps.file(name)
    with pytest.raises(UnsafePathError, match=r"cannot be written into a MAPS"):
        maps.file("logs", name)
    with pytest.raises(UnsafePathError):
        maps.write_bytes(b"x", name)
    assert not (tmp_path / "maps").exists()
    assert sorted(tmp_path.iterdir()) == []


def test_file_joins_safe_components_inside_the_directory(tmp_path: Path) -> None:
    maps = Maps(tmp_path / "maps")
    assert maps.file("logs", "train.jsonl") == (tmp_path / "maps" / "logs" / "train.jsonl")
    assert maps.file("..hidden") == tmp_path / "maps" / "..hidden"


def test_write_bytes_replaces_atomically_without_leftovers(tmp_path: Path) -> None:
    maps = Maps(tmp_path / "maps")
    maps.create()
    target = maps.write_bytes(b"first", "notes.txt")
    maps.write_bytes(b"second", "notes.txt")
    assert target.read_bytes() == b"second"
    assert sorted(p.name for p in target.parent.iterdir()) == sorted(
        ["notes.txt", "logs", "checkpoints"]
    )


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    maps = Maps(tmp_path / "maps")
    maps.create()
    target = maps.write_bytes(b"intact", "notes.txt")
    with pytest.raises(TypeError):
        maps.write_bytes("not bytes", "notes.txt")  # type: ignore[arg-type]
    assert target.read_bytes() == b"intact"
    assert sorted(p.name for p in maps.path.iterdir()) == ["checkpoints", "logs", "notes.txt"]


def test_append_row_refuses_a_different_layout(tmp_path: Path) -> None:
    maps = Maps(tmp_path / "maps")
    maps.create()
    maps.append_row(["a", "b"], {"a": 1, "b": 0.5}, "table.tsv")
    maps.append_row(["a", "b"], {"a": 2, "b": float("nan")}, "table.tsv")
    with pytest.raises(MapsError, match=r"has columns \['a', 'b'\], but the row has \['a', 'c'\]"):
        maps.append_row(["a", "c"], {"a": 3}, "table.tsv")
    assert maps.read_rows("table.tsv") == [{"a": "1", "b": "0.5"}, {"a": "2", "b": "nan"}]


def test_an_existing_non_empty_directory_is_refused_and_left_untouched(tmp_path: Path) -> None:
    path = tmp_path / "maps"
    path.mkdir()
    (path / "results.csv").write_text("precious")
    with pytest.raises(
        MapsExistsError,
        match=r"MAPS directory '.*maps' already exists and is not empty; choose a new "
        r"directory, or pass overwrite=True to replace it",
    ):
        Trainer(path, make_model())
    assert sorted(p.name for p in path.iterdir()) == ["results.csv"]
    assert (path / "results.csv").read_text() == "precious"


def test_a_maps_path_that_is_a_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "maps"
    path.write_text("a file")
    with pytest.raises(MapsExistsError, match=r"exists and is not a directory"):
        Trainer(path, make_model(), overwrite=True)
    assert path.read_text() == "a file"


def test_an_existing_empty_directory_is_used(quiet_trainer: Callable[..., Trainer]) -> None:
    trainer = quiet_trainer(max_epochs=1)
    trainer.maps.path.mkdir()
    trainer.train(make_loader())
    assert (trainer.maps.path / "maps.json").is_file()


def test_the_directory_is_created_by_the_first_call_not_by_construction(
    quiet_trainer: Callable[..., Trainer], maps_path: Path
) -> None:
    trainer = quiet_trainer(max_epochs=1)
    assert not maps_path.exists()
    assert not trainer.maps.created
    trainer.validate(make_loader(16))
    assert trainer.maps.created
    assert sorted(p.name for p in maps_path.iterdir()) == [
        ".lock",
        "checkpoints",
        "environment.json",
        "logs",
        "maps.json",
    ]


def test_overwrite_replaces_a_previous_trainbus_maps(tmp_path: Path) -> None:
    path = tmp_path / "maps"
    Trainer(path, make_model(), default_callbacks=False, max_epochs=1).train(make_loader())
    (path / "stale.txt").write_text("from the old run")
    # An existing MAPS may be resumed, so the Trainer is built; the first call refuses it.
    again = Trainer(path, make_model(), default_callbacks=False, max_epochs=1)
    with pytest.raises(MapsExistsError, match=r"overwrite=True .*resume=True"):
        again.train(make_loader())
    assert (path / "stale.txt").read_text() == "from the old run"
    trainer = Trainer(path, make_model(), default_callbacks=False, max_epochs=1, overwrite=True)
    assert (path / "stale.txt").exists()
    trainer.train(make_loader())
    assert not (path / "stale.txt").exists()
    assert len(trainer.maps.read_json("maps.json")["calls"]) == 1


def test_overwrite_refuses_a_non_empty_directory_without_maps_json(tmp_path: Path) -> None:
    path = tmp_path / "home"
    path.mkdir()
    (path / "thesis.tex").write_text("years of work")
    with pytest.raises(
        MapsExistsError,
        match=r"is not empty and holds no maps\.json, so it is not a trainbus MAPS; refusing "
        r"to delete it even with overwrite=True\. Choose another path\.",
    ):
        Trainer(path, make_model(), overwrite=True)
    assert (path / "thesis.tex").read_text() == "years of work"


HOLDER = """
import sys, time
from trainbus import Maps
maps = Maps(sys.argv[1])
maps.adopt()
maps.lock()
print("locked", flush=True)
time.sleep(120)
"""


@pytest.mark.fault(
    "A second run (resume or overwrite) on a MAPS in use; then its owner SIGKILLed",
    outcome=(
        "refused naming the owner, nothing written; the dead owner's lock taken over and recorded"
    ),
)
def test_a_maps_in_use_is_refused_naming_its_owner_and_a_killed_owner_is_recovered(
    maps_path: Path,
) -> None:
    import signal
    import subprocess
    import sys

    from trainbus import TrainingCheckpointCallback
    from trainbus.errors import MapsLockedError

    first = Trainer(
        maps_path, make_model(), callbacks=[TrainingCheckpointCallback()], default_callbacks=False
    )
    first.max_epochs = 1
    first.train(make_loader())
    assert "recovered_lock" not in first.maps.read_json("maps.json")["calls"][-1]  # released
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(maps_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        before = (maps_path / "maps.json").read_text()
        resumed = Trainer.from_maps(
            maps_path, make_model(), callbacks=[TrainingCheckpointCallback()], max_epochs=2
        )
        with pytest.raises(MapsLockedError, match=rf"in use by process {holder.pid} on "):
            resumed.train(make_loader())
        replacing = Trainer(maps_path, make_model(), default_callbacks=False, overwrite=True)
        with pytest.raises(MapsLockedError, match="in use by process"):
            replacing.train(make_loader())
        assert (maps_path / "maps.json").read_text() == before  # nothing written, nothing lost
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    again = Trainer.from_maps(
        maps_path, make_model(), callbacks=[TrainingCheckpointCallback()], max_epochs=2
    )
    state = again.train(make_loader())
    assert state.global_step == 12
    record = again.maps.read_json("maps.json")["calls"][-1]
    assert record["recovered_lock"]["pid"] == holder.pid
