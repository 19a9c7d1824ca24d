"""The monitored metric of early stopping and model checkpoints: its direction, and its absence.

``mode`` left out is taken from the metric bound to the Trainer (torchmetrics'
``higher_is_better``; a LossMetricConfig goes down; a loss's name goes down); a Trainer whose
metric tells nothing is refused; an explicit mode against the metric's declared direction
warns. A ``train()`` call that never validates warns that the metric is never computed.
"""

from __future__ import annotations

import functools
import json
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
import torchmetrics
import torchmetrics.aggregation
from torch import nn

from trainbus import (
    EarlyStoppingCallback,
    LossMetricConfig,
    ModelCheckpointCallback,
    SupervisedModel,
    TorchMetricConfig,
    Trainer,
    TrainerState,
    TrainingCheckpointCallback,
)
from trainbus.errors import ConfigurationError, TrainbusWarning

from ..conftest import make_loader, make_model

Monitoring = EarlyStoppingCallback | ModelCheckpointCallback
KINDS: tuple[type[Monitoring], ...] = (EarlyStoppingCallback, ModelCheckpointCallback)
ACCURACIES = [0.5, 1.0, 0.25, 0.375]
"""Scripted validation accuracies: the best is the second (the lowest is the third)."""


def accuracy() -> torchmetrics.Metric:
    return torchmetrics.Accuracy(task="multiclass", num_classes=2)


def monitoring(kind: type[Monitoring], metric: str, **options: Any) -> Monitoring:
    if kind is EarlyStoppingCallback:
        return EarlyStoppingCallback(metric, **options)
    return ModelCheckpointCallback(metric, **options)


class ScriptedAccuracyModel(SupervisedModel):
    """Predicts right the scripted share of each validation batch (one batch per validation).

    The position in the script is a buffer, so a resumed run continues the script.
    """

    validations: torch.Tensor

    def __init__(self, accuracies: Sequence[float]) -> None:
        super().__init__(
            make_model().network,
            nn.CrossEntropyLoss(),
            optimizer=functools.partial(torch.optim.SGD, lr=0.05),
        )
        self.accuracies = list(accuracies)
        self.register_buffer("validations", torch.zeros((), dtype=torch.long))

    def evaluation_step(self, batch: Any) -> Mapping[str, Any]:
        _, target = batch
        right = round(self.accuracies[int(self.validations)] * len(target))
        preds = torch.where(torch.arange(len(target)) < right, target, 1 - target)
        self.validations += 1
        return {"preds": preds, "target": target}


def scripted_trainer(path: Path, callbacks: list[Any], **options: Any) -> Trainer:
    settings: dict[str, Any] = {
        "metrics": {"accuracy": accuracy()},
        "default_callbacks": False,
        "max_epochs": len(ACCURACIES),
        **options,
    }
    return Trainer(path, ScriptedAccuracyModel(ACCURACIES), callbacks=callbacks, **settings)


# ----------------------------------------------------------------- direction from the metric
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    ("name", "spec", "expected"),
    [
        pytest.param("accuracy", accuracy(), "max", id="torchmetrics-higher-is-better"),
        pytest.param("acc", TorchMetricConfig(accuracy()), "max", id="wrapped-torchmetrics"),
        pytest.param("val_mse", torchmetrics.MeanSquaredError(), "min", id="torchmetrics-lower"),
        pytest.param("score", LossMetricConfig(loss_name="loss"), "min", id="loss-metric-config"),
        pytest.param(
            "val_loss", torchmetrics.aggregation.MeanMetric(), "min", id="undeclared-loss-name"
        ),
        # The metric's declaration wins over a name that reads like an error.
        pytest.param("error_free", accuracy(), "max", id="declaration-over-name"),
    ],
)
def test_mode_is_taken_from_the_metric_bound_to_the_trainer(
    maps_path: Path, kind: type[Monitoring], name: str, spec: Any, expected: str
) -> None:
    callback = monitoring(kind, name)
    Trainer(maps_path, make_model(), metrics={name: spec}, callbacks=[callback])
    assert callback.mode == expected
    assert callback.config()["mode"] == expected


@pytest.mark.parametrize("kind", KINDS)
def test_a_metric_that_tells_no_direction_refuses_the_trainer(
    maps_path: Path, kind: type[Monitoring]
) -> None:
    callback = monitoring(kind, "dice")
    assert callback.mode is None  # not known before a Trainer tells
    with pytest.raises(
        ConfigurationError,
        match=rf"^{kind.__name__} cannot tell whether 'dice' should go up or down: the metric "
        r"\(MeanMetric\) declares no higher_is_better and 'dice' is not a loss's or an error's "
        r"name; pass mode='max' \(higher is better\) or mode='min' \(lower is better\)$",
    ):
        Trainer(
            maps_path,
            make_model(),
            metrics={"dice": torchmetrics.aggregation.MeanMetric()},
            callbacks=[callback],
        )
    assert not maps_path.exists()


@pytest.mark.parametrize("kind", KINDS)
def test_an_explicit_mode_against_the_declared_direction_warns_and_is_kept(
    maps_path: Path, kind: type[Monitoring]
) -> None:
    callback = monitoring(kind, "accuracy", mode="min")
    with pytest.warns(
        TrainbusWarning,
        match=rf"{kind.__name__} monitors 'accuracy' with mode='min', but the metric "
        r"\(MulticlassAccuracy\) declares higher_is_better=True, i.e. mode='max'",
    ):
        Trainer(maps_path, make_model(), metrics={"accuracy": accuracy()}, callbacks=[callback])
    assert callback.mode == "min"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    ("spec", "mode"),
    [
        pytest.param(accuracy(), "max", id="agrees-with-torchmetrics"),
        # A mean of any evaluation output: "min" is only a convention, so "max" is silent.
        pytest.param(LossMetricConfig(loss_name="loss"), "max", id="overrides-a-convention"),
        pytest.param(torchmetrics.aggregation.MeanMetric(), "min", id="metric-tells-nothing"),
    ],
)
def test_an_explicit_mode_that_contradicts_no_declaration_is_silent(
    maps_path: Path, kind: type[Monitoring], spec: Any, mode: str
) -> None:
    callback = monitoring(kind, "score", mode=mode)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Trainer(maps_path, make_model(), metrics={"score": spec}, callbacks=[callback])
    assert callback.mode == mode


def test_thresholds_are_checked_against_the_mode_taken_from_the_metric(maps_path: Path) -> None:
    # Apart for "min" (the goal below the limit), so accepted until the metric says "max".
    callback = EarlyStoppingCallback("accuracy", stopping_threshold=0.5, divergence_threshold=0.9)
    with pytest.raises(
        ConfigurationError,
        match=r"EarlyStoppingCallback: stopping_threshold=0\.5 is not above "
        r"divergence_threshold=0\.9 for mode='max'",
    ):
        Trainer(maps_path, make_model(), metrics={"accuracy": accuracy()}, callbacks=[callback])


@pytest.mark.parametrize("kind", KINDS)
def test_a_callback_no_trainer_told_the_direction_refuses_to_rank(
    kind: type[Monitoring],
) -> None:
    callback = monitoring(kind, "accuracy")
    state = TrainerState(stage="validation", max_epochs=2, iteration=6)

    def validate_once() -> None:
        if isinstance(callback, EarlyStoppingCallback):
            callback.on_validation_end(state=state, metrics={"accuracy": 0.5})
        else:
            callback.on_validation_end(metrics={"accuracy": 0.5})
            callback.on_epoch_end(state=state)

    with pytest.raises(
        ConfigurationError, match=r"does not know whether 'accuracy' should go up or down"
    ):
        validate_once()


# ------------------------------------------------------------------------- in training
def test_checkpoints_keep_the_highest_accuracy_without_a_mode(tmp_path: Path) -> None:
    callback = ModelCheckpointCallback("accuracy", save_last=False, top_k=2)
    trainer = scripted_trainer(tmp_path / "maps", [callback])
    trainer.train(make_loader(), make_loader(8))
    kept = sorted(p.name for p in (tmp_path / "maps" / "checkpoints").iterdir())
    assert kept == ["best-accuracy", "best-accuracy-epoch-0", "best-accuracy-epoch-1"]
    manifest = json.loads((tmp_path / "maps/checkpoints/best-accuracy/manifest.json").read_text())
    assert {k: manifest["metadata"][k] for k in ("metric", "value", "mode", "epoch")} == {
        "metric": "accuracy",
        "value": 1.0,
        "mode": "max",
        "epoch": 1,
    }


def test_early_stopping_on_accuracy_stops_like_an_explicit_max(tmp_path: Path) -> None:
    inferred = EarlyStoppingCallback("accuracy", patience=1)
    state = scripted_trainer(tmp_path / "inferred", [inferred]).train(make_loader(), make_loader(8))
    explicit = scripted_trainer(
        tmp_path / "explicit", [EarlyStoppingCallback("accuracy", patience=1, mode="max")]
    ).train(make_loader(), make_loader(8))
    assert state.stop_reason == explicit.stop_reason
    assert state.stop_reason == (
        "accuracy did not improve for 1 validations; best 1.0 at epoch 2/4 "
        "(mode=max, min_delta=0.0)"
    )
    assert state.current_epoch == 2


def test_an_inferred_mode_survives_a_resume(tmp_path: Path) -> None:
    def callbacks() -> list[Any]:
        return [
            EarlyStoppingCallback("accuracy", patience=3),
            ModelCheckpointCallback("accuracy", top_k=2),
            TrainingCheckpointCallback(),
        ]

    maps = tmp_path / "maps"
    scripted_trainer(maps, callbacks(), max_epochs=2).train(make_loader(), make_loader(8))
    resumed_callbacks = callbacks()
    resumed = Trainer.from_maps(
        maps,
        ScriptedAccuracyModel(ACCURACIES),
        metrics={"accuracy": accuracy()},
        callbacks=resumed_callbacks,
        default_callbacks=False,
        max_epochs=len(ACCURACIES),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a saved state the callbacks refuse would warn
        resumed.train(make_loader(), make_loader(8))
    stopping, best = resumed_callbacks[0], resumed_callbacks[1]
    assert (stopping.mode, stopping.best, stopping.best_epoch, stopping.wait) == ("max", 1.0, 1, 2)
    assert (best.mode, best.best, best.best_epoch) == ("max", 1.0, 1)
    assert [(e.value, e.epoch) for e in best.top] == [(1.0, 1), (0.5, 0)]


# --------------------------------------------------------------- a metric never computed
@pytest.mark.parametrize(
    ("callback", "consequence"),
    [
        pytest.param(
            EarlyStoppingCallback("loss", patience=1),
            "early stopping never stops training",
            id="early-stopping",
        ),
        pytest.param(
            ModelCheckpointCallback("loss"),
            r"no 'best-loss' checkpoint is written \(only 'last'\)",
            id="model-checkpoint",
        ),
        pytest.param(
            ModelCheckpointCallback("loss", save_last=False, every_n_epochs=1),
            r"no 'best-loss' checkpoint is written \(only the chosen epochs\)",
            id="model-checkpoint-epochs",
        ),
    ],
)
def test_a_train_call_without_validation_warns_that_the_metric_is_never_computed(
    quiet_trainer: Callable[..., Trainer], callback: Monitoring, consequence: str
) -> None:
    trainer = quiet_trainer(callbacks=[callback])
    owner = type(callback).__name__
    with pytest.warns(
        TrainbusWarning,
        match=rf"^{owner} monitors 'loss', but this train\(\) call never validates, so 'loss' is "
        rf"never computed and {consequence}; pass val_loader to train\(\)",
    ):
        state = trainer.train(make_loader())
    assert state.stopped_by is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trainer.train(make_loader(), make_loader(16), resume=False)


def test_without_a_metric_no_validation_is_needed(quiet_trainer: Callable[..., Trainer]) -> None:
    trainer = quiet_trainer(callbacks=[ModelCheckpointCallback()])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trainer.train(make_loader())
    assert (trainer.maps.path / "checkpoints" / "last").is_dir()
