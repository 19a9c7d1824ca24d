"""Loop controls: max_steps, max_time, limit_*_batches, val_check_interval, fast_dev_run,
validate_last_epoch and estimated_stepping_batches, on real training."""

from __future__ import annotations

import datetime
import functools
import gc
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset

from tests.conftest import ValidationCounter, make_loader, make_model
from trainbus import (
    LRSchedulerCallback,
    MetricsWriterCallback,
    Trainer,
    TrainerState,
    TrainingCheckpointCallback,
)
from trainbus.engine.limits import MAX_STEPS_SOURCE, MAX_TIME_SOURCE
from trainbus.errors import CheckpointError, ConfigurationError, DataError


def count_events(trainer: Trainer, *events: str) -> dict[str, int]:
    counts = dict.fromkeys(events, 0)
    for event in events:

        def seen(*, state: TrainerState, event: str = event) -> None:
            counts[event] += 1

        trainer.on(event)(seen)
    return counts


def weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in trainer.model.state_dict().items()}


def assert_same_weights(left: dict[str, torch.Tensor], right: dict[str, torch.Tensor]) -> None:
    assert left.keys() == right.keys()
    for name in left:
        assert torch.equal(left[name], right[name]), name


def recorded(maps: Path) -> dict[str, Any]:
    document: dict[str, Any] = json.loads((maps / "maps.json").read_text())
    return document


def metric_rows(maps: Path) -> list[str]:
    return (maps / "metrics.tsv").read_text().splitlines()[1:]


# ------------------------------------------------------------------------------ max_steps
def test_max_steps_inside_an_epoch_pauses_with_a_training_state(
    quiet_trainer: Callable[..., Trainer], maps_path: Path
) -> None:
    trainer = quiet_trainer(max_epochs=5, max_steps=7, callbacks=[TrainingCheckpointCallback()])
    state = trainer.train(make_loader(), make_loader(16))  # 6 batches per epoch
    assert state.global_step == 7
    assert (state.current_epoch, state.batch_idx) == (1, 0)
    assert state.stopped_by == MAX_STEPS_SOURCE
    assert state.stop_reason == "max_steps=7 reached"
    assert state.stop_resumable
    call = recorded(maps_path)["calls"][-1]
    assert call["status"] == "stopped"
    assert recorded(maps_path)["trainer"]["max_steps"] == 7
    assert any(p.name.startswith("state-") for p in (maps_path / "training").iterdir())


def test_max_steps_at_an_epoch_end_finishes_the_epoch_and_validates_it(
    quiet_trainer: Callable[..., Trainer], maps_path: Path
) -> None:
    trainer = quiet_trainer(max_epochs=10, max_steps=12, val_every_n_epochs=5)
    counts = count_events(trainer, "validation_start", "epoch_end")
    state = trainer.train(make_loader(), make_loader(16))
    assert state.global_step == 12
    assert state.stopped_by is None  # the run's natural end, as max_epochs
    assert counts == {"validation_start": 1, "epoch_end": 2}  # the last epoch is validated


def test_a_run_ended_by_max_steps_resumes_exactly_with_a_larger_max_steps(
    tmp_path: Path,
) -> None:
    def build(maps: Path, steps: int) -> Trainer:
        return Trainer(
            maps,
            make_model(),
            default_callbacks=[MetricsWriterCallback, TrainingCheckpointCallback],
            max_epochs=4,
            max_steps=steps,
        )

    loader = functools.partial(make_loader, shuffle=True)
    straight = build(tmp_path / "straight", 15)
    straight.train(loader(), make_loader(16))
    first = build(tmp_path / "paused", 9)
    first.train(loader(), make_loader(16))
    assert first.state.global_step == 9
    resumed = Trainer.from_maps(tmp_path / "paused", make_model(), max_steps=15)
    state = resumed.train(loader(), make_loader(16))
    assert state.global_step == 15
    assert_same_weights(weights(straight), weights(resumed))
    assert metric_rows(tmp_path / "straight") == metric_rows(tmp_path / "paused")


def test_a_resume_with_the_same_max_steps_trains_no_further(tmp_path: Path) -> None:
    options: dict[str, Any] = {"default_callbacks": False, "max_epochs": 3, "max_steps": 4}
    Trainer(tmp_path / "m", make_model(), **options).train(make_loader())
    again = Trainer.from_maps(tmp_path / "m", make_model())
    counts = count_events(again, "batch_start")
    assert again.train(make_loader()).global_step == 4
    assert counts["batch_start"] == 0


# ------------------------------------------------------------------------------- max_time
@pytest.mark.parametrize("budget", [0.25, datetime.timedelta(seconds=0.25)], ids=["s", "delta"])
def test_max_time_pauses_with_a_training_state_and_the_resume_is_exact(
    tmp_path: Path, budget: float | datetime.timedelta
) -> None:
    def build(maps: Path, **options: Any) -> Trainer:
        trainer = Trainer(
            maps,
            make_model(),
            default_callbacks=[MetricsWriterCallback, TrainingCheckpointCallback],
            max_epochs=3,
            **options,
        )

        @trainer.on("batch_end")
        def slow(*, state: TrainerState) -> None:
            time.sleep(0.02)

        return trainer

    loader = functools.partial(make_loader, shuffle=True)
    straight = build(tmp_path / "straight")
    straight.train(loader(), make_loader(16))
    paused = build(tmp_path / "paused", max_time=budget)
    state = paused.train(loader(), make_loader(16))
    assert state.stopped_by == MAX_TIME_SOURCE
    assert state.stop_reason == "max_time=0.25s reached"
    assert 0 < state.iteration < 18
    assert (tmp_path / "paused" / "training").is_dir()
    resumed = Trainer.from_maps(tmp_path / "paused", make_model(), max_time=None)
    resumed.on("batch_end")(lambda *, state: time.sleep(0.02))
    final = resumed.train(loader(), make_loader(16))
    assert final.iteration == 18
    assert final.stopped_by is None
    assert_same_weights(weights(straight), weights(resumed))
    assert metric_rows(tmp_path / "straight") == metric_rows(tmp_path / "paused")


def test_max_time_gives_each_call_its_own_budget(quiet_trainer: Callable[..., Trainer]) -> None:
    trainer = quiet_trainer(max_epochs=1, max_time=60)
    assert trainer.settings.max_time == 60.0
    assert trainer.train(make_loader()).stopped_by is None


# --------------------------------------------------------------------------- limit_*_batches
@pytest.mark.parametrize(("limit", "batches"), [(2, 2), (0.5, 3), (1.0, 6), (100, 6)])
def test_limit_train_batches_cuts_every_epoch(
    quiet_trainer: Callable[..., Trainer], limit: int | float, batches: int
) -> None:
    trainer = quiet_trainer(limit_train_batches=limit)
    counts = count_events(trainer, "batch_start")
    state = trainer.train(make_loader())
    assert counts["batch_start"] == 2 * batches
    assert state.num_batches == batches
    assert state.global_step == 2 * batches


@pytest.mark.parametrize(("limit", "batches"), [(1, 1), (0.5, 1), (0.0, 0), (0, 0)])
def test_limit_val_batches_cuts_every_validation(
    quiet_trainer: Callable[..., Trainer], limit: int | float, batches: int
) -> None:
    trainer = quiet_trainer(limit_val_batches=limit)
    counts = count_events(trainer, "evaluation_step_start", "validation_start")
    trainer.train(make_loader(), make_loader(24))  # 3 validation batches
    assert counts["evaluation_step_start"] == 2 * batches
    assert counts["validation_start"] == (2 if batches else 0)


def test_limit_val_batches_applies_to_validate(quiet_trainer: Callable[..., Trainer]) -> None:
    trainer = quiet_trainer(limit_val_batches=1)
    counts = count_events(trainer, "evaluation_step_start")
    trainer.validate(make_loader(24))
    trainer.test(make_loader(24))
    assert counts["evaluation_step_start"] == 1 + 3  # test() is not limited


class Stream(IterableDataset[tuple[torch.Tensor, torch.Tensor]]):
    def __iter__(self) -> Any:
        yield from (tuple(batch) for batch in make_loader())


def test_an_int_limit_cuts_a_loader_without_length(quiet_trainer: Callable[..., Trainer]) -> None:
    trainer = quiet_trainer(limit_train_batches=4, max_epochs=1)
    assert trainer.train(DataLoader(Stream(), batch_size=None)).iteration == 4


def test_a_fraction_of_a_loader_without_length_is_refused(
    quiet_trainer: Callable[..., Trainer],
) -> None:
    trainer = quiet_trainer(limit_train_batches=0.5)
    with pytest.raises(DataError, match=r"limit_train_batches=0.5 is a fraction.*no length"):
        trainer.train(DataLoader(Stream(), batch_size=None))


# ------------------------------------------------------------------------ val_check_interval
def test_val_check_interval_validates_inside_epochs_and_callbacks_see_it(
    quiet_trainer: Callable[..., Trainer], maps_path: Path
) -> None:
    trainer = quiet_trainer(val_check_interval=2, max_epochs=2)
    seen: list[tuple[int, int]] = []

    @trainer.on("metrics_computed")
    def record(*, state: TrainerState) -> None:
        seen.append((state.current_epoch, state.iteration))

    trainer.train(make_loader(), make_loader(16))  # 6 batches: after 2, 4 and the epoch end
    assert seen == [(0, 2), (0, 4), (0, 6), (1, 8), (1, 10), (1, 12)]
    assert trainer.state.stage == "idle"


def test_a_fraction_for_val_check_interval_is_a_fraction_of_the_epoch(
    quiet_trainer: Callable[..., Trainer],
) -> None:
    trainer = quiet_trainer(val_check_interval=0.5, max_epochs=1)
    counts = count_events(trainer, "validation_start")
    trainer.train(make_loader(), make_loader(16))
    assert counts["validation_start"] == 2  # after batch 3, and at the epoch's end


def test_a_resume_after_a_state_written_at_a_mid_epoch_validation_is_exact(
    tmp_path: Path,
) -> None:
    counters: list[ValidationCounter] = []

    def build(maps: Path) -> Trainer:
        counters.append(ValidationCounter())
        return Trainer(
            maps,
            make_model(),
            default_callbacks=[MetricsWriterCallback],
            callbacks=[TrainingCheckpointCallback(every_n_steps=4), counters[-1]],
            max_epochs=2,
            val_check_interval=2,
        )

    loader = functools.partial(make_loader, shuffle=True)
    straight = build(tmp_path / "straight")
    straight.train(loader(), make_loader(16))
    interrupted = build(tmp_path / "cut")

    @interrupted.on("batch_end")
    def crash(*, state: TrainerState) -> None:
        if state.iteration == 9:
            raise RuntimeError("crash after step 9")

    with pytest.raises(RuntimeError, match="crash after step 9"):
        interrupted.train(loader(), make_loader(16))
    counters.append(ValidationCounter())
    resumed = Trainer.from_maps(
        tmp_path / "cut",
        make_model(),
        callbacks=[TrainingCheckpointCallback(every_n_steps=4), counters[-1]],
    )
    resumed.train(loader(), make_loader(16))
    assert resumed.state.iteration == 12
    # The state of step 8 was written after that step's validation, which it includes.
    assert counters[0].seen == counters[-1].seen == 6
    assert_same_weights(weights(straight), weights(resumed))
    straight_rows = metric_rows(tmp_path / "straight")
    assert len(straight_rows) == 6
    # The resumed run starts from the state of step 8: rows after it are written again.
    assert metric_rows(tmp_path / "cut")[-2:] == straight_rows[-2:]


# ----------------------------------------------------------------------- validate_last_epoch
@pytest.mark.parametrize(("last", "validated"), [(True, [1, 2]), (False, [1])])
def test_validate_last_epoch(
    quiet_trainer: Callable[..., Trainer], last: bool, validated: list[int]
) -> None:
    trainer = quiet_trainer(max_epochs=3, val_every_n_epochs=2, validate_last_epoch=last)
    epochs: list[int] = []
    trainer.on("validation_end")(lambda *, state: epochs.append(state.current_epoch))
    trainer.train(make_loader(), make_loader(16))
    assert epochs == validated


# ------------------------------------------------------------------------------ fast_dev_run
def test_fast_dev_run_runs_one_batch_each_and_keeps_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "runs" / "real"
    trainer = Trainer(target, make_model(), fast_dev_run=True, max_epochs=50)
    counts = count_events(trainer, "batch_start", "evaluation_step_start")
    state = trainer.train(make_loader(), make_loader(16))
    assert counts == {"batch_start": 1, "evaluation_step_start": 1}
    assert state.current_epoch == 0 and trainer.settings.max_epochs == 1
    temporary = trainer.maps.path
    assert (temporary / "maps.json").is_file()
    assert "fast_dev_run" in capsys.readouterr().out
    assert not target.exists() and not (tmp_path / "runs").exists()
    del trainer
    gc.collect()
    assert not temporary.exists()


# --------------------------------------------------------------- estimated_stepping_batches
@pytest.mark.parametrize(
    ("options", "steps"),
    [
        ({}, 12),  # 6 batches, 2 epochs
        ({"accumulate_grad_batches": 4}, 4),  # groups of 4 and 2
        ({"max_steps": 5}, 5),
        ({"limit_train_batches": 0.5, "accumulate_grad_batches": 2}, 4),
    ],
)
def test_estimated_stepping_batches_counts_the_optimizer_steps_of_the_run(
    quiet_trainer: Callable[..., Trainer], options: dict[str, Any], steps: int
) -> None:
    trainer = quiet_trainer(**options)
    with pytest.raises(ConfigurationError, match="train\\(\\) has not started"):
        _ = trainer.estimated_stepping_batches
    state = trainer.train(make_loader())
    assert trainer.estimated_stepping_batches == steps == state.global_step


def test_one_cycle_built_from_the_estimate_covers_the_whole_run(
    quiet_trainer: Callable[..., Trainer],
) -> None:
    holder: list[Trainer] = []

    def one_cycle(optimizer: torch.optim.Optimizer) -> Any:
        total = holder[0].estimated_stepping_batches
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.1, total_steps=total)

    trainer = quiet_trainer(
        max_epochs=3,
        accumulate_grad_batches=2,
        callbacks=[LRSchedulerCallback(one_cycle, interval="step")],
    )
    holder.append(trainer)
    # OneCycleLR raises when stepped past total_steps: the estimate must not be short.
    state = trainer.train(make_loader())
    assert state.global_step == trainer.estimated_stepping_batches == 9


def test_the_estimate_of_a_loader_without_length_needs_max_steps(
    quiet_trainer: Callable[..., Trainer],
) -> None:
    trainer = quiet_trainer(max_epochs=1)
    trainer.train(DataLoader(Stream(), batch_size=None))
    with pytest.raises(ConfigurationError, match="no length; pass max_steps"):
        _ = trainer.estimated_stepping_batches


def test_a_mid_epoch_state_refuses_a_resume_with_another_limit(tmp_path: Path) -> None:
    trainer = Trainer(tmp_path / "m", make_model(), default_callbacks=False, max_steps=3)
    trainer.train(make_loader())
    again = Trainer.from_maps(tmp_path / "m", make_model(), max_steps=None, limit_train_batches=4)
    with pytest.raises(CheckpointError, match=r"epoch of 6 batches, but this epoch has 4"):
        again.train(make_loader())
