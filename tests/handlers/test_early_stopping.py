from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pytest
import torch
from torch import nn

from trainbus import (
    EarlyStoppingCallback,
    LossMetricConfig,
    Stop,
    SupervisedModel,
    Trainer,
    TrainerState,
)
from trainbus.errors import ConfigurationError

from ..conftest import make_loader, make_model

STOPPER = "EarlyStoppingCallback.on_validation_end"
nan = math.nan


class ScriptedScoreModel(SupervisedModel):
    """Reports the next scripted value as ``score`` at each validation (one batch each)."""

    def __init__(self, values: Sequence[float]) -> None:
        super().__init__(
            make_model().network,
            nn.CrossEntropyLoss(),
            optimizer=functools.partial(torch.optim.SGD, lr=0.05),
        )
        self.values = list(values)
        self.validations = 0

    def evaluation_step(self, batch: Any) -> Mapping[str, Any]:
        outputs = dict(super().evaluation_step(batch))
        outputs["score"] = torch.tensor(self.values[self.validations])
        self.validations += 1
        return outputs


def run_with_scores(
    quiet_trainer: Callable[..., Trainer], values: Sequence[float], callback: EarlyStoppingCallback
) -> tuple[TrainerState, list[float]]:
    trainer = quiet_trainer(
        model=ScriptedScoreModel(values),
        metrics={"score": LossMetricConfig(loss_name="score")},
        callbacks=[callback],
        max_epochs=len(values),
    )
    seen: list[float] = []

    @trainer.on("validation_end", priority=100)
    def record(*, metrics: Mapping[str, float]) -> None:
        seen.append(metrics["score"])

    state = trainer.train(make_loader(16), make_loader(8, seed=1))
    return state, seen


@pytest.mark.parametrize(
    ("mode", "min_delta", "patience", "values", "stopped_after", "best"),
    [
        pytest.param("min", 0.0, 2, [4, 3, 2, 1, 0.5], None, None, id="min-improving"),
        pytest.param("min", 0.0, 2, [1, 2, 2, 2, 2], 3, 1.0, id="min-worse"),
        pytest.param("min", 0.0, 1, [1, 1, 0.5, 0.25], 2, 1.0, id="min-equal-is-no-gain"),
        pytest.param("min", 0.5, 2, [4, 3.75, 3.5, 3, 2], 3, 4.0, id="min-below-delta"),
        pytest.param("min", 0.5, 2, [4, 3.25, 2.5, 1.75, 1], None, None, id="min-beyond-delta"),
        pytest.param("max", 0.0, 2, [1, 2, 3, 2, 1, 0], 5, 3.0, id="max-falls"),
        pytest.param("max", 0.0, 3, [1, 2, 1, 3, 2, 1, 0.5, 4], 7, 3.0, id="max-wait-resets"),
        pytest.param("max", 0.25, 1, [1, 1.25, 1.5], 2, 1.0, id="max-exactly-delta"),
        pytest.param("min", 0.0, 2, [1, nan, nan, 0.5], 3, 1.0, id="nan-never-improves"),
    ],
)
def test_early_stopping_over_scripted_metric_sequences(
    quiet_trainer: Callable[..., Trainer],
    mode: str,
    min_delta: float,
    patience: int,
    values: list[float],
    stopped_after: int | None,
    best: float | None,
) -> None:
    callback = EarlyStoppingCallback("score", patience, mode=mode, min_delta=min_delta)  # type: ignore[arg-type]
    state, seen = run_with_scores(quiet_trainer, values, callback)
    validations = stopped_after or len(values)
    assert len(seen) == validations
    assert state.current_epoch == validations - 1
    if stopped_after is None:
        assert state.stopped_by is None
        assert state.stop_reason is None
    else:
        assert state.stopped_by == STOPPER
        assert state.stop_reason == (
            f"score did not improve for {patience} validations "
            f"(best {best!r}, mode={mode}, min_delta={min_delta})"
        )
        assert callback.best == best
        assert callback.wait == patience


@pytest.mark.parametrize(
    ("metric", "mode", "expected"),
    [
        ("loss", None, "min"),
        ("val_loss", None, "min"),
        ("MSE", None, "min"),
        ("top1_error", None, "min"),
        ("perplexity", None, "min"),
        ("accuracy", "max", "max"),
        ("loss", "max", "max"),
        ("accuracy", "min", "min"),
    ],
)
def test_mode_is_inferred_for_loss_like_names_or_taken_as_given(
    metric: str, mode: str | None, expected: str
) -> None:
    assert EarlyStoppingCallback(metric, mode=mode).mode == expected  # type: ignore[arg-type]


@pytest.mark.parametrize("metric", ["accuracy", "f1", "auroc"])
def test_an_ambiguous_metric_without_mode_is_refused(metric: str) -> None:
    with pytest.raises(
        ConfigurationError,
        match=rf"EarlyStoppingCallback cannot tell whether '{metric}' should go up or down; "
        r"pass mode='min' or mode='max'",
    ):
        EarlyStoppingCallback(metric)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"metric": ""}, r"metric='' is not a metric name"),
        ({"metric": "loss", "patience": 0}, r"patience=0 is not a positive integer"),
        ({"metric": "loss", "patience": 2.0}, r"patience=2\.0 is not a positive integer"),
        ({"metric": "loss", "min_delta": -0.1}, r"min_delta=-0\.1 is not a finite number >= 0"),
        ({"metric": "loss", "min_delta": math.inf}, r"min_delta=inf is not a finite number"),
        ({"metric": "loss", "mode": "down"}, r"mode='down' is not 'min' or 'max'"),
    ],
)
def test_bad_early_stopping_arguments_are_refused(arguments: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        EarlyStoppingCallback(**arguments)


def test_state_dict_round_trip_resumes_the_patience_count() -> None:
    state = TrainerState(stage="validation")
    original = EarlyStoppingCallback("loss", patience=3)
    for value in (1.0, 2.0, 2.0):
        assert original.on_validation_end(state=state, metrics={"loss": value}) is None
    saved = json.loads(json.dumps(original.state_dict()))
    assert saved == {"best": 1.0, "wait": 2}

    restored = EarlyStoppingCallback("loss", patience=3)
    restored.load_state_dict(saved)
    fresh = EarlyStoppingCallback("loss", patience=3)
    decision = restored.on_validation_end(state=state, metrics={"loss": 1.5})
    assert isinstance(decision, Stop)
    assert "best 1.0" in decision.reason
    assert fresh.on_validation_end(state=state, metrics={"loss": 1.5}) is None


def test_early_stopping_on_a_real_validation_loss_names_metric_and_best(
    quiet_trainer: Callable[..., Trainer],
) -> None:
    callback = EarlyStoppingCallback("loss", patience=1, min_delta=10.0)
    trainer = quiet_trainer(callbacks=[callback], max_epochs=5)
    losses: list[float] = []

    @trainer.on("validation_end", priority=100)
    def record(*, metrics: Mapping[str, float]) -> None:
        losses.append(metrics["loss"])

    state = trainer.train(make_loader(), make_loader(16))
    assert len(losses) == 2
    assert state.current_epoch == 1
    assert state.stopped_by == STOPPER
    assert callback.best == losses[0]
    assert state.stop_reason == (
        f"loss did not improve for 1 validations (best {losses[0]!r}, mode=min, min_delta=10.0)"
    )
