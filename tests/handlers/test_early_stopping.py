from __future__ import annotations

import functools
import inspect
import json
import math
import re
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
from torch import nn

from trainbus import (
    EarlyStoppingCallback,
    LossMetricConfig,
    SaveCheckpoint,
    Stop,
    SupervisedModel,
    Trainer,
    TrainerState,
    TrainingCheckpointCallback,
)
from trainbus.engine import checkpoint
from trainbus.errors import ConfigurationError, ConfigurationTypeError, TrainbusWarning
from trainbus.events.commands import Command

from ..conftest import make_loader, make_model

STOPPER = "EarlyStoppingCallback.on_validation_end"
TAG = "early-stopping-best-score"
BATCHES = 6  # make_loader(): 48 samples in batches of 8
nan = math.nan
inf = math.inf
SCORE = {"score": LossMetricConfig(loss_name="score")}


class ScriptedScoreModel(SupervisedModel):
    """Reports the next scripted value as ``score`` at each validation (one batch each).

    The position in the script is a buffer, so it is saved with the weights and a resumed run
    continues the script where the interrupted one left it.
    """

    validations: torch.Tensor

    def __init__(self, values: Sequence[float]) -> None:
        super().__init__(
            make_model().network,
            nn.CrossEntropyLoss(),
            optimizer=functools.partial(torch.optim.SGD, lr=0.05),
        )
        self.values = list(values)
        self.register_buffer("validations", torch.zeros((), dtype=torch.long))

    def evaluation_step(self, batch: Any) -> Mapping[str, Any]:
        outputs = dict(super().evaluation_step(batch))
        outputs["score"] = torch.tensor(self.values[int(self.validations)])
        self.validations += 1
        return outputs


def run_with_scores(
    quiet_trainer: Callable[..., Trainer],
    values: Sequence[float],
    *callbacks: EarlyStoppingCallback,
    **options: Any,
) -> tuple[Trainer, TrainerState, list[float], list[dict[str, torch.Tensor]]]:
    """Train on scripted scores; returns the seen scores and the weights at each validation."""
    settings: dict[str, Any] = {"max_epochs": len(values), "metrics": SCORE, **options}
    trainer = quiet_trainer(model=ScriptedScoreModel(values), callbacks=list(callbacks), **settings)
    seen: list[float] = []
    weights: list[dict[str, torch.Tensor]] = []

    @trainer.on("validation_end", priority=100)
    def record(*, metrics: Mapping[str, float], model: nn.Module) -> None:
        seen.append(metrics["score"])
        weights.append({k: v.detach().clone() for k, v in model.state_dict().items()})

    state = trainer.train(make_loader(), make_loader(8, seed=1))
    return trainer, state, seen, weights


def same_weights(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def patience_reason(
    wait: int, best: float, epoch: int, settings: str = "mode=min", epochs: int | str = "{n}"
) -> str:
    """The reason of a patience stop; ``epoch`` is 0-based, the reason counts from 1.

    ``epochs`` is ``max_epochs``; the scripted table leaves ``{n}`` to fill with its length.
    """
    return (
        f"score did not improve for {wait} validations; best {best!r} at epoch {epoch + 1}/"
        f"{epochs} ({settings})"
    )


# ---------------------------------------------------------------------- decisions in training
@pytest.mark.parametrize(
    ("options", "values", "stopped_after", "reason"),
    [
        pytest.param(
            {"mode": "min", "patience": 2}, [4, 3, 2, 1, 0.5], None, None, id="min-improving"
        ),
        pytest.param(
            {"mode": "min", "patience": 2},
            [1, 2, 2, 2, 2],
            3,
            patience_reason(2, 1.0, 0, "mode=min, min_delta=0.0"),
            id="min-worse",
        ),
        pytest.param(
            {"mode": "min", "patience": 1},
            [1, 1, 0.5, 0.25],
            2,
            patience_reason(1, 1.0, 0, "mode=min, min_delta=0.0"),
            id="min-equal-is-no-gain",
        ),
        pytest.param(
            {"mode": "min", "patience": 2, "min_delta": 0.5},
            [4, 3.75, 3.5, 3, 2],
            3,
            patience_reason(2, 4.0, 0, "mode=min, min_delta=0.5"),
            id="min-below-delta",
        ),
        pytest.param(
            {"mode": "min", "patience": 2, "min_delta": 0.5},
            [4, 3.25, 2.5, 1.75, 1],
            None,
            None,
            id="min-beyond-delta",
        ),
        pytest.param(
            {"mode": "max", "patience": 2},
            [1, 2, 3, 2, 1, 0],
            5,
            patience_reason(2, 3.0, 2, "mode=max, min_delta=0.0"),
            id="max-falls",
        ),
        pytest.param(
            {"mode": "max", "patience": 3},
            [1, 2, 1, 3, 2, 1, 0.5, 4],
            7,
            patience_reason(3, 3.0, 3, "mode=max, min_delta=0.0"),
            id="max-wait-resets",
        ),
        pytest.param(
            {"mode": "max", "patience": 1, "min_delta": 0.25},
            [1, 1.25, 1.5],
            2,
            patience_reason(1, 1.0, 0, "mode=max, min_delta=0.25"),
            id="max-exactly-delta-is-no-gain",
        ),
        pytest.param(
            {"mode": "min", "patience": 1, "min_delta": 0.125, "min_delta_mode": "rel"},
            [8, 7.5, 7],
            2,
            patience_reason(1, 8.0, 0, "mode=min, min_delta=0.125 relative"),
            id="rel-min-margin-is-a-fraction-of-best",
        ),
        pytest.param(
            {"mode": "min", "patience": 1, "min_delta": 0.125, "min_delta_mode": "rel"},
            [8, 6.5, 5.75],
            3,
            patience_reason(1, 6.5, 1, "mode=min, min_delta=0.125 relative"),
            id="rel-min-margin-follows-best",
        ),
        pytest.param(
            {"mode": "max", "patience": 1, "min_delta": 0.5, "min_delta_mode": "rel"},
            [-4, -1.5, -1],
            3,
            patience_reason(1, -1.5, 1, "mode=max, min_delta=0.5 relative"),
            id="rel-max-uses-abs-of-a-negative-best",
        ),
        pytest.param(
            {"mode": "min", "patience": 10, "stopping_threshold": 1.0},
            [4, 2, 1, 0.5],
            3,
            "score reached stopping_threshold=1.0: 1.0 at epoch 3/{n}; best 1.0 at epoch 3/{n}",
            id="goal-min-reached-at-equality",
        ),
        pytest.param(
            {"mode": "max", "patience": 10, "stopping_threshold": 0.75},
            [0.25, 0.5, 0.875, 1],
            3,
            "score reached stopping_threshold=0.75: 0.875 at epoch 3/{n}; "
            "best 0.875 at epoch 3/{n}",
            id="goal-max-crossed",
        ),
        pytest.param(
            {"mode": "min", "patience": 10, "stopping_threshold": 2.0, "min_delta": 8.0},
            [4, 1.5],
            2,
            "score reached stopping_threshold=2.0: 1.5 at epoch 2/{n}; best 4.0 at epoch 1/{n}",
            id="goal-reached-without-improvement",
        ),
        pytest.param(
            {"mode": "min", "patience": 10, "divergence_threshold": 10.0},
            [4, 3, 16, 2],
            3,
            "score diverged: 16.0 at epoch 3/{n} is worse than divergence_threshold=10.0; "
            "best 3.0 at epoch 2/{n}",
            id="divergence-min",
        ),
        pytest.param(
            {"mode": "min", "patience": 10, "divergence_threshold": 10.0},
            [4, 10, 3],
            None,
            None,
            id="divergence-min-at-the-limit-goes-on",
        ),
        pytest.param(
            {"mode": "max", "patience": 10, "divergence_threshold": 0.5},
            [0.75, 0.875, 0.25, 1],
            3,
            "score diverged: 0.25 at epoch 3/{n} is worse than divergence_threshold=0.5; "
            "best 0.875 at epoch 2/{n}",
            id="divergence-max",
        ),
        pytest.param(
            {"mode": "min", "patience": 10},
            [1, 0.5, nan, 0.25],
            3,
            "score is nan at epoch 3/{n}, not a finite number; best 0.5 at epoch 2/{n}",
            id="check-finite-nan",
        ),
        pytest.param(
            {"mode": "min", "patience": 10},
            [1, inf, 0.5],
            2,
            "score is inf at epoch 2/{n}, not a finite number; best 1.0 at epoch 1/{n}",
            id="check-finite-inf",
        ),
        pytest.param(
            {"mode": "max", "patience": 10},
            [-inf, 1],
            1,
            "score is -inf at epoch 1/{n}, not a finite number; no best value yet",
            id="check-finite-first-value",
        ),
        pytest.param(
            {"mode": "min", "patience": 2, "check_finite": False},
            [1, nan, nan, 0.5],
            3,
            patience_reason(2, 1.0, 0, "mode=min, min_delta=0.0"),
            id="unchecked-nan-never-improves",
        ),
        pytest.param(
            {"mode": "min", "patience": 2, "check_finite": False},
            [1, nan, 0.5, nan, 0.25],
            None,
            None,
            id="unchecked-nan-then-recovery",
        ),
        pytest.param(
            {"mode": "min", "patience": 2, "check_finite": False},
            [nan, nan, 1],
            2,
            "score did not improve for 2 validations; no best value yet (mode=min, min_delta=0.0)",
            id="unchecked-only-nan",
        ),
        pytest.param(
            {
                "mode": "min",
                "patience": 1,
                "check_finite": False,
                "min_delta": 0.5,
                "min_delta_mode": "rel",
            },
            [inf, 4, 3],
            3,
            patience_reason(1, 4.0, 1, "mode=min, min_delta=0.5 relative"),
            id="unchecked-infinite-best-is-beaten",
        ),
        pytest.param(
            {"mode": "min", "patience": 1, "start_from_epoch": 2},
            [1, 2, 3, 4, 5],
            4,
            patience_reason(1, 3.0, 2, "mode=min, min_delta=0.0"),
            id="warm-up-ignores-early-validations",
        ),
        pytest.param(
            {
                "mode": "min",
                "patience": 1,
                "start_from_epoch": 2,
                "stopping_threshold": 1.0,
                "divergence_threshold": 32.0,
            },
            [0.5, nan, 16, 4, 4, 4],
            5,
            patience_reason(1, 4.0, 3, "mode=min, min_delta=0.0"),
            id="warm-up-never-stops",
        ),
    ],
)
def test_stop_decisions_over_scripted_metric_sequences(
    quiet_trainer: Callable[..., Trainer],
    options: dict[str, Any],
    values: list[float],
    stopped_after: int | None,
    reason: str | None,
) -> None:
    callback = EarlyStoppingCallback("score", **options)
    trainer, state, seen, _ = run_with_scores(quiet_trainer, values, callback)
    validations = stopped_after or len(values)
    assert len(seen) == validations
    assert state.current_epoch == validations - 1
    reason = None if reason is None else reason.format(n=len(values))
    assert state.stop_reason == reason
    assert state.stopped_by == (None if reason is None else STOPPER)
    recorded = trainer.maps.read_json("maps.json")["calls"][-1]
    if reason is None:
        assert recorded["status"] == "completed"
        assert "stop" not in recorded
    else:
        assert recorded["status"] == "stopped"
        assert recorded["stop"] == {"by": STOPPER, "reason": reason, "resumable": False}


def test_patience_counts_validations_not_epochs(quiet_trainer: Callable[..., Trainer]) -> None:
    callback = EarlyStoppingCallback("score", patience=2, mode="min")
    _, state, seen, _ = run_with_scores(
        quiet_trainer, [1, 2, 3, 4], callback, max_epochs=8, val_every_n_epochs=2
    )
    assert seen == [1.0, 2.0, 3.0]
    assert state.current_epoch == 5
    assert state.stop_reason == patience_reason(2, 1.0, 1, "mode=min, min_delta=0.0", 8)
    assert (callback.best, callback.best_epoch, callback.wait) == (1.0, 1, 2)


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
    assert losses[1] < losses[0]
    assert state.current_epoch == 1
    assert state.stopped_by == STOPPER
    assert callback.best == losses[0]
    assert state.stop_reason == (
        f"loss did not improve for 1 validations; best {losses[0]!r} at epoch 1/5 "
        "(mode=min, min_delta=10.0)"
    )


# ------------------------------------------------------------------- pure decision table
def feed(callback: EarlyStoppingCallback, values: Sequence[float]) -> list[list[Command] | None]:
    """Call the handler once per value, as validations of epochs 0, 1, ... would."""
    decisions = []
    for epoch, value in enumerate(values):
        state = TrainerState(
            stage="validation",
            current_epoch=epoch,
            max_epochs=len(values),
            iteration=(epoch + 1) * BATCHES,
        )
        decisions.append(callback.on_validation_end(state=state, metrics={"score": value}))
    return decisions


def kinds(decisions: Sequence[Sequence[object] | None]) -> list[str]:
    return [
        "+".join(type(c).__name__ for c in decision) if decision else "-" for decision in decisions
    ]


@pytest.mark.parametrize(
    ("options", "values", "expected"),
    [
        pytest.param(
            {"patience": 2},
            [3, 2, 2.5, 1, 1, 1],
            ["SaveCheckpoint", "SaveCheckpoint", "-", "SaveCheckpoint", "-", "Stop"],
            id="save-at-each-improvement",
        ),
        pytest.param(
            {"patience": 5, "stopping_threshold": 1.0},
            [3, 1],
            ["SaveCheckpoint", "SaveCheckpoint+Stop"],
            id="improvement-that-reaches-the-goal-is-saved-too",
        ),
        pytest.param(
            {"patience": 5, "start_from_epoch": 2},
            [3, 2, 4, 1],
            ["-", "-", "SaveCheckpoint", "SaveCheckpoint"],
            id="nothing-saved-during-warm-up",
        ),
        pytest.param(
            {"patience": 5},
            [3, nan],
            ["SaveCheckpoint", "Stop"],
            id="non-finite-stops-without-save",
        ),
    ],
)
def test_restore_best_weights_asks_for_a_save_at_each_improvement(
    options: dict[str, Any], values: list[float], expected: list[str]
) -> None:
    callback = EarlyStoppingCallback("score", mode="min", restore_best_weights=True, **options)
    decisions = feed(callback, values)
    assert kinds(decisions) == expected
    saves = [c for d in decisions if d for c in d if isinstance(c, SaveCheckpoint)]
    assert {save.tag for save in saves} == {TAG}
    assert dict(saves[-1].metadata) == {"metric": "score", "value": callback.best, "mode": "min"}


@pytest.mark.parametrize(
    ("values", "best", "best_epoch", "wait"),
    [
        ([3, 2, 2.5], 2.0, 1, 1),
        ([nan], None, None, 1),
        ([5, 4, 3, 3, 3.5], 3.0, 2, 2),
    ],
)
def test_without_restore_no_save_is_asked_and_counters_follow_the_values(
    values: list[float], best: float | None, best_epoch: int | None, wait: int
) -> None:
    callback = EarlyStoppingCallback("score", 10, mode="min", check_finite=False)
    decisions = feed(callback, values)
    assert decisions == [None] * len(values)
    assert (callback.best, callback.best_epoch, callback.wait) == (best, best_epoch, wait)
    assert callback.best_iteration == (None if best_epoch is None else (best_epoch + 1) * BATCHES)


# ------------------------------------------------------------------------- options
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
        # Left to the metric the Trainer binds (tests/handlers/test_monitored.py).
        ("accuracy", None, None),
        ("f1", None, None),
    ],
)
def test_mode_is_inferred_for_loss_like_names_or_taken_as_given(
    metric: str, mode: str | None, expected: str | None
) -> None:
    assert EarlyStoppingCallback(metric, mode=mode).mode == expected  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("arguments", "error", "message"),
    [
        ({"metric": ""}, ConfigurationError, r"metric='' is not a metric name"),
        ({"metric": 3}, ConfigurationTypeError, r"metric=3 is not a string"),
        ({"patience": 0}, ConfigurationError, r"patience=0 is not a positive integer"),
        ({"patience": -2}, ConfigurationError, r"patience=-2 is not a positive integer"),
        ({"patience": 2.0}, ConfigurationTypeError, r"patience=2\.0 is not a positive integer"),
        ({"patience": True}, ConfigurationTypeError, r"patience=True is not a positive integer"),
        ({"mode": "down"}, ConfigurationError, r"mode='down' is not 'min' or 'max'"),
        ({"min_delta": -0.1}, ConfigurationError, r"min_delta=-0\.1 is not a finite number >= 0"),
        ({"min_delta": inf}, ConfigurationError, r"min_delta=inf is not a finite number"),
        ({"min_delta": nan}, ConfigurationError, r"min_delta=nan is not a finite number"),
        ({"min_delta": "0.1"}, ConfigurationTypeError, r"min_delta='0\.1' is not a number"),
        ({"min_delta": True}, ConfigurationTypeError, r"min_delta=True is not a number"),
        (
            {"min_delta_mode": "relative"},
            ConfigurationError,
            r"min_delta_mode='relative' is not 'abs' or 'rel'",
        ),
        (
            {"stopping_threshold": nan},
            ConfigurationError,
            r"stopping_threshold=nan is not a finite number; pass a finite float or None",
        ),
        (
            {"stopping_threshold": "1"},
            ConfigurationTypeError,
            r"stopping_threshold='1' is not a number or None",
        ),
        (
            {"divergence_threshold": inf},
            ConfigurationError,
            r"divergence_threshold=inf is not a finite number",
        ),
        (
            {"divergence_threshold": False},
            ConfigurationTypeError,
            r"divergence_threshold=False is not a number or None",
        ),
        (
            {"stopping_threshold": 2.0, "divergence_threshold": 1.0},
            ConfigurationError,
            r"stopping_threshold=2\.0 is not below divergence_threshold=1\.0 for mode='min'",
        ),
        (
            {"stopping_threshold": 1.0, "divergence_threshold": 1.0},
            ConfigurationError,
            r"stopping_threshold=1\.0 is not below divergence_threshold=1\.0",
        ),
        (
            {"mode": "max", "stopping_threshold": 0.5, "divergence_threshold": 0.9},
            ConfigurationError,
            r"stopping_threshold=0\.5 is not above divergence_threshold=0\.9 for mode='max'",
        ),
        ({"check_finite": "yes"}, ConfigurationTypeError, r"check_finite='yes' is not a bool"),
        ({"check_finite": 1}, ConfigurationTypeError, r"check_finite=1 is not a bool"),
        (
            {"restore_best_weights": None},
            ConfigurationTypeError,
            r"restore_best_weights=None is not a bool",
        ),
        (
            {"start_from_epoch": -1},
            ConfigurationError,
            r"start_from_epoch=-1 is negative; pass the 0-based epoch",
        ),
        (
            {"start_from_epoch": 1.0},
            ConfigurationTypeError,
            r"start_from_epoch=1\.0 is not an integer",
        ),
        (
            {"start_from_epoch": True},
            ConfigurationTypeError,
            r"start_from_epoch=True is not an integer",
        ),
    ],
)
def test_bad_early_stopping_arguments_are_refused(
    arguments: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=rf"^EarlyStoppingCallback: {message}"):
        EarlyStoppingCallback(**{"metric": "loss", **arguments})


def test_config_holds_every_option_and_reaches_maps_json(
    quiet_trainer: Callable[..., Trainer],
) -> None:
    callback = EarlyStoppingCallback(
        "score",
        3,
        mode="max",
        min_delta=0.25,
        min_delta_mode="rel",
        stopping_threshold=8.0,
        divergence_threshold=-1.0,
        check_finite=False,
        start_from_epoch=1,
        restore_best_weights=True,
    )
    options = set(inspect.signature(EarlyStoppingCallback).parameters)
    assert callback.config() == {
        "metric": "score",
        "patience": 3,
        "mode": "max",
        "min_delta": 0.25,
        "min_delta_mode": "rel",
        "stopping_threshold": 8.0,
        "divergence_threshold": -1.0,
        "check_finite": False,
        "start_from_epoch": 1,
        "restore_best_weights": True,
    }
    assert set(callback.config()) == options
    assert callback.metric_names() == ("score",)
    trainer, _, _, _ = run_with_scores(quiet_trainer, [1, 2], callback)
    entries = trainer.maps.read_json("maps.json")["callbacks"]
    assert [e["config"] for e in entries if e["id"] == "EarlyStoppingCallback"] == [
        callback.config()
    ]


# ------------------------------------------------------------------ checkpoint tag
@pytest.mark.parametrize(
    ("metric", "callback_id", "expected"),
    [
        ("loss", None, "early-stopping-best-loss"),
        ("loss", "EarlyStoppingCallback#2", "early-stopping-2-best-loss"),
        ("val/loss", None, "early-stopping-best-val-loss"),
        ("top 1..error", None, "early-stopping-best-top-1.error"),
        ("loss", "stopper", "early-stopping-id-stopper-best-loss"),
        ("loss", "2", "early-stopping-id-2-best-loss"),
    ],
)
def test_checkpoint_tag_is_safe_and_unique_to_the_callback(
    metric: str, callback_id: str | None, expected: str
) -> None:
    callback = EarlyStoppingCallback(metric)
    if callback_id is not None:
        callback.callback_id = callback_id
    assert callback.checkpoint_tag == expected
    assert SaveCheckpoint(callback.checkpoint_tag).tag == expected


def test_ids_rewritten_to_the_same_text_still_get_distinct_tags() -> None:
    tags = []
    for callback_id in ("my stopper", "my/stopper", "my-stopper"):
        callback = EarlyStoppingCallback("loss")
        callback.callback_id = callback_id
        tags.append(SaveCheckpoint(callback.checkpoint_tag).tag)
    assert re.fullmatch(r"early-stopping-id-my-stopper-[0-9a-f]{8}-best-loss", tags[0])
    assert re.fullmatch(r"early-stopping-id-my-stopper-[0-9a-f]{8}-best-loss", tags[1])
    assert tags[2] == "early-stopping-id-my-stopper-best-loss"
    assert len(set(tags)) == 3


def test_a_long_metric_name_gives_a_tag_within_the_limit() -> None:
    first = EarlyStoppingCallback("loss_" + "x" * 200)
    second = EarlyStoppingCallback("loss_" + "x" * 199 + "y")
    assert len(first.checkpoint_tag) == len(second.checkpoint_tag) == 128
    assert first.checkpoint_tag != second.checkpoint_tag
    assert SaveCheckpoint(first.checkpoint_tag).tag.startswith("early-stopping-best-loss_xxx")


def test_two_instances_in_one_trainer_get_distinct_tags(
    quiet_trainer: Callable[..., Trainer],
) -> None:
    first = EarlyStoppingCallback("loss", restore_best_weights=True)
    second = EarlyStoppingCallback("loss", patience=3, restore_best_weights=True)
    quiet_trainer(callbacks=[first, second])
    assert (first.callback_id, second.callback_id) == (
        "EarlyStoppingCallback",
        "EarlyStoppingCallback#2",
    )
    assert (first.checkpoint_tag, second.checkpoint_tag) == (
        "early-stopping-best-loss",
        "early-stopping-2-best-loss",
    )


# ------------------------------------------------------------ restore best weights
@pytest.mark.parametrize("restore", [True, False])
def test_restore_best_weights_leaves_the_best_checkpoint_in_the_model(
    quiet_trainer: Callable[..., Trainer], restore: bool
) -> None:
    callback = EarlyStoppingCallback("score", 3, mode="min", restore_best_weights=restore)
    trainer, state, seen, weights = run_with_scores(
        quiet_trainer, [3, 1, 2, 2.5, 2.75, 3], callback
    )
    assert seen == [3.0, 1.0, 2.0, 2.5, 2.75]
    assert state.stop_reason == patience_reason(3, 1.0, 1, "mode=min, min_delta=0.0", 6)
    final = trainer.model.state_dict()
    assert not same_weights(weights[1], weights[-1])
    saved = trainer.maps.path / "checkpoints" / TAG
    if not restore:
        assert same_weights(final, weights[-1])
        assert not saved.exists()
        assert callback.best_checkpoint is None
        return
    assert same_weights(final, weights[1])
    assert callback.best_checkpoint == saved
    manifest = checkpoint.read_manifest(saved)
    assert manifest["tag"] == TAG
    assert manifest["metadata"]["epoch"] == 1
    assert manifest["metadata"]["iteration"] == 2 * BATCHES
    assert manifest["metadata"]["value"] == 1.0
    assert manifest["metadata"]["requested_by"] == STOPPER
    assert same_weights(safetensors.torch.load_file(str(saved / "model.safetensors")), final)


def test_two_restoring_callbacks_keep_their_own_checkpoints(
    quiet_trainer: Callable[..., Trainer],
) -> None:
    by_score = EarlyStoppingCallback("score", 10, mode="min", restore_best_weights=True)
    by_loss = EarlyStoppingCallback("loss", 10, restore_best_weights=True)
    trainer, _, _, weights = run_with_scores(
        quiet_trainer,
        [2, 1, 3],
        by_score,
        by_loss,
        metrics={**SCORE, "loss": LossMetricConfig()},
    )
    root = trainer.maps.path / "checkpoints"
    assert by_score.best_checkpoint == root / TAG
    assert by_loss.best_checkpoint == root / "early-stopping-2-best-loss"
    assert checkpoint.read_manifest(root / TAG)["metadata"]["epoch"] == 1
    assert checkpoint.read_manifest(root / "early-stopping-2-best-loss")["metadata"]["epoch"] == 2
    assert same_weights(
        safetensors.torch.load_file(str(root / TAG / "model.safetensors")), weights[1]
    )


@pytest.mark.parametrize(
    ("iteration", "loads"),
    [
        pytest.param(2 * BATCHES, False, id="model-holds-the-best-weights"),
        pytest.param(3 * BATCHES, True, id="model-trained-past-the-best"),
    ],
)
def test_the_end_of_training_loads_the_best_weights_only_when_the_model_lacks_them(
    tmp_path: Path, iteration: int, loads: bool
) -> None:
    callback = EarlyStoppingCallback("score", mode="min", restore_best_weights=True)
    best_model = make_model(seed=1)
    path = checkpoint.write_checkpoint(
        tmp_path,
        TAG,
        {"model.safetensors": lambda p: checkpoint.save_model_file(best_model, p)},
        kind="weights",
        metadata={"iteration": 2 * BATCHES},
    )
    feed(callback, [3, 1])
    callback.on_checkpoint(
        state=TrainerState(iteration=2 * BATCHES), checkpoint=path, tag=TAG, kind="weights"
    )
    current = make_model(seed=2)
    before = {k: v.clone() for k, v in current.state_dict().items()}
    callback.on_train_end(state=TrainerState(iteration=iteration))
    assert same_weights(current.state_dict(), before)  # the final training state keeps these
    callback.on_teardown(model=current)
    assert same_weights(current.state_dict(), best_model.state_dict()) is loads
    assert same_weights(current.state_dict(), before) is not loads


@pytest.mark.parametrize(
    ("tag", "kind", "recorded"),
    [(TAG, "weights", True), ("best-score", "weights", False), (TAG, "training", False)],
)
def test_only_its_own_weights_checkpoint_is_remembered(
    tmp_path: Path, tag: str, kind: str, recorded: bool
) -> None:
    callback = EarlyStoppingCallback("score", mode="min", restore_best_weights=True)
    callback.on_checkpoint(
        state=TrainerState(iteration=6), checkpoint=tmp_path / tag, tag=tag, kind=kind
    )
    assert callback.best_checkpoint == (tmp_path / tag if recorded else None)
    assert callback.checkpoint_iteration == (6 if recorded else None)


# -------------------------------------------------------------------------- state
@pytest.mark.parametrize(
    ("options", "values", "expected"),
    [
        pytest.param(
            {"patience": 3},
            [1.0, 2.0, 2.0],
            {"best": 1.0, "best_epoch": 0, "best_iteration": 6, "wait": 2},
            id="waiting",
        ),
        pytest.param(
            {"patience": 3, "start_from_epoch": 5},
            [1.0, 2.0],
            {"best": None, "best_epoch": None, "best_iteration": None, "wait": 0},
            id="warming-up",
        ),
        pytest.param(
            {"patience": 5, "check_finite": False},
            [4.0, 3.0, nan, 3.5],
            {"best": 3.0, "best_epoch": 1, "best_iteration": 12, "wait": 2},
            id="after-nan",
        ),
    ],
)
def test_state_dict_round_trip_gives_the_same_decisions(
    options: dict[str, Any], values: list[float], expected: dict[str, Any], tmp_path: Path
) -> None:
    original = EarlyStoppingCallback("score", mode="min", restore_best_weights=True, **options)
    feed(original, values)
    original.on_checkpoint(
        state=TrainerState(iteration=6), checkpoint=tmp_path / TAG, tag=TAG, kind="weights"
    )
    saved = original.state_dict()
    assert {k: saved[k] for k in expected} == expected
    assert saved["best_checkpoint"] == str(tmp_path / TAG)
    assert saved["checkpoint_iteration"] == 6
    torch.save(saved, tmp_path / "state.pt")
    through_torch = torch.load(tmp_path / "state.pt", weights_only=True)
    through_json = json.loads(json.dumps(saved))
    for loaded in (through_torch, through_json):
        restored = EarlyStoppingCallback("score", mode="min", restore_best_weights=True, **options)
        restored.load_state_dict(loaded)
        assert restored.state_dict() == saved
        assert restored.best_checkpoint == tmp_path / TAG
    tail = [0.5, 5.0, 5.0, 5.0, 5.0, 5.0]
    restored = EarlyStoppingCallback("score", mode="min", restore_best_weights=True, **options)
    restored.load_state_dict(through_torch)
    states = [
        TrainerState(current_epoch=len(values) + i, iteration=(len(values) + i + 1) * BATCHES)
        for i in range(len(tail))
    ]
    assert [
        restored.on_validation_end(state=s, metrics={"score": v})
        for s, v in zip(states, tail, strict=True)
    ] == [
        original.on_validation_end(state=s, metrics={"score": v})
        for s, v in zip(states, tail, strict=True)
    ]


def test_a_state_without_the_newer_keys_still_loads() -> None:
    callback = EarlyStoppingCallback("loss", patience=3)
    callback.load_state_dict({"best": 1.0, "wait": 2})
    assert (callback.best, callback.wait, callback.best_epoch) == (1.0, 2, None)
    decision = callback.on_validation_end(
        state=TrainerState(current_epoch=3), metrics={"loss": 1.5}
    )
    assert decision == [
        Stop("loss did not improve for 3 validations; best 1.0 (mode=min, min_delta=0.0)")
    ]


@pytest.mark.parametrize(
    ("saved", "message"),
    [
        ({"metric": "accuracy", "mode": "max", "best": 0.9, "wait": 4}, r"monitors 'accuracy'"),
        ({"metric": "loss", "mode": "max", "best": 0.9, "wait": 4}, r"\(mode='max'\)"),
    ],
)
def test_a_state_of_another_metric_or_mode_is_not_used(saved: dict[str, Any], message: str) -> None:
    callback = EarlyStoppingCallback("loss", patience=5)
    with pytest.warns(TrainbusWarning, match=message):
        callback.load_state_dict(saved)
    assert (callback.best, callback.wait) == (None, 0)


# -------------------------------------------------------------------------- reset
def test_reset_forgets_the_best_value_the_patience_count_and_the_checkpoint(
    tmp_path: Path,
) -> None:
    options: dict[str, Any] = {"mode": "min", "min_delta": 0.1, "restore_best_weights": True}
    callback = EarlyStoppingCallback("score", 3, **options)
    feed(callback, [3, 1, 2])
    callback.on_checkpoint(
        state=TrainerState(iteration=2 * BATCHES),
        checkpoint=tmp_path / TAG,
        tag=TAG,
        kind="weights",
    )
    callback.on_train_end(state=TrainerState(iteration=3 * BATCHES))  # a restore is pending
    fresh = EarlyStoppingCallback("score", 3, **options)
    assert callback.state_dict() != fresh.state_dict()

    callback.reset()

    assert callback.state_dict() == fresh.state_dict()
    assert vars(callback) == vars(fresh)
    assert callback.config() == fresh.config()


def test_a_callback_reset_for_a_second_trainer_decides_like_a_fresh_one(
    quiet_trainer: Callable[..., Trainer], tmp_path: Path
) -> None:
    reused = EarlyStoppingCallback("score", 2, mode="min", restore_best_weights=True)
    _, first, _, _ = run_with_scores(quiet_trainer, [0.5, 0.6, 0.7], reused)
    assert first.stop_reason == patience_reason(2, 0.5, 0, "mode=min, min_delta=0.0", 3)
    values = [3, 2, 1, 1.5, 1.5, 0.1]

    reused.reset()
    trainer, state, seen, weights = run_with_scores(
        functools.partial(quiet_trainer, maps=tmp_path / "second"), values, reused
    )
    fresh = EarlyStoppingCallback("score", 2, mode="min", restore_best_weights=True)
    _, expected, _, _ = run_with_scores(
        functools.partial(quiet_trainer, maps=tmp_path / "fresh"), values, fresh
    )

    assert seen == [3.0, 2.0, 1.0, 1.5, 1.5]
    assert state.stop_reason == expected.stop_reason
    assert state.stop_reason == patience_reason(2, 1.0, 2, "mode=min, min_delta=0.0", 6)
    saved = trainer.maps.path / "checkpoints" / TAG
    assert reused.best_checkpoint == saved
    assert checkpoint.read_manifest(saved)["metadata"]["epoch"] == 2
    assert same_weights(trainer.model.state_dict(), weights[2])
    ignored = {"best_checkpoint"}  # each in its own MAPS
    assert {k: v for k, v in reused.state_dict().items() if k not in ignored} == {
        k: v for k, v in fresh.state_dict().items() if k not in ignored
    }


# -------------------------------------------------------------------------- resume
class SimulatedCrashError(Exception):
    """Raised inside training to stand for a crash right after a training state was written."""


RESUME_VALUES = [3, 2, 1, 1.5, 2, 2.5, 3, 3]


def resume_run(
    maps: Path, *, restore: bool, interrupt_at: int | None = None
) -> tuple[Trainer, EarlyStoppingCallback]:
    callback = EarlyStoppingCallback("score", 3, mode="min", restore_best_weights=restore)
    trainer = Trainer(
        maps,
        ScriptedScoreModel(RESUME_VALUES),
        metrics=SCORE,
        callbacks=[callback, TrainingCheckpointCallback(every_n_steps=4)],
        default_callbacks=False,
        max_epochs=len(RESUME_VALUES),
    )
    if interrupt_at is not None:

        @trainer.on("checkpoint")
        def interrupt(*, state: TrainerState, kind: str) -> None:
            if kind == "training" and state.iteration == interrupt_at:
                raise SimulatedCrashError

    return trainer, callback


@pytest.mark.parametrize(
    ("restore", "interrupt_at", "move"),
    [
        pytest.param(False, 4, False, id="before-any-validation"),
        pytest.param(False, 20, False, id="mid-epoch-after-the-best"),
        pytest.param(False, 28, False, id="mid-epoch-while-waiting"),
        pytest.param(True, 20, False, id="restore-mid-epoch-after-the-best"),
        pytest.param(True, 28, True, id="restore-from-a-moved-maps"),
        pytest.param(True, 18, False, id="restore-crash-before-the-best-was-saved"),
    ],
)
def test_a_resumed_run_takes_the_same_stop_decision(
    tmp_path: Path, restore: bool, interrupt_at: int, move: bool
) -> None:
    loaders = (make_loader(), make_loader(8, seed=1))
    whole, whole_callback = resume_run(tmp_path / "whole", restore=restore)
    expected = whole.train(*loaders)
    assert expected.stopped_by == STOPPER
    assert expected.current_epoch == 5

    interrupted, _ = resume_run(tmp_path / "cut", restore=restore, interrupt_at=interrupt_at)
    with pytest.raises(SimulatedCrashError):
        interrupted.train(*loaders)
    assert interrupted.state.iteration == interrupt_at
    maps = tmp_path / "cut"
    if move:
        maps = Path(shutil.move(maps, tmp_path / "moved"))
    callback = EarlyStoppingCallback("score", 3, mode="min", restore_best_weights=restore)
    resumed = Trainer.from_maps(
        maps,
        ScriptedScoreModel(RESUME_VALUES),
        metrics=SCORE,
        callbacks=[callback, TrainingCheckpointCallback(every_n_steps=4)],
        default_callbacks=False,
    )
    state = resumed.train(*loaders)

    assert (state.current_epoch, state.stopped_by, state.stop_reason) == (
        expected.current_epoch,
        expected.stopped_by,
        expected.stop_reason,
    )
    assert state.stop_reason == patience_reason(
        3, 1.0, 2, "mode=min, min_delta=0.0", len(RESUME_VALUES)
    )
    calls = resumed.maps.read_json("maps.json")["calls"]
    assert calls[-1]["stop"] == {
        "by": STOPPER,
        "reason": expected.stop_reason,
        "resumable": False,
    }
    assert calls[-1]["resumed_from"]["iteration"] == interrupt_at
    ignored = {"best_checkpoint"}
    assert {k: v for k, v in callback.state_dict().items() if k not in ignored} == {
        k: v for k, v in whole_callback.state_dict().items() if k not in ignored
    }
    assert same_weights(resumed.model.state_dict(), whole.model.state_dict())
    if restore:
        assert callback.best_checkpoint == maps / "checkpoints" / TAG
        assert checkpoint.read_manifest(maps / "checkpoints" / TAG)["metadata"]["epoch"] == 2
        assert same_weights(
            resumed.model.state_dict(),
            safetensors.torch.load_file(str(maps / "checkpoints" / TAG / "model.safetensors")),
        )
    else:
        assert callback.best_checkpoint is None


def test_a_resume_that_finds_the_best_weights_gone_warns_and_keeps_the_last(
    tmp_path: Path,
) -> None:
    loaders = (make_loader(), make_loader(8, seed=1))
    interrupted, _ = resume_run(tmp_path / "cut", restore=True, interrupt_at=20)
    with pytest.raises(SimulatedCrashError):
        interrupted.train(*loaders)
    shutil.rmtree(tmp_path / "cut" / "checkpoints" / TAG)
    callback = EarlyStoppingCallback("score", 3, mode="min", restore_best_weights=True)
    resumed = Trainer.from_maps(
        tmp_path / "cut",
        ScriptedScoreModel(RESUME_VALUES),
        metrics=SCORE,
        callbacks=[callback, TrainingCheckpointCallback(every_n_steps=4)],
        default_callbacks=False,
    )
    last: dict[str, torch.Tensor] = {}

    @resumed.on("epoch_end")
    def keep(*, model: nn.Module) -> None:
        last.update({k: v.detach().clone() for k, v in model.state_dict().items()})

    with pytest.warns(TrainbusWarning, match=r"best weights of score \(epoch 3/8\) are not in"):
        state = resumed.train(*loaders)
    assert state.stop_reason == patience_reason(
        3, 1.0, 2, "mode=min, min_delta=0.0", len(RESUME_VALUES)
    )
    assert callback.best_checkpoint is None
    assert not (tmp_path / "cut" / "checkpoints" / TAG).exists()
    assert same_weights(resumed.model.state_dict(), last)


def test_the_stop_request_is_recorded_once_in_maps_json(
    quiet_trainer: Callable[..., Trainer],
) -> None:
    callback = EarlyStoppingCallback("score", 1, mode="max")
    trainer, state, _, _ = run_with_scores(quiet_trainer, [2, 1, 3], callback)
    requests = trainer.maps.read_json("maps.json")["calls"][-1]["requests"]
    stops = [r for r in requests if r["command"].startswith("Stop(")]
    assert [(r["source"], r["event"]) for r in stops] == [(STOPPER, "validation_end")]
    reason = patience_reason(1, 2.0, 0, "mode=max, min_delta=0.0", 3)
    assert stops[0]["command"] == repr(Stop(reason))
    assert state.current_epoch == 1
