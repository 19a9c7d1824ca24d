"""The summary at the end of every train(): printed as one block, stored in maps.json."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import make_loader
from trainbus import EarlyStoppingCallback, ModelCheckpointCallback, Stop, Trainer, TrainerState
from trainbus.errors import TrainbusWarning


def last_call(maps: Path) -> dict[str, Any]:
    call: dict[str, Any] = json.loads((maps / "maps.json").read_text())["calls"][-1]
    return call


def test_a_finished_run_prints_and_records_its_summary(
    quiet_trainer: Callable[..., Trainer], maps_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trainer = quiet_trainer(
        max_epochs=3,
        callbacks=[ModelCheckpointCallback("loss", mode="min")],
    )
    trainer.train(make_loader(), make_loader(16))
    summary = last_call(maps_path)["summary"]
    state = trainer.state
    assert summary["outcome"] == "completed"
    assert (summary["epochs_done"], summary["max_epochs"], summary["global_step"]) == (3, 3, 18)
    best_epoch = state.best_epochs["loss"] + 1  # people count epochs from 1
    assert summary["best"] == {"loss": {"value": state.best_metrics["loss"], "epoch": best_epoch}}
    assert summary["weights"] == {
        "best-loss": str(maps_path / "checkpoints" / "best-loss"),
        "last": str(maps_path / "checkpoints" / "last"),
    }
    assert summary["seconds"] > 0
    out = capsys.readouterr().out.splitlines()
    start = out.index(f"trainbus: training summary ({maps_path})")
    block = "\n".join(out[start:])
    assert re.search(r"\n  epochs +3 of 3 done, 18 optimizer steps\n", block)
    assert re.search(r"\n  outcome +completed\n", block)
    assert f"loss {state.best_metrics['loss']:.4g} at epoch {best_epoch}" in block
    assert re.search(
        f"\n  weights best-loss +{re.escape(str(maps_path))}/checkpoints/best-loss", block
    )


def test_a_stop_names_who_stopped_and_why(
    quiet_trainer: Callable[..., Trainer], maps_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trainer = quiet_trainer(
        max_epochs=20,
        callbacks=[EarlyStoppingCallback("loss", mode="min", stopping_threshold=10.0)],
    )
    trainer.train(make_loader(), make_loader(16))
    summary = last_call(maps_path)["summary"]
    assert summary["outcome"] == "stopped"
    assert summary["epochs_done"] == 1
    assert summary["stopped_by"] == trainer.state.stopped_by
    assert f"stopped by {trainer.state.stopped_by}: {trainer.state.stop_reason}" in (
        capsys.readouterr().out
    )


def test_a_pause_by_a_limit_is_called_resumable(
    quiet_trainer: Callable[..., Trainer], maps_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    quiet_trainer(max_steps=3).train(make_loader())
    assert last_call(maps_path)["summary"]["outcome"] == "paused"
    out = capsys.readouterr().out
    assert "paused (resumable) by trainbus.max_steps: max_steps=3 reached" in out
    assert "0 of 2 done, 3 optimizer steps" in out


def test_a_failed_run_records_its_summary_without_printing_it(
    quiet_trainer: Callable[..., Trainer], maps_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trainer = quiet_trainer()

    @trainer.on("batch_end")
    def fail() -> None:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        trainer.train(make_loader())
    assert last_call(maps_path)["summary"]["outcome"] == "failed"
    assert "training summary" not in capsys.readouterr().out


@pytest.mark.parametrize("event", ["train_end", "teardown"])
def test_a_stop_after_the_loop_ended_is_not_the_runs_stop(
    quiet_trainer: Callable[..., Trainer], maps_path: Path, event: str
) -> None:
    trainer = quiet_trainer(max_epochs=2)

    @trainer.on(event, id="late-stopper")
    def late(*, state: TrainerState) -> Stop:
        return Stop("too late")

    with pytest.warns(TrainbusWarning, match=f"late-stopper returned .* at '{event}'"):
        state = trainer.train(make_loader())
    call = last_call(maps_path)
    assert call["summary"]["outcome"] == "completed"
    assert call["summary"]["stopped_by"] is None
    assert state.stopped_by is None
    assert [request["source"] for request in call["requests"]] == ["late-stopper"]
