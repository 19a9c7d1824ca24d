from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from trainbus import MonitorCallback, Stop, Trainer

from ..conftest import make_loader


def test_monitor_json_has_per_epoch_time_samples_and_memory(
    quiet_trainer: Callable[..., Trainer],
) -> None:
    monitor = MonitorCallback()
    trainer = quiet_trainer(device="cpu", callbacks=[monitor], max_epochs=3)
    trainer.train(make_loader(), make_loader(16))
    report = json.loads((trainer.maps.path / "monitor.json").read_text())
    epochs = report["epochs"]
    assert [entry["epoch"] for entry in epochs] == [0, 1, 2]
    for entry in epochs:
        assert entry["samples"] == 48
        assert entry["train_seconds"] > 0
        assert entry["validation_seconds"] > 0
        assert entry["samples_per_second"] == pytest.approx(48 / entry["train_seconds"], rel=1e-3)
        assert entry["peak_rss_bytes"] > 10 * 2**20
        assert "peak_cuda_allocated_bytes" not in entry
    assert report["samples"] == 144
    assert report["train_seconds"] == round(sum(e["train_seconds"] for e in epochs), 6)
    assert report["total_seconds"] >= report["train_seconds"] + report["validation_seconds"]
    assert report["samples_per_second"] > 0
    assert monitor.epochs == epochs


def test_monitor_counts_only_the_samples_of_a_cut_epoch(
    quiet_trainer: Callable[..., Trainer],
) -> None:
    trainer = quiet_trainer(device="cpu", callbacks=[MonitorCallback()], max_epochs=3)

    @trainer.on("batch_end", when=lambda s: s.iteration == 9)
    def stop() -> Stop:
        return Stop("enough")

    trainer.train(make_loader(), make_loader(16))
    report = json.loads((trainer.maps.path / "monitor.json").read_text())
    assert [entry["samples"] for entry in report["epochs"]] == [48, 24]
    assert report["epochs"][1]["validation_seconds"] == 0
    assert report["samples"] == 72


def test_monitor_config_is_empty_in_maps_json(quiet_trainer: Callable[..., Trainer]) -> None:
    trainer = quiet_trainer(device="cpu", callbacks=[MonitorCallback()], max_epochs=1)
    trainer.train(make_loader(16))
    maps = json.loads((trainer.maps.path / "maps.json").read_text())
    assert maps["callbacks"] == [
        {
            "id": "MonitorCallback",
            "class": "trainbus.handlers.monitor.MonitorCallback",
            "source": "builtin",
            "config": {},
        }
    ]
