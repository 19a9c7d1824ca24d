"""The step counters while no step event is heard: kept by the loop, exact wherever read.

With no subscriber on a step event the loop writes its counters (batch index, iteration,
samples seen, global step, the resume position) into the state at log steps, boundaries,
subscription changes and exits only. These tests read them at each of those places and
compare with a run whose step subscriber keeps them current at every batch.
"""

from __future__ import annotations

import functools
import json
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from tests.conftest import make_loader, make_model
from trainbus import SaveTrainingState, SkipStep, Stop, SupervisedModel, Trainer, TrainerState

BATCH = 8
BATCHES_PER_EPOCH = 6  # make_loader(): 48 samples in batches of 8


def counters(state: TrainerState) -> tuple[int, int, int, int]:
    return (state.batch_idx, state.iteration, state.samples_seen, state.global_step)


def expected_after(iteration: int) -> tuple[int, int, int, int]:
    """The counters once step ``iteration`` (from 1) is done, one optimizer step per batch."""
    return ((iteration - 1) % BATCHES_PER_EPOCH, iteration, iteration * BATCH, iteration)


LOGGING_TWO_EPOCHS = {"max_epochs": 2, "log_every_n_batches": 4}


def assert_resumes_as(straight: Trainer, path: Path, model: SupervisedModel) -> None:
    """Resuming the run in ``path`` ends as ``straight`` did: counters and weights."""
    resumed = Trainer.from_maps(path, model, default_callbacks=False)
    end = resumed.train(make_loader(shuffle=True))
    assert counters(end) == counters(straight.state) == expected_after(12)
    for expected, found in zip(
        straight.model.parameters(), resumed.model.parameters(), strict=True
    ):
        assert torch.equal(expected, found)


def recorded_run(path: Path, *, step_subscriber: bool) -> tuple[list[Any], TrainerState]:
    trainer = Trainer(
        path, make_model(), default_callbacks=False, max_epochs=2, log_every_n_batches=4
    )
    seen: list[Any] = []
    for event in ("loss_logged", "epoch_end", "train_end"):
        trainer.on(event)(lambda *, state, event=event: seen.append((event, counters(state))))
    if step_subscriber:
        trainer.on("batch_end")(lambda: None)
    return seen, trainer.train(make_loader())


def test_every_event_sees_the_counters_a_step_subscriber_would_see(tmp_path: Path) -> None:
    quiet, quiet_end = recorded_run(tmp_path / "quiet", step_subscriber=False)
    heard, heard_end = recorded_run(tmp_path / "heard", step_subscriber=True)
    assert quiet == heard
    assert [event for event, _ in quiet].count("loss_logged") == 4  # steps 4, 6, 8, 12
    assert all(values == expected_after(values[1]) for _, values in quiet)
    assert counters(quiet_end) == counters(heard_end) == expected_after(12)


def test_a_step_subscriber_added_mid_epoch_sees_the_current_counters(
    quiet_trainer: Any,
) -> None:
    trainer = quiet_trainer(log_every_n_batches=4)
    seen: list[tuple[int, int, int, int]] = []

    @trainer.on("loss_logged", once=True)
    def listen_from_now_on() -> None:
        trainer.on("batch_start")(lambda *, state: seen.append(counters(state)))

    trainer.train(make_loader())
    # From batch 5 on; batch_start counts its batch in, before its optimizer step.
    assert seen == [
        (index % BATCHES_PER_EPOCH, index + 1, (index + 1) * BATCH, index) for index in range(4, 12)
    ]


def test_counters_stay_exact_after_the_last_step_subscriber_leaves(quiet_trainer: Any) -> None:
    trainer = quiet_trainer(log_every_n_batches=5)
    seen: list[Any] = []
    trainer.on("batch_end")(lambda: None)

    @trainer.on("batch_end", when=lambda state: state.iteration == 3)
    def leave() -> None:
        for subscription in trainer.bus.dispatch_order("batch_end"):
            trainer.bus.unsubscribe(subscription)

    trainer.on("loss_logged")(lambda *, state: seen.append(counters(state)))
    state = trainer.train(make_loader())
    assert trainer.bus.dispatch_order("batch_end") == ()
    assert seen == [expected_after(step) for step in (5, 6, 10, 12)]
    assert counters(state) == expected_after(12)


class ActsOnCall(nn.Module):
    """The test network of ``make_model``, doing ``action`` in its ``call``-th forward."""

    def __init__(self, call: int, action: Callable[[], None]) -> None:
        super().__init__()
        self.network = make_model().network
        self.calls = 0
        self.call = call
        self.action = action

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.call:
            self.action()
        output: torch.Tensor = self.network(inputs)
        return output


def acting_model(call: int, action: Callable[[], None]) -> SupervisedModel:
    return SupervisedModel(
        ActsOnCall(call, action),
        nn.CrossEntropyLoss(),
        optimizer=functools.partial(torch.optim.SGD, lr=0.05),
    )


def fail() -> None:
    raise RuntimeError("this forward call fails")


def test_a_subscription_made_while_a_step_runs_sees_the_current_counters(
    quiet_trainer: Any,
) -> None:
    seen: list[tuple[int, int, int, int]] = []

    def subscribe() -> None:  # as another thread might, in the middle of step 3
        trainer.on("batch_start")(lambda *, state: seen.append(counters(state)))

    trainer = quiet_trainer(model=acting_model(3, subscribe), log_every_n_batches=50)
    trainer.train(make_loader())
    # From step 4 on: its samples are counted, its optimizer step not yet.
    assert seen == [
        (index % BATCHES_PER_EPOCH, index + 1, (index + 1) * BATCH, index) for index in range(3, 12)
    ]


def test_the_position_stays_exact_when_batches_and_steps_differ(
    quiet_trainer: Any, maps_path: Path
) -> None:
    trainer = quiet_trainer(max_epochs=1, log_every_n_batches=4)
    skipping = trainer.bus.subscribe(
        "batch_start", lambda *, state: SkipStep("skip") if state.iteration == 2 else None
    )

    @trainer.on("batch_end", when=lambda state: state.iteration == 3)
    def leave() -> None:
        for subscription in (skipping, *trainer.bus.dispatch_order("batch_end")):
            trainer.bus.unsubscribe(subscription)

    trainer.on("loss_logged", when=lambda state: state.iteration == 4)(
        lambda: Stop("pause", resumable=True)
    )
    trainer.on("train_end")(lambda: SaveTrainingState("after the loop let go"))
    state = trainer.train(make_loader())
    assert counters(state) == (3, 4, 32, 3)  # step 2 was skipped
    document = json.loads((maps_path / "training" / "state-0000000004" / "state.json").read_text())
    assert document["position"] == {"epoch": 0, "batches_done": 4, "in_epoch": True}
    assert counters(TrainerState(**document["state"])) == (3, 4, 32, 3)


class HalvingSGD(torch.optim.SGD):
    """SGD that halves its own learning rate after every step."""

    def step(self, closure: Any = None) -> Any:
        loss = super().step(closure)
        for group in self.param_groups:
            group["lr"] *= 0.5
        return loss


@pytest.mark.parametrize("step_subscriber", [False, True])
def test_learning_rates_an_optimizer_changes_itself_are_exact_where_read(
    quiet_trainer: Any, step_subscriber: bool
) -> None:
    model = SupervisedModel(
        ActsOnCall(8, fail),
        nn.CrossEntropyLoss(),
        optimizer=functools.partial(HalvingSGD, lr=1.0),
    )
    trainer = quiet_trainer(model=model, log_every_n_batches=4)
    seen: list[tuple[str, Any]] = []
    for event in ("loss_logged", "exception"):
        trainer.on(event)(lambda *, state, event=event: seen.append((event, state.learning_rates)))
    if step_subscriber:
        trainer.on("batch_start")(lambda: None)
    with pytest.raises(RuntimeError, match="this forward call fails"):
        trainer.train(make_loader())
    assert seen == [
        ("loss_logged", (0.5**4,)),
        ("loss_logged", (0.5**6,)),
        ("exception", (0.5**7,)),  # step 8 failed: 7 steps done, its rate not logged yet
    ]


def test_an_exception_mid_step_is_reported_with_the_counters_of_that_step(
    quiet_trainer: Any,
) -> None:
    trainer = quiet_trainer(model=acting_model(9, fail), log_every_n_batches=50)
    reported: list[tuple[int, int, int, int]] = []
    trainer.on("exception")(lambda *, state: reported.append(counters(state)))
    with pytest.raises(RuntimeError, match="this forward call fails"):
        trainer.train(make_loader())
    # Step 9 (epoch 2, batch 3) had started: it counts its samples, not its optimizer step.
    assert reported == [(2, 9, 72, 8)]
    assert counters(trainer.state) == (2, 9, 72, 8)


def test_a_pause_asked_at_a_log_step_writes_the_exact_position_and_resumes_exactly(
    quiet_trainer: Any, tmp_path: Path
) -> None:
    straight = quiet_trainer(maps=tmp_path / "straight", **LOGGING_TWO_EPOCHS)
    straight.train(make_loader(shuffle=True))

    paused = quiet_trainer(maps=tmp_path / "paused", **LOGGING_TWO_EPOCHS)
    paused.on("loss_logged", when=lambda state: state.iteration == 8)(
        lambda: [Stop("pause", resumable=True), SaveTrainingState("pause")]
    )
    state = paused.train(make_loader(shuffle=True))
    assert counters(state) == expected_after(8)
    document = json.loads(
        (tmp_path / "paused" / "training" / "state-0000000008" / "state.json").read_text()
    )
    assert document["position"] == {"epoch": 1, "batches_done": 2, "in_epoch": True}
    assert counters(TrainerState(**document["state"])) == expected_after(8)
    assert_resumes_as(straight, tmp_path / "paused", make_model())


def test_a_signal_between_log_steps_saves_the_exact_position(
    quiet_trainer: Any, tmp_path: Path
) -> None:
    straight = quiet_trainer(maps=tmp_path / "straight", **LOGGING_TWO_EPOCHS)
    straight.train(make_loader(shuffle=True))

    interrupted = quiet_trainer(
        maps=tmp_path / "interrupted",
        model=acting_model(7, lambda: os.kill(os.getpid(), signal.SIGTERM)),
        **LOGGING_TWO_EPOCHS,
    )
    with pytest.raises(SystemExit):
        interrupted.train(make_loader(shuffle=True))  # step 7: epoch 2, batch 0
    assert counters(interrupted.state) == expected_after(7)
    document = json.loads(
        (tmp_path / "interrupted" / "training" / "state-0000000007" / "state.json").read_text()
    )
    assert document["position"] == {"epoch": 1, "batches_done": 1, "in_epoch": True}
    assert counters(TrainerState(**document["state"])) == expected_after(7)
    assert_resumes_as(straight, tmp_path / "interrupted", acting_model(0, fail))  # never acts
