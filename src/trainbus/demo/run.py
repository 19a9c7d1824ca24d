"""Build and run the demo experiment; ``trainbus demo`` and ``trainbus plan`` use this."""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torchmetrics
from torch import nn

from trainbus.demo.data import digits_loaders
from trainbus.demo.network import DigitsCNN
from trainbus.engine.compute import seed_everything
from trainbus.engine.maps import Maps
from trainbus.engine.metrics import LossMetricConfig
from trainbus.engine.model import SupervisedModel
from trainbus.handlers.early_stopping import EarlyStoppingCallback
from trainbus.handlers.model_checkpoint import ModelCheckpointCallback
from trainbus.trainer import Trainer

DEFAULT_EPOCHS = 15


@dataclass(frozen=True, slots=True)
class DemoResult:
    """What the demo reports at the end."""

    maps: Path
    epochs: int
    best_epoch: int
    best_accuracy: float
    best_loss: float
    stopped_by: str | None
    stop_reason: str | None


def build_trainer(
    maps: str | os.PathLike[str],
    *,
    epochs: int = DEFAULT_EPOCHS,
    seed: int = 0,
    overwrite: bool = False,
) -> Trainer:
    """The demo's Trainer: DigitsCNN, cross-entropy, Adam, accuracy, early stopping, checkpoints."""
    seed_everything(seed)
    model = SupervisedModel(
        DigitsCNN(),
        nn.CrossEntropyLoss(),
        optimizer=functools.partial(torch.optim.Adam, lr=3e-3),
    )
    return Trainer(
        maps=Maps(maps, overwrite=overwrite),
        model=model,
        metrics={
            "loss": LossMetricConfig(loss_name="loss"),
            "accuracy": torchmetrics.Accuracy(task="multiclass", num_classes=10),
        },
        callbacks=[
            EarlyStoppingCallback(metric="loss", patience=5),
            ModelCheckpointCallback(metric="accuracy", mode="max", epochs=range(0, epochs, 5)),
        ],
        max_epochs=epochs,
        log_every_n_batches=10,
        seed=seed,
        device="cpu",
    )


def run_demo(
    maps: str | os.PathLike[str], *, epochs: int = DEFAULT_EPOCHS, seed: int = 0
) -> DemoResult:
    """Train the demo into ``maps`` and return its summary."""
    trainer = build_trainer(maps, epochs=epochs, seed=seed)
    train_loader, val_loader = digits_loaders(seed=seed)
    state = trainer.train(train_loader, val_loader)
    return DemoResult(
        maps=trainer.maps.path,
        epochs=state.current_epoch + 1,
        best_epoch=state.best_epochs["accuracy"],
        best_accuracy=state.best_metrics["accuracy"],
        best_loss=state.best_metrics["loss"],
        stopped_by=state.stopped_by,
        stop_reason=state.stop_reason,
    )
