"""The training loss of a log interval: folded on the device, read once, exact across a resume."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from tests.conftest import make_loader
from trainbus import Trainer, TrainerState
from trainbus.engine.loss_tracking import FOLD_EVERY, LossTracker


def test_the_mean_of_folded_losses_is_the_mean_of_the_losses() -> None:
    losses = torch.rand(100, generator=torch.Generator().manual_seed(0))
    tracker = LossTracker()
    for index, loss in enumerate(losses, 1):
        tracker.recent.append(loss)
        if index % FOLD_EVERY == 0:
            tracker.fold()
    assert len(tracker.recent) == 100 % FOLD_EVERY  # at most FOLD_EVERY tensors kept
    mean, count = tracker.take_mean()
    assert count == 100
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

    state = trainer.train(make_loader(samples=560))  # 70 batches, logged at the last
    assert state.train_loss == pytest.approx(sum(seen) / len(seen), rel=1e-6)
    assert max(kept) <= FOLD_EVERY
