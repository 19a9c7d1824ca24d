"""Train with a learning-rate schedule and early stopping; run it again to continue.

    python examples/resume_training.py runs/resume-example --epochs 3
    python examples/resume_training.py runs/resume-example --epochs 6   # continues at epoch 3

The second run finds the training state the first one left in the MAPS (the same happens after
a crash or a killed job: training states are written every epoch and every 20 optimizer steps)
and continues exactly where it stopped: same weights, optimizer and scheduler states, random
states and position in the shuffled loader.
"""

from __future__ import annotations

import argparse
import functools

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from trainbus import (
    EarlyStoppingCallback,
    LRSchedulerCallback,
    SupervisedModel,
    Trainer,
    TrainerState,
    TrainingCheckpointCallback,
    seed_everything,
)


def loaders() -> tuple[DataLoader[tuple[torch.Tensor, ...]], DataLoader[tuple[torch.Tensor, ...]]]:
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(512, 10, generator=generator)
    target = (inputs[:, :5].sum(dim=1) > 0).long()
    train = TensorDataset(inputs[:400], target[:400])
    validation = TensorDataset(inputs[400:], target[400:])
    return DataLoader(train, batch_size=32, shuffle=True), DataLoader(validation, batch_size=64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("maps", help="the experiment directory (created, or resumed)")
    parser.add_argument("--epochs", type=int, default=6)
    options = parser.parse_args()

    # Before building the model: its initial weights are drawn now, before the Trainer exists.
    seed_everything(0)
    network = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, 2))
    model = SupervisedModel(
        network, nn.CrossEntropyLoss(), optimizer=functools.partial(torch.optim.SGD, lr=0.1)
    )
    trainer = Trainer(
        options.maps,
        model,
        callbacks=[
            LRSchedulerCallback(functools.partial(torch.optim.lr_scheduler.StepLR, step_size=2)),
            EarlyStoppingCallback("loss", patience=3),
            TrainingCheckpointCallback(every_n_steps=20),
        ],
        max_epochs=options.epochs,
        seed=0,
    )

    @trainer.on("resume")
    def announce(*, state: TrainerState, checkpoint: object) -> None:
        print(f"resumed from {checkpoint} after {state.global_step} optimizer steps")

    state = trainer.train(*loaders(), resume=True)
    print(f"finished: {state.current_epoch + 1} epochs, {state.global_step} optimizer steps")


if __name__ == "__main__":
    main()
