"""The default callback set and its dispatch plan, kept as a reviewed snapshot.

A change to a default callback's events or priorities changes what runs when for every user:
this test makes such a change visible in review. To accept an intended change, run
``TRAINBUS_UPDATE_SNAPSHOTS=1 pytest tests/handlers/test_defaults.py`` and commit the file.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch

from tests.conftest import make_model
from trainbus import (
    Callback,
    EarlyStoppingCallback,
    LoggerCallback,
    LRSchedulerCallback,
    MetricsWriterCallback,
    ModelCheckpointCallback,
    MonitorCallback,
    Trainer,
    TrainingCheckpointCallback,
    on,
)
from trainbus.cli import format_plan

SNAPSHOTS = Path(__file__).with_name("snapshots")
SNAPSHOT = SNAPSHOTS / "default_plan.txt"


def assert_matches_snapshot(plan: str, snapshot: Path) -> None:
    if os.environ.get("TRAINBUS_UPDATE_SNAPSHOTS") == "1":
        snapshot.write_text(plan)
    assert plan == snapshot.read_text(), (
        f"the dispatch plan changed from {snapshot.name}; review the difference and, if "
        "intended, run TRAINBUS_UPDATE_SNAPSHOTS=1 pytest tests/handlers/test_defaults.py"
    )


def test_the_default_set_is_the_documented_one(maps_path: Path) -> None:
    trainer = Trainer(maps_path, make_model())
    assert [type(c) for c in trainer.callbacks] == [
        LoggerCallback,
        MonitorCallback,
        MetricsWriterCallback,
        ModelCheckpointCallback,
        TrainingCheckpointCallback,
    ]


def test_the_default_plan_matches_its_snapshot(maps_path: Path) -> None:
    plan = format_plan(Trainer(maps_path, make_model()).plan()) + "\n"
    assert_matches_snapshot(plan, SNAPSHOT)


class Timing(Callback):
    """A user callback that wraps each epoch and must see the checkpoints written."""

    priority = 20
    reverse_end_events = True

    def on_epoch_start(self) -> None: ...

    def on_epoch_end(self) -> None: ...

    @on("checkpoint", after="ModelCheckpointCallback")
    def saved(self) -> None: ...


def test_a_user_set_plan_matches_its_snapshot(maps_path: Path) -> None:
    trainer = Trainer(
        maps_path,
        make_model(),
        callbacks=[
            EarlyStoppingCallback("loss", patience=3),
            LRSchedulerCallback(functools.partial(torch.optim.lr_scheduler.StepLR, step_size=2)),
            ModelCheckpointCallback("loss", top_k=2),
            Timing(),
        ],
        default_callbacks={MonitorCallback: False},
    )
    trainer.on("epoch_end", priority=5, every=2, id="report")(lambda: None)
    trainer.on("batch_end", before="TrainingCheckpointCallback", id="watch")(lambda: None)
    plan = format_plan(trainer.plan()) + "\n"
    assert_matches_snapshot(plan, SNAPSHOTS / "user_plan.txt")
    epoch_end = [row["id"] for row in trainer.plan("epoch_end")]
    assert epoch_end.index("report") < epoch_end.index("Timing.on_epoch_end")


def test_logger_and_monitor_frame_every_other_default(maps_path: Path) -> None:
    plan = Trainer(maps_path, make_model()).plan()
    for event in ("train_start", "epoch_start"):
        ids = [row["id"].split(".")[0] for row in plan if row["event"] == event]
        assert ids[:2] == ["LoggerCallback", "MonitorCallback"]
    for event in ("epoch_end", "train_end"):
        ids = [row["id"].split(".")[0] for row in plan if row["event"] == event]
        assert ids[-2:] == ["MonitorCallback", "LoggerCallback"]
