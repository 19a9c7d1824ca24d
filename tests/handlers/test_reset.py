"""Every built-in callback forgets a finished run on ``reset()``, like a fresh instance."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from torch.optim import lr_scheduler as schedulers

from trainbus import (
    EarlyStoppingCallback,
    LoggerCallback,
    MetricsWriterCallback,
    ModelCheckpointCallback,
    MonitorCallback,
    Trainer,
    TrainingCheckpointCallback,
    handlers,
)
from trainbus.events.callback import Callback
from trainbus.handlers.lr_scheduler import LRSchedulerCallback

from ..conftest import make_loader

# One factory object for every instance: a fresh callback then holds the very same one.
STEP_LR = functools.partial(schedulers.StepLR, step_size=1, gamma=0.5)

NOT_PER_RUN = frozenset(
    {
        "_trainbus_callback_id",  # given by the Trainer the callback is registered with
        "_with_bar",  # the logger's bar, decided when its handlers were subscribed
    }
)
"""Attributes that describe the callback's registration, not a run: reset keeps them."""

BUILT_IN: list[Any] = [
    pytest.param(
        lambda: EarlyStoppingCallback("loss", patience=5, restore_best_weights=True),
        id="EarlyStoppingCallback",
    ),
    pytest.param(lambda: LRSchedulerCallback(STEP_LR), id="LRSchedulerCallback"),
    pytest.param(lambda: LoggerCallback(console=False), id="LoggerCallback"),
    pytest.param(lambda: MonitorCallback(table=False, gpu=False), id="MonitorCallback"),
    pytest.param(MetricsWriterCallback, id="MetricsWriterCallback"),
    pytest.param(
        lambda: ModelCheckpointCallback("loss", top_k=2),
        id="ModelCheckpointCallback",
    ),
    pytest.param(
        lambda: TrainingCheckpointCallback(every_n_steps=4),
        id="TrainingCheckpointCallback",
    ),
]


def per_run(callback: Callback) -> dict[str, Any]:
    return {key: value for key, value in vars(callback).items() if key not in NOT_PER_RUN}


def test_every_built_in_callback_type_is_covered() -> None:
    exported = {
        value
        for name in handlers.__all__
        if isinstance(value := getattr(handlers, name), type) and issubclass(value, Callback)
    }
    assert {type(param.values[0]()) for param in BUILT_IN} == exported


@pytest.mark.parametrize("make", BUILT_IN)
def test_reset_after_a_real_training_gives_the_state_of_a_fresh_instance(
    quiet_trainer: Callable[..., Trainer], make: Callable[[], Callback]
) -> None:
    callback = make()
    fresh = make()
    trainer = quiet_trainer(callbacks=[callback], max_epochs=2)
    trainer.train(make_loader(), make_loader(16, seed=1))
    # Otherwise the comparison below would pass without any reset.
    assert callback.state_dict() != fresh.state_dict()

    callback.reset()

    assert callback.state_dict() == fresh.state_dict()
    assert callback.config() == fresh.config()
    assert per_run(callback) == per_run(fresh)


def test_a_checkpoint_callbacks_reset_forgets_what_a_clean_run_leaves_empty(
    tmp_path: Path,
) -> None:
    weights = ModelCheckpointCallback("loss")
    weights.on_validation_end(metrics={"loss": 0.5})  # no epoch_end followed
    weights._pending["best-loss"] = None  # type: ignore[assignment]  # a save never confirmed
    states = TrainingCheckpointCallback()
    states.on_resume(checkpoint=tmp_path / "training" / "state-0000000004")
    weights.reset()
    states.reset()
    assert per_run(weights) == per_run(ModelCheckpointCallback("loss"))
    assert per_run(states) == per_run(TrainingCheckpointCallback())
