"""The default callback set and its dispatch plan, kept as a reviewed snapshot.

A change to a default callback's events or priorities changes what runs when for every user:
this test makes such a change visible in review. To accept an intended change, run
``TRAINBUS_UPDATE_SNAPSHOTS=1 pytest tests/handlers/test_defaults.py`` and commit the file.
"""

from __future__ import annotations

import os
from pathlib import Path

from tests.conftest import make_model
from trainbus import (
    LoggerCallback,
    MetricsWriterCallback,
    ModelCheckpointCallback,
    MonitorCallback,
    Trainer,
    TrainingCheckpointCallback,
)
from trainbus.cli import format_plan

SNAPSHOT = Path(__file__).with_name("snapshots") / "default_plan.txt"


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
    if os.environ.get("TRAINBUS_UPDATE_SNAPSHOTS") == "1":
        SNAPSHOT.write_text(plan)
    assert plan == SNAPSHOT.read_text(), (
        "the default dispatch plan changed; review the difference and, if intended, run "
        "TRAINBUS_UPDATE_SNAPSHOTS=1 pytest tests/handlers/test_defaults.py"
    )


def test_logger_and_monitor_frame_every_other_default(maps_path: Path) -> None:
    plan = Trainer(maps_path, make_model()).plan()
    for event in ("train_start", "epoch_start"):
        ids = [row["id"].split(".")[0] for row in plan if row["event"] == event]
        assert ids[:2] == ["LoggerCallback", "MonitorCallback"]
    for event in ("epoch_end", "train_end"):
        ids = [row["id"].split(".")[0] for row in plan if row["event"] == event]
        assert ids[-2:] == ["MonitorCallback", "LoggerCallback"]
