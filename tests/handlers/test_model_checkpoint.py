from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torchmetrics
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from trainbus import (
    LossMetricConfig,
    ModelCheckpointCallback,
    Trainer,
    TrainerState,
    load_weights,
)
from trainbus.errors import ConfigurationError

from ..conftest import make_dataset, make_loader, make_model


def weights_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def same_weights(left: dict[str, torch.Tensor], right: dict[str, torch.Tensor]) -> bool:
    return left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left)


def stored_weights(directory: Path) -> dict[str, torch.Tensor]:
    model = make_model(seed=123)
    load_weights(directory, model)
    return weights_of(model)


def flipped_loader() -> DataLoader[Any]:
    inputs, target = make_dataset(16, seed=1).tensors
    return DataLoader(TensorDataset(inputs, 1 - target), batch_size=8)


def train_with_copies(
    trainer: Trainer, val_loader: DataLoader[Any]
) -> tuple[TrainerState, list[dict[str, torch.Tensor]]]:
    copies: list[dict[str, torch.Tensor]] = []

    @trainer.on("epoch_end")
    def copy(*, model: nn.Module) -> None:
        copies.append(weights_of(model))

    state = trainer.train(make_loader(), val_loader)
    return state, copies


def checkpoint_tags(trainer: Trainer) -> list[str]:
    return sorted(p.name for p in (trainer.maps.path / "checkpoints").iterdir())


def test_best_epoch_and_last_checkpoints_hold_the_right_weights(
    quiet_trainer: Callable[..., Trainer],
) -> None:
    trainer = quiet_trainer(
        device="cpu",
        model=make_model(lr=0.5),
        callbacks=[ModelCheckpointCallback(metric="loss", epochs={0, 2})],
        max_epochs=4,
    )
    state, copies = train_with_copies(trainer, flipped_loader())
    best_epoch = state.best_epochs["loss"]
    assert best_epoch != 3
    assert checkpoint_tags(trainer) == ["best-loss", "epoch-0", "epoch-2", "last"]
    root = trainer.maps.path / "checkpoints"
    assert same_weights(stored_weights(root / "best-loss"), copies[best_epoch])
    assert not same_weights(stored_weights(root / "best-loss"), copies[-1])
    assert same_weights(stored_weights(root / "epoch-0"), copies[0])
    assert same_weights(stored_weights(root / "epoch-2"), copies[2])
    assert same_weights(stored_weights(root / "last"), copies[-1])
    manifest = json.loads((root / "best-loss" / "manifest.json").read_text())
    assert manifest["metadata"]["metric"] == "loss"
    assert manifest["metadata"]["value"] == state.best_metrics["loss"]
    assert manifest["metadata"]["epoch"] == best_epoch
    assert manifest["metadata"]["requested_by"] == "ModelCheckpointCallback.on_epoch_end"


def test_best_checkpoint_follows_an_improving_metric_to_the_last_epoch(
    quiet_trainer: Callable[..., Trainer],
) -> None:
    trainer = quiet_trainer(
        device="cpu",
        callbacks=[ModelCheckpointCallback(metric="loss", save_last=False)],
        max_epochs=3,
    )
    state, copies = train_with_copies(trainer, make_loader(16))
    assert state.best_epochs["loss"] == 2
    assert checkpoint_tags(trainer) == ["best-loss"]
    best = stored_weights(trainer.maps.path / "checkpoints" / "best-loss")
    assert same_weights(best, copies[2])
    assert not same_weights(best, copies[0])


def test_best_checkpoint_with_mode_max_keeps_the_highest_value(
    quiet_trainer: Callable[..., Trainer],
) -> None:
    trainer = quiet_trainer(
        device="cpu",
        model=make_model(lr=0.5),
        metrics={
            "loss": LossMetricConfig(),
            "accuracy": torchmetrics.Accuracy(task="multiclass", num_classes=2),
        },
        callbacks=[ModelCheckpointCallback(metric="accuracy", mode="max", save_last=False)],
        max_epochs=4,
    )
    accuracies: list[float] = []

    @trainer.on("validation_end")
    def record(*, metrics: dict[str, float]) -> None:
        accuracies.append(metrics["accuracy"])

    state, copies = train_with_copies(trainer, flipped_loader())
    best_epoch = accuracies.index(max(accuracies))
    assert best_epoch != accuracies.index(min(accuracies))
    assert state.best_epochs["accuracy"] == best_epoch
    best = stored_weights(trainer.maps.path / "checkpoints" / "best-accuracy")
    assert same_weights(best, copies[best_epoch])


def test_epochs_select_zero_based_epoch_checkpoints(
    quiet_trainer: Callable[..., Trainer],
) -> None:
    trainer = quiet_trainer(
        device="cpu",
        callbacks=[ModelCheckpointCallback(epochs=range(0, 10, 2), save_last=False)],
        max_epochs=5,
    )
    trainer.train(make_loader(16))
    assert checkpoint_tags(trainer) == ["epoch-0", "epoch-2", "epoch-4"]


def test_nothing_is_saved_without_metric_epochs_or_last(
    quiet_trainer: Callable[..., Trainer],
) -> None:
    trainer = quiet_trainer(device="cpu", callbacks=[ModelCheckpointCallback(save_last=False)])
    trainer.train(make_loader(16), make_loader(16))
    assert checkpoint_tags(trainer) == []


def test_the_default_callback_keeps_only_the_last_weights(maps_path: Path) -> None:
    trainer = Trainer(
        maps_path, make_model(), default_callbacks=[ModelCheckpointCallback], max_epochs=2
    )
    trainer.train(make_loader(16), make_loader(16))
    assert checkpoint_tags(trainer) == ["last"]
    last = stored_weights(maps_path / "checkpoints" / "last")
    assert same_weights(last, weights_of(trainer.model))


def test_a_monitored_metric_the_trainer_lacks_is_refused(maps_path: Path) -> None:
    with pytest.raises(
        ConfigurationError,
        match=r"ModelCheckpointCallback monitors metric 'acc', which the Trainer does not "
        r"compute\. .*Known metrics: \['loss'\]",
    ):
        Trainer(maps_path, make_model(), callbacks=[ModelCheckpointCallback("acc", mode="max")])
    assert not maps_path.exists()


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"metric": "accuracy"}, r"ModelCheckpointCallback cannot tell whether 'accuracy' should"),
        ({"metric": ""}, r"metric='' is not a metric name or None"),
        ({"epochs": 5}, r"epochs=5 is not a collection of epoch numbers"),
        ({"save_last": "yes"}, r"save_last='yes' is not a bool"),
        ({"metric": "loss", "mode": "lowest"}, r"mode='lowest' is not 'min' or 'max'"),
    ],
)
def test_bad_model_checkpoint_arguments_are_refused(
    arguments: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigurationError, match=message):
        ModelCheckpointCallback(**arguments)


def test_config_and_state_dict_describe_the_callback() -> None:
    callback = ModelCheckpointCallback(metric="val_loss", epochs=range(4))
    assert callback.mode == "min"
    assert callback.config() == {
        "metric": "val_loss",
        "epochs": "range(0, 4)",
        "save_last": True,
        "mode": "min",
    }
    callback.on_validation_end(metrics={"val_loss": 0.25})
    restored = ModelCheckpointCallback(metric="val_loss")
    restored.load_state_dict(json.loads(json.dumps(callback.state_dict())))
    assert restored.best == 0.25
    restored.on_validation_end(metrics={"val_loss": 0.5})
    assert [c.tag for c in restored.on_epoch_end(state=TrainerState())] == ["last"]
