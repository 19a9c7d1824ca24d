from __future__ import annotations

import io
import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from trainbus import (
    EarlyStoppingCallback,
    LoggerCallback,
    ModelCheckpointCallback,
    MonitorCallback,
    SaveCheckpoint,
    Stop,
    Trainer,
    TrainerState,
    TrainingCheckpointCallback,
)
from trainbus.errors import ConfigurationError, ConfigurationTypeError
from trainbus.events.bus import EventBus
from trainbus.handlers import priorities

from ..conftest import make_loader, make_model
from .test_gpu import FakeNvml, GiB

NOTICE = "MonitorCallback: no GPU statistics: "


def report_of(trainer: Trainer) -> dict[str, Any]:
    report: dict[str, Any] = json.loads((trainer.maps.path / "monitor.json").read_text())
    return report


def row_of(report: dict[str, Any], subscriber: str) -> dict[str, Any]:
    rows = [row for row in report["subscribers"]["rows"] if row["id"] == subscriber]
    assert len(rows) == 1, [row["id"] for row in report["subscribers"]["rows"]]
    row: dict[str, Any] = rows[0]
    return row


def assert_plausible_epoch(entry: dict[str, Any]) -> None:
    for key in (
        "train_seconds",
        "validation_seconds",
        "data_seconds",
        "compute_seconds",
        "checkpoint_seconds",
    ):
        assert entry[key] >= 0, key
    # Saves are their own part, outside training: data and compute are training's.
    assert entry["data_seconds"] + entry["compute_seconds"] <= entry["train_seconds"] + 1e-5
    assert entry["checkpoints"] >= 0
    assert (entry["checkpoint_seconds"] > 0) == (entry["checkpoints"] > 0)
    assert entry["samples_per_second"] > 0


class SlowLoader:
    """Real batches, each delayed the way a slow data source would delay it."""

    def __init__(self, delay: float) -> None:
        self.loader = make_loader()
        self.delay = delay

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Any]:
        for batch in self.loader:
            time.sleep(self.delay)
            yield batch


class JobKilledError(Exception):
    """Raised in the middle of training to stand for a killed job."""


# ---------------------------------------------------------------- time and memory


def test_monitor_json_has_per_epoch_time_samples_and_memory(
    quiet_trainer: Callable[..., Trainer],
) -> None:
    monitor = MonitorCallback(table=False)
    trainer = quiet_trainer(device="cpu", callbacks=[monitor], max_epochs=3)
    trainer.train(make_loader(), make_loader(16))
    report = report_of(trainer)
    epochs = report["epochs"]
    assert [entry["epoch"] for entry in epochs] == [0, 1, 2]
    for entry in epochs:
        assert entry["samples"] == 48
        assert entry["batches"] == 6
        assert entry["train_seconds"] > 0
        assert entry["validation_seconds"] > 0
        assert entry["compute_seconds"] > 0
        assert entry["checkpoint_seconds"] == 0
        assert entry["samples_per_second"] == pytest.approx(48 / entry["train_seconds"], rel=1e-3)
        assert entry["rss_bytes"] > 10 * 2**20
        assert entry["peak_rss_bytes"] >= entry["rss_bytes"]
        assert entry["resumed"] is False
        assert entry["gpu"] is None
        assert "peak_cuda_allocated_bytes" not in entry
        assert_plausible_epoch(entry)
    assert report["samples"] == 144
    assert report["batches"] == 18
    assert report["resumes"] == 0
    assert report["train_seconds"] == round(sum(e["train_seconds"] for e in epochs), 6)
    assert report["data_seconds"] == round(sum(e["data_seconds"] for e in epochs), 6)
    assert report["compute_seconds"] == round(sum(e["compute_seconds"] for e in epochs), 6)
    assert report["total_seconds"] >= report["train_seconds"] + report["validation_seconds"]
    assert report["other_seconds"] == pytest.approx(
        report["total_seconds"] - report["train_seconds"] - report["validation_seconds"],
        abs=1e-5,
    )
    assert report["samples_per_second"] > 0
    assert report["memory"]["peak_rss_bytes"] >= max(e["peak_rss_bytes"] for e in epochs)
    assert report["memory"]["rss_bytes"] > 10 * 2**20
    assert "peak_cuda_allocated_bytes" not in report["memory"]
    assert monitor.epochs == epochs


def test_monitor_counts_only_the_samples_of_a_cut_epoch(
    quiet_trainer: Callable[..., Trainer],
) -> None:
    trainer = quiet_trainer(device="cpu", callbacks=[MonitorCallback(table=False)], max_epochs=3)

    @trainer.on("batch_end", when=lambda s: s.iteration == 9)
    def stop() -> Stop:
        return Stop("enough")

    trainer.train(make_loader(), make_loader(16))
    report = report_of(trainer)
    assert [entry["samples"] for entry in report["epochs"]] == [48, 24]
    assert [entry["batches"] for entry in report["epochs"]] == [6, 3]
    assert report["epochs"][1]["validation_seconds"] == 0
    assert report["samples"] == 72


def test_waiting_for_data_and_compute_are_told_apart(
    quiet_trainer: Callable[..., Trainer],
) -> None:
    trainer = quiet_trainer(device="cpu", callbacks=[MonitorCallback(table=False)], max_epochs=1)

    @trainer.on("forward_start")
    def busy() -> None:
        time.sleep(0.005)

    trainer.train(SlowLoader(delay=0.03))
    (entry,) = report_of(trainer)["epochs"]
    assert entry["data_seconds"] >= 0.99 * 6 * 0.03
    assert entry["compute_seconds"] >= 0.99 * 6 * 0.005
    assert entry["compute_seconds"] < entry["data_seconds"]
    assert_plausible_epoch(entry)


def test_checkpoint_writes_between_batches_are_not_waiting_for_data(
    quiet_trainer: Callable[..., Trainer],
) -> None:
    trainer = quiet_trainer(
        device="cpu",
        callbacks=[MonitorCallback(table=False), TrainingCheckpointCallback(every_n_steps=2)],
        max_epochs=1,
    )
    saves: list[float] = []

    @trainer.on("checkpoint")
    def saved(*, kind: str) -> None:
        if kind == "training":
            saves.append(time.perf_counter())

    trainer.train(make_loader())
    (entry,) = report_of(trainer)["epochs"]
    assert len(saves) >= 3
    assert entry["checkpoint_seconds"] > 0
    assert_plausible_epoch(entry)


def test_every_save_is_counted_with_its_time(quiet_trainer: Callable[..., Trainer]) -> None:
    stream = io.StringIO()
    trainer = quiet_trainer(
        device="cpu",
        callbacks=[
            MonitorCallback(stream=stream),
            ModelCheckpointCallback("loss"),  # at epoch ends
            TrainingCheckpointCallback(every_n_steps=4),  # between batches and at epoch ends
            # Asked at validation_end, written at the epoch's end.
            EarlyStoppingCallback("loss", restore_best_weights=True),
        ],
        max_epochs=2,
    )
    trainer.on("train_start")(lambda: SaveCheckpoint("at-start"))
    trainer.on("train_end")(lambda: SaveCheckpoint("at-end"))
    where: list[str] = []
    phase = ["start"]
    trainer.on("epoch_start")(lambda *, state: phase.__setitem__(0, str(state.current_epoch)))
    trainer.on("train_end", priority=100)(lambda: phase.__setitem__(0, "end"))
    pause = 0.01

    @trainer.on("checkpoint", priority=100)
    def slow_write() -> None:
        # Before the monitor's own handler: as if every write took this much longer.
        where.append(phase[0])
        time.sleep(pause)

    trainer.train(make_loader(), make_loader(16))
    report = report_of(trainer)
    assert report["checkpoints"] == len(where) > 8
    assert report["checkpoint_seconds"] >= 0.99 * pause * len(where)
    for index, entry in enumerate(report["epochs"]):
        assert entry["checkpoints"] == where.count(str(index)) >= 3
        assert entry["checkpoint_seconds"] >= 0.99 * pause * entry["checkpoints"]
        assert_plausible_epoch(entry)
    assert where.count("start") == where.count("end") == 1
    parts = ("train_seconds", "validation_seconds", "checkpoint_seconds", "other_seconds")
    assert sum(report[key] for key in parts) == pytest.approx(report["total_seconds"], abs=1e-5)
    (line,) = [line for line in stream.getvalue().splitlines() if "checkpoints" in line]
    assert float(line.split()[1]) == pytest.approx(report["checkpoint_seconds"], abs=1e-3)
    assert line.endswith(f"  {len(where)} saves")


@pytest.mark.parametrize(
    ("options", "config"),
    [
        ({}, {"time_subscribers": 10, "gpu": None, "table": True}),
        ({"time_subscribers": 0}, {"time_subscribers": 0, "gpu": None, "table": True}),
        ({"time_subscribers": None}, {"time_subscribers": 0, "gpu": None, "table": True}),
        ({"gpu": True, "table": False}, {"time_subscribers": 10, "gpu": True, "table": False}),
        ({"gpu": False}, {"time_subscribers": 10, "gpu": False, "table": True}),
    ],
)
def test_monitor_config_in_maps_json(
    quiet_trainer: Callable[..., Trainer],
    monkeypatch: pytest.MonkeyPatch,
    options: dict[str, Any],
    config: dict[str, Any],
) -> None:
    FakeNvml().install(monkeypatch)
    trainer = quiet_trainer(
        device="cpu", callbacks=[MonitorCallback(stream=io.StringIO(), **options)], max_epochs=1
    )
    trainer.train(make_loader(16))
    maps = json.loads((trainer.maps.path / "maps.json").read_text())
    assert maps["callbacks"] == [
        {
            "id": "MonitorCallback",
            "class": "trainbus.handlers.monitor.MonitorCallback",
            "source": "builtin",
            "config": config,
        }
    ]


def test_monitor_handlers_keep_the_framing_priorities(
    quiet_trainer: Callable[..., Trainer],
) -> None:
    trainer = quiet_trainer(callbacks=[MonitorCallback()])
    framing = priorities.framing(priorities.MONITOR_FIRST, priorities.MONITOR_LAST)
    rows = [row for row in trainer.plan() if row["owner"] == "MonitorCallback"]
    assert {row["event"] for row in rows} >= {
        "train_start",
        "epoch_start",
        "batch_start",
        "batch_end",
        "loss_logged",
        "checkpoint",
        "epoch_end",
        "train_end",
        "teardown",
    }
    for row in rows:
        assert row["priority"] == framing.get(row["event"], priorities.DEFAULT), row
        assert row["rank_zero_only"] is True


# -------------------------------------------------------------------- subscribers


@pytest.mark.parametrize(
    ("time_subscribers", "sample_every", "timed"),
    [(10, 10, 1), (5, 5, 2), (1, 1, 12), (0, 0, 0), (None, 0, 0)],
)
def test_subscriber_calls_and_sampled_time(
    quiet_trainer: Callable[..., Trainer],
    time_subscribers: int | None,
    sample_every: int,
    timed: int,
) -> None:
    logger = LoggerCallback(stream=io.StringIO(), progress_bar=True)
    monitor = MonitorCallback(time_subscribers=time_subscribers, table=False)
    trainer = quiet_trainer(device="cpu", callbacks=[logger, monitor])
    trainer.train(make_loader(), make_loader(16))
    report = report_of(trainer)
    assert report["subscribers"]["sample_every"] == sample_every
    for subscriber in ("LoggerCallback.on_batch_end", "MonitorCallback.on_batch_start"):
        row = row_of(report, subscriber)
        assert row["calls"] == 12
        assert row["timed_calls"] == timed
        if timed:
            assert row["mean_seconds"] > 0
            assert row["estimated_total_seconds"] == pytest.approx(
                row["mean_seconds"] * 12, rel=1e-3, abs=1e-6
            )
        else:
            assert row["mean_seconds"] is None
            assert row["estimated_total_seconds"] is None
    assert row_of(report, "LoggerCallback.on_epoch_end")["calls"] == 2
    ids = {row["id"] for row in report["subscribers"]["rows"]}
    assert "LoggerCallback.on_test_start" not in ids  # subscribed, never called: not listed


def test_subscriber_timing_is_switched_off_at_teardown(
    quiet_trainer: Callable[..., Trainer],
) -> None:
    trainer = quiet_trainer(
        device="cpu", callbacks=[MonitorCallback(time_subscribers=1, table=False)], max_epochs=1
    )

    @trainer.on("evaluation_step_end", id="evaluated")
    def evaluated() -> None:
        pass

    trainer.train(make_loader(16), make_loader(16))
    (subscription,) = [s for s in trainer.bus.subscriptions() if s.id == "evaluated"]
    assert (subscription.calls, subscription.timed_calls) == (2, 2)
    trainer.validate(make_loader(16))
    assert (subscription.calls, subscription.timed_calls) == (4, 2)
    assert row_of(report_of(trainer), "evaluated")["timed_calls"] == 2


def test_subscriber_calls_made_before_train_are_not_counted(
    quiet_trainer: Callable[..., Trainer],
) -> None:
    trainer = quiet_trainer(device="cpu", callbacks=[MonitorCallback(table=False)], max_epochs=1)

    @trainer.on("evaluation_step_end", id="evaluated")
    def evaluated() -> None:
        pass

    trainer.validate(make_loader(16))
    trainer.train(make_loader(16), make_loader(32))
    assert row_of(report_of(trainer), "evaluated")["calls"] == 4


@pytest.mark.parametrize("table", [True, False])
def test_table_shows_phases_memory_and_the_slowest_subscriber_first(
    quiet_trainer: Callable[..., Trainer], table: bool
) -> None:
    stream = io.StringIO()
    monitor = MonitorCallback(time_subscribers=1, table=table, stream=stream)
    trainer = quiet_trainer(device="cpu", callbacks=[monitor])

    @trainer.on("batch_end", id="slow_handler")
    def slow_handler() -> None:
        time.sleep(0.003)

    trainer.train(make_loader(), make_loader(16))
    report = report_of(trainer)
    assert row_of(report, "slow_handler")["estimated_total_seconds"] >= 0.99 * 12 * 0.003
    text = stream.getvalue()
    if not table:
        assert text == ""
        return
    lines = text.splitlines()
    assert lines[0].startswith("Monitor: 2 epochs, 12 batches, 96 samples in ")
    labels = [line[2:24].strip() for line in lines[2:8]]
    assert labels == [
        "training",
        "waiting for data",
        "compute (host)",
        "validation",
        "checkpoints",
        "other",
    ]
    assert lines[6].endswith("  0 saves")
    train_line = lines[2].split()
    assert float(train_line[1]) == pytest.approx(report["train_seconds"], abs=1e-3)
    assert "samples/s of training time" in text
    assert "RSS " in text and "MiB" in text
    assert "not recorded: the model's parameters are not on a CUDA device" in text
    header = lines.index("  top subscribers by estimated time (1 dispatch in 1 timed per event)")
    first_row = lines[header + 2].split()
    assert first_row[:3] == ["slow_handler", "batch_end", "12"]
    assert NOTICE not in text


# ----------------------------------------------------------------------------- gpu


@pytest.mark.parametrize(
    ("log_every_n_batches", "readings"),
    [(2, 8), (50, 4), (1, 14)],
)
def test_gpu_is_read_at_log_intervals_and_epoch_ends_only(
    quiet_trainer: Callable[..., Trainer],
    monkeypatch: pytest.MonkeyPatch,
    log_every_n_batches: int,
    readings: int,
) -> None:
    fake = FakeNvml().install(monkeypatch)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,1")
    stream = io.StringIO()
    trainer = quiet_trainer(
        device="cpu",
        callbacks=[MonitorCallback(gpu=True, stream=stream)],
        log_every_n_batches=log_every_n_batches,
    )
    inits_during_training: list[int] = []

    @trainer.on("batch_end")
    def count_inits() -> None:
        inits_during_training.append(fake.count("nvmlInit") - fake.count("nvmlShutdown"))

    trainer.train(make_loader(), make_loader(16))
    gpu = report_of(trainer)["gpu"]
    used = [fake.used[i % 3] for i in range(readings)]
    rates = [fake.utilization[i % 3] for i in range(readings)]
    assert gpu == {
        "available": True,
        "device": 3,
        "name": "Fake H100",
        "readings": readings,
        "utilization_readings": readings,
        "peak_memory_used_bytes": max(used),
        "memory_total_bytes": 16 * GiB,
        "mean_utilization_percent": pytest.approx(sum(rates) / readings),
        "max_utilization_percent": max(rates),
    }
    epochs = report_of(trainer)["epochs"]
    assert [entry["gpu"]["readings"] for entry in epochs] == [readings // 2] * 2
    assert fake.count("nvmlDeviceGetMemoryInfo") == readings
    assert fake.arguments("nvmlDeviceGetHandleByIndex") == [(3,)]
    assert inits_during_training == [1] * 12
    assert (fake.count("nvmlInit"), fake.count("nvmlShutdown")) == (1, 1)
    text = stream.getvalue()
    assert NOTICE not in text
    mean = gpu["mean_utilization_percent"]
    assert f"Fake H100: peak 3.0 GiB used of 16.0 GiB, utilisation mean {mean:.0f}%" in text


@pytest.mark.parametrize(
    ("fail", "reason", "memory_reads", "shutdowns"),
    [
        (
            {"nvmlInit": 0},
            "NVML cannot be initialised (FakeNVMLError: Driver Not Loaded)",
            0,
            0,
        ),
        ({"nvmlDeviceGetHandleByIndex": 0}, "NVML has no device 0 (FakeNVMLError", 0, 1),
        (
            {"nvmlDeviceGetMemoryInfo": 1},
            "reading the memory of GPU 0 failed (FakeNVMLError",
            2,
            1,
        ),
        (None, "pynvml cannot be imported", 0, 0),
    ],
    ids=["init", "device", "read", "not-installed"],
)
def test_absent_nvml_degrades_with_exactly_one_notice(
    quiet_trainer: Callable[..., Trainer],
    monkeypatch: pytest.MonkeyPatch,
    fail: dict[str, int] | None,
    reason: str,
    memory_reads: int,
    shutdowns: int,
) -> None:
    fake = FakeNvml(fail=fail)
    if fail is None:
        monkeypatch.setitem(sys.modules, "pynvml", None)
    else:
        fake.install(monkeypatch)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    stream = io.StringIO()
    trainer = quiet_trainer(
        device="cpu",
        callbacks=[MonitorCallback(gpu=True, table=False, stream=stream)],
        log_every_n_batches=2,
    )
    final = trainer.train(make_loader(), make_loader(16))
    assert final.current_epoch == 1
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(NOTICE)
    assert reason in lines[0]
    assert lines[0].endswith("; training goes on without them")
    gpu = report_of(trainer)["gpu"]
    assert gpu["available"] is False
    assert reason in gpu["reason"]
    assert fake.count("nvmlDeviceGetMemoryInfo") == memory_reads
    assert fake.count("nvmlShutdown") == shutdowns


@pytest.mark.parametrize(
    ("gpu", "reason"),
    [
        (None, "the model's parameters are not on a CUDA device"),
        (False, "GPU statistics are switched off (gpu=False)"),
    ],
)
def test_no_nvml_call_and_no_notice_unless_asked(
    quiet_trainer: Callable[..., Trainer],
    monkeypatch: pytest.MonkeyPatch,
    gpu: bool | None,
    reason: str,
) -> None:
    fake = FakeNvml().install(monkeypatch)
    stream = io.StringIO()
    trainer = quiet_trainer(
        device="cpu", callbacks=[MonitorCallback(gpu=gpu, table=False, stream=stream)]
    )
    trainer.train(make_loader(), make_loader(16))
    assert fake.calls == []
    assert stream.getvalue() == ""
    assert report_of(trainer)["gpu"] == {"available": False, "reason": reason}


def test_importing_trainbus_does_not_import_pynvml() -> None:
    # torch imports pynvml itself when it is installed: forget that copy first.
    probe = """
import sys, torch
sys.modules.pop("pynvml", None)
import trainbus
from trainbus.handlers import gpu, monitor
print("pynvml" in sys.modules)
"""
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120
    )
    assert result.stdout.strip() == "False"


# --------------------------------------------------------------------- arguments


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        (
            {"time_subscribers": True},
            ConfigurationTypeError,
            r"time_subscribers=True is not an int",
        ),
        ({"time_subscribers": 2.5}, ConfigurationTypeError, r"time_subscribers=2\.5 is not an int"),
        (
            {"time_subscribers": "10"},
            ConfigurationTypeError,
            r"time_subscribers='10' is not an int",
        ),
        ({"time_subscribers": -1}, ConfigurationError, r"time_subscribers=-1 is negative; pass"),
        ({"gpu": "yes"}, ConfigurationTypeError, r"gpu='yes' is not True, False or None"),
        ({"gpu": 1}, ConfigurationTypeError, r"gpu=1 is not True, False or None"),
        ({"table": None}, ConfigurationTypeError, r"table=None is not a bool"),
        ({"table": 1}, ConfigurationTypeError, r"table=1 is not a bool"),
        ({"stream": 42}, ConfigurationTypeError, r"stream=42 has no write\(\) method"),
        ({"stream": "out.txt"}, ConfigurationTypeError, r"stream='out.txt' has no write"),
    ],
)
def test_bad_arguments_are_refused(
    options: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        MonitorCallback(**options)


def test_arguments_are_keyword_only() -> None:
    with pytest.raises(TypeError, match="positional"):
        MonitorCallback(10)  # type: ignore[call-arg]


# ------------------------------------------------------------------------- state


def test_state_dict_round_trips_through_a_weights_only_load(
    quiet_trainer: Callable[..., Trainer], tmp_path: Path
) -> None:
    monitor = MonitorCallback(table=False)
    trainer = quiet_trainer(device="cpu", callbacks=[monitor])
    trainer.train(make_loader(), make_loader(16))
    saved = monitor.state_dict()
    assert len(saved["epochs"]) == 2
    assert saved["epoch"] is None
    assert saved["seconds"] >= report_of(trainer)["train_seconds"]
    torch.save(saved, tmp_path / "monitor.pt")
    loaded = torch.load(tmp_path / "monitor.pt", weights_only=True)
    restored = MonitorCallback()
    restored.load_state_dict(loaded)
    assert restored.epochs == report_of(trainer)["epochs"]
    assert restored.state_dict() == saved


def test_a_state_without_monitor_data_starts_afresh() -> None:
    monitor = MonitorCallback()
    monitor.load_state_dict({})
    assert monitor.epochs == []
    assert monitor.state_dict() == {
        "epochs": [],
        "epoch": None,
        "seconds": 0.0,
        "resumes": 0,
        "subscribers": [],
        "outside_checkpoints": {"count": 0, "seconds": 0.0},
        "checkpoint_waits": [0, 0.0],
    }


def test_a_second_train_call_starts_a_new_record(
    quiet_trainer: Callable[..., Trainer],
) -> None:
    monitor = MonitorCallback(table=False)
    trainer = quiet_trainer(device="cpu", callbacks=[monitor], max_epochs=1)
    trainer.train(make_loader())
    first = report_of(trainer)
    monitor.epochs.append({"epoch": 99})
    trainer.max_epochs = 2
    trainer.train(make_loader())
    assert [entry["epoch"] for entry in report_of(trainer)["epochs"]] == [1]
    assert len(first["epochs"]) == 1


def test_reset_forgets_the_measurements_of_the_earlier_run(
    quiet_trainer: Callable[..., Trainer],
) -> None:
    monitor = MonitorCallback(time_subscribers=1, table=False)
    trainer = quiet_trainer(device="cpu", callbacks=[monitor])
    trainer.train(make_loader(), make_loader(16))
    monitor.load_state_dict(monitor.state_dict())  # a restored state no train_start consumed
    fresh = MonitorCallback(time_subscribers=1, table=False)
    assert monitor.state_dict() != fresh.state_dict()

    monitor.reset()

    assert monitor.state_dict() == fresh.state_dict()
    assert monitor.report()["gpu"] == {"available": False, "reason": "training has not started"}
    assert monitor.report()["epochs"] == []
    assert monitor.config() == fresh.config()
    assert vars(monitor) == vars(fresh)


def test_reset_releases_the_bus_and_nvml_of_a_run_that_never_tore_down(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake = FakeNvml().install(monkeypatch)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    bus = EventBus()
    probe = bus.subscribe("epoch_end", lambda: None, id="probe")
    monitor = MonitorCallback(time_subscribers=1, gpu=True, table=False)
    monitor.on_train_start(model=make_model(), bus=bus)
    bus.emit("epoch_end")
    assert (probe.calls, probe.timed_calls) == (1, 1)
    assert fake.count("nvmlShutdown") == 0

    monitor.reset()

    assert fake.count("nvmlShutdown") == 1
    bus.emit("epoch_end")
    assert (probe.calls, probe.timed_calls) == (2, 1)


def test_reset_after_a_finished_run_leaves_its_bus_alone(
    quiet_trainer: Callable[..., Trainer],
) -> None:
    first = MonitorCallback(time_subscribers=1, table=False)
    trainer = quiet_trainer(device="cpu", callbacks=[first], max_epochs=1)
    probe = trainer.bus.subscribe("evaluation_step_end", lambda: None, id="probe")
    trainer.train(make_loader(16))
    trainer.bus.measure_time(1)  # as another monitor's train_start would

    first.reset()

    trainer.validate(make_loader(16))
    assert (probe.calls, probe.timed_calls) == (2, 2)


def _monitored_run(maps: Path, *, interrupt_at: int | None, resume: bool) -> Trainer:
    callbacks = [
        TrainingCheckpointCallback(every_n_steps=4),
        MonitorCallback(time_subscribers=1, table=False),
    ]
    if resume:
        trainer = Trainer.from_maps(
            maps, make_model(), callbacks=callbacks, default_callbacks=False
        )
    else:
        trainer = Trainer(
            maps, make_model(), callbacks=callbacks, default_callbacks=False, max_epochs=3
        )
    if interrupt_at is not None:

        @trainer.on("checkpoint")
        def interrupt(*, state: TrainerState, kind: str) -> None:
            if kind == "training" and state.iteration == interrupt_at:
                raise JobKilledError(f"interrupted at iteration {interrupt_at}")

        with pytest.raises(JobKilledError):
            trainer.train(make_loader(), make_loader(16))
    else:
        trainer.train(make_loader(), make_loader(16))
    return trainer


def test_monitor_json_after_a_resume_covers_the_whole_training(tmp_path: Path) -> None:
    maps = tmp_path / "maps"
    interrupted = _monitored_run(maps, interrupt_at=8, resume=False)
    assert not (interrupted.maps.path / "monitor.json").exists()
    resumed = _monitored_run(maps, interrupt_at=None, resume=True)
    report = report_of(resumed)
    epochs = report["epochs"]
    assert [entry["epoch"] for entry in epochs] == [0, 1, 2]
    assert [entry["batches"] for entry in epochs] == [6, 6, 6]
    assert [entry["samples"] for entry in epochs] == [48, 48, 48]
    assert [entry["resumed"] for entry in epochs] == [False, True, False]
    for entry in epochs:
        assert_plausible_epoch(entry)
    # A state every 4 steps and one at each epoch's end (the last is training's end too):
    # steps 4, 6 | 8, 12, 12 | 16, 18. The state of step 8, resumed from, holds the record
    # from before its own write, so epoch 1 counts two.
    assert [entry["checkpoints"] for entry in epochs] == [2, 2, 2]
    assert report["checkpoints"] == 6
    assert report["resumes"] == 1
    assert report["samples"] == 144
    assert report["total_seconds"] >= report["train_seconds"] + report["validation_seconds"]
    for subscriber in ("MonitorCallback.on_batch_end", "TrainingCheckpointCallback.on_batch_end"):
        row = row_of(report, subscriber)
        assert row["calls"] == 18
        assert row["timed_calls"] == 18
    assert row_of(report, "MonitorCallback.on_epoch_end")["calls"] == 3
