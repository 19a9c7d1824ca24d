"""TrainingCheckpointCallback: when it saves, what it keeps, its arguments and its place."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import make_loader
from trainbus import (
    EarlyStoppingCallback,
    LoggerCallback,
    ModelCheckpointCallback,
    MonitorCallback,
    Trainer,
    TrainingCheckpointCallback,
)
from trainbus.errors import ConfigurationError, ConfigurationTypeError


def saved_states(path: Path) -> list[str]:
    return sorted(p.name for p in (path / "training").iterdir() if p.name.startswith("state-"))


# 6 batches per epoch (48 samples, batch size 8).
CADENCES: dict[str, tuple[dict[str, Any], dict[str, Any], list[str]]] = {
    "every-epoch": (
        {},
        {"max_epochs": 2},
        ["state-0000000006-epoch-end", "state-0000000012-epoch-end"],
    ),
    "every-2-epochs-and-the-end": (
        {"every_n_epochs": 2, "keep": 9},
        {"max_epochs": 3},
        ["state-0000000012-epoch-end", "state-0000000018-epoch-end"],
    ),
    "only-the-end": (
        {"every_n_epochs": None},
        {"max_epochs": 2},
        ["state-0000000012-epoch-end"],
    ),
    "every-4-steps": (
        {"every_n_steps": 4, "every_n_epochs": None, "save_on_train_end": False, "keep": 9},
        {"max_epochs": 2},
        ["state-0000000004", "state-0000000008", "state-0000000012"],
    ),
    "steps-with-accumulation": (
        {"every_n_steps": 1, "every_n_epochs": None, "save_on_train_end": False, "keep": 9},
        {"max_epochs": 1, "accumulate_grad_batches": 4},
        ["state-0000000004", "state-0000000006"],
    ),
    "keep-1": (
        {"every_n_steps": 2, "keep": 1},
        {"max_epochs": 2},
        ["state-0000000012-epoch-end"],
    ),
}


@pytest.mark.parametrize("case", sorted(CADENCES))
def test_states_are_written_at_the_asked_cadence_and_rotated(
    case: str, quiet_trainer: Callable[..., Trainer], maps_path: Path
) -> None:
    options, trainer_options, expected = CADENCES[case]
    trainer = quiet_trainer(callbacks=[TrainingCheckpointCallback(**options)], **trainer_options)
    trainer.train(make_loader())
    assert saved_states(maps_path) == expected
    latest = (maps_path / "training" / "latest").read_text().strip()
    assert latest == expected[-1]


WRONG_VALUE, WRONG_TYPE = ConfigurationError, ConfigurationTypeError
BAD: dict[str, tuple[dict[str, Any], type[Exception], str]] = {
    "epochs-zero": (
        {"every_n_epochs": 0},
        WRONG_VALUE,
        r"every_n_epochs=0 is not a positive integer or None; pass e.g. every_n_epochs=1",
    ),
    "epochs-bool": ({"every_n_epochs": True}, WRONG_TYPE, r"every_n_epochs=True is not a positive"),
    "steps-float": ({"every_n_steps": 2.5}, WRONG_TYPE, r"every_n_steps=2.5 is not a positive"),
    "keep-zero": ({"keep": 0}, WRONG_VALUE, r"keep=0 is not a positive integer; at least the"),
    "keep-str": ({"keep": "2"}, WRONG_TYPE, r"keep='2' is not a positive integer"),
    "end-not-bool": (
        {"save_on_train_end": "yes"},
        WRONG_TYPE,
        r"save_on_train_end='yes' is not a bool; pass True",
    ),
    "never-saves": (
        {"every_n_epochs": None, "save_on_train_end": False},
        WRONG_VALUE,
        r"would never save.*default_callbacks=\{TrainingCheckpointCallback: False\}",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_arguments_are_refused_with_the_fix(case: str) -> None:
    options, error, message = BAD[case]
    with pytest.raises(error, match=message):
        TrainingCheckpointCallback(**options)


def test_state_round_trips() -> None:
    callback = TrainingCheckpointCallback(every_n_steps=3)
    callback.last_step, callback.last_boundary = 9, 12
    restored = TrainingCheckpointCallback(every_n_steps=3)
    restored.load_state_dict(callback.state_dict())
    assert (restored.last_step, restored.last_boundary) == (9, 12)


def test_it_is_a_default_and_can_be_switched_off_or_replaced(maps_path: Path) -> None:
    from tests.conftest import make_model

    default = Trainer(maps_path, make_model())
    assert [type(c) for c in default.callbacks].count(TrainingCheckpointCallback) == 1
    off = Trainer(maps_path, make_model(), default_callbacks={TrainingCheckpointCallback: False})
    assert TrainingCheckpointCallback not in [type(c) for c in off.callbacks]
    mine = TrainingCheckpointCallback(every_n_steps=5)
    replaced = Trainer(maps_path, make_model(), callbacks=[mine])
    assert [c for c in replaced.callbacks if isinstance(c, TrainingCheckpointCallback)] == [mine]


def test_it_decides_after_every_other_epoch_end_handler_but_the_monitor_and_logger(
    maps_path: Path,
) -> None:
    from tests.conftest import make_model

    trainer = Trainer(
        maps_path,
        make_model(),
        callbacks=[EarlyStoppingCallback("loss"), ModelCheckpointCallback("loss")],
    )
    trainer.on("epoch_end", id="user.report")(lambda: None)
    order = [row["id"].split(".")[0] for row in trainer.plan("epoch_end")]
    position = order.index("TrainingCheckpointCallback")
    assert {"user", "ModelCheckpointCallback"} <= set(order[:position])
    assert set(order[position + 1 :]) == {MonitorCallback.__name__, LoggerCallback.__name__}
