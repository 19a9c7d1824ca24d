"""The training loss of a log interval: folded on the device, read once, exact across a resume."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from tests.conftest import make_loader, make_model
from trainbus import Trainer, TrainerState, TrainingCheckpointCallback
from trainbus.engine.loss_tracking import FOLD_EVERY, LossTracker


def test_the_mean_of_folded_losses_is_the_mean_of_the_losses() -> None:
    total = 2 * FOLD_EVERY + 44  # two folds and a remainder
    losses = torch.rand(total, generator=torch.Generator().manual_seed(0))
    tracker = LossTracker()
    for index, loss in enumerate(losses, 1):
        tracker.recent.append(loss)
        if index % FOLD_EVERY == 0:
            tracker.fold()
    assert len(tracker.recent) == 44  # at most FOLD_EVERY tensors kept
    mean, count = tracker.take_mean()
    assert count == total
    assert float(mean) == pytest.approx(float(losses.mean()), rel=1e-6)
    assert not tracker


def test_a_saved_tracker_continues_with_the_same_sums() -> None:
    losses = list(torch.rand(50, generator=torch.Generator().manual_seed(1)).unbind())
    straight, first = LossTracker(), LossTracker()
    for tracker in (straight, first):
        tracker.recent.extend(losses[:40])
        tracker.fold()
        tracker.recent.extend(losses[40:45])
    resumed = LossTracker()
    resumed.load(first.saved(), torch.device("cpu"))
    for tracker in (straight, resumed):
        tracker.recent.extend(losses[45:])
    assert torch.equal(straight.take_mean()[0], resumed.take_mean()[0])


def test_an_old_state_without_sums_loads() -> None:
    tracker = LossTracker()
    tracker.load({"losses": torch.tensor([1.0, 3.0])}, torch.device("cpu"))
    assert tracker.take_mean() == (torch.tensor(2.0), 2)


def test_a_long_log_interval_logs_the_mean_and_keeps_few_tensors(
    quiet_trainer: Callable[..., Trainer],
) -> None:
    trainer = quiet_trainer(max_epochs=1, log_every_n_batches=1000)
    seen: list[float] = []
    kept: list[int] = []

    @trainer.on("batch_end")
    def record(*, loss: torch.Tensor, state: TrainerState) -> None:
        seen.append(float(loss))
        kept.append(len(trainer._loop.losses.recent))

    batches = 2 * FOLD_EVERY + 14  # folded twice, logged at the last
    state = trainer.train(make_loader(samples=8 * batches))
    assert len(seen) == batches
    assert state.train_loss == pytest.approx(sum(seen) / len(seen), rel=1e-6)
    assert max(kept) == FOLD_EVERY - 1


def test_a_pause_after_a_fold_resumes_to_the_same_logged_loss(tmp_path: Path) -> None:
    # The training state holds the folded sum, its count and the losses since: the resumed
    # run logs the interval's mean as the uninterrupted run does, to the bit.
    interval = 2 * FOLD_EVERY + 20
    pause = FOLD_EVERY + 10  # after one fold, inside the interval

    def build(maps: Path, steps: int) -> Trainer:
        return Trainer(
            maps,
            make_model(),
            default_callbacks=[TrainingCheckpointCallback],
            max_epochs=1,
            max_steps=steps,
            log_every_n_batches=interval,
        )

    loader = make_loader(samples=8 * interval)
    straight = build(tmp_path / "straight", interval).train(loader)
    first = build(tmp_path / "paused", pause).train(loader)
    assert first.global_step == pause
    resumed = Trainer.from_maps(tmp_path / "paused", make_model(), max_steps=interval)
    state = resumed.train(loader)
    assert state.global_step == interval
    assert state.train_loss is not None
    assert state.train_loss == straight.train_loss
