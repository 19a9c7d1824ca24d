"""The script of a crash-and-rerun loop: ``Trainer(MAPS, ...).train(..., resume="auto")``.

``python auto_job.py MAPS OUT [--fail-at-iteration I] [--kill-at-iteration I]
[--no-training-states]`` trains a small network with dropout on a ``shuffle=True`` loader
(the global torch generator draws its permutations) for 3 epochs of 9 batches, a training
state at each epoch's end, and writes the final weights to OUT. ``--fail-at-iteration``
raises an exception from a handler at that iteration (a bug in the script);
``--kill-at-iteration`` sends SIGKILL to the process itself (nothing is cleaned up).
"""

from __future__ import annotations

import argparse
import functools
import os
import signal

import torch

# Run as a script, from its own folder: the resume job beside it holds the same data.
from resume_job import dataset
from torch import nn
from torch.utils.data import DataLoader

from trainbus import (
    LoggerCallback,
    SupervisedModel,
    Trainer,
    TrainerState,
    TrainingCheckpointCallback,
)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("maps")
    parser.add_argument("out")
    parser.add_argument("--fail-at-iteration", type=int)
    parser.add_argument("--kill-at-iteration", type=int)
    parser.add_argument("--no-training-states", action="store_true")
    options = parser.parse_args()

    torch.manual_seed(0)
    network = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 2))
    optimizer = functools.partial(torch.optim.AdamW, lr=0.02, weight_decay=0.01)
    model = SupervisedModel(network, nn.CrossEntropyLoss(), optimizer=optimizer)
    trainer = Trainer(
        options.maps,
        model,
        callbacks=[LoggerCallback(console=False)],
        default_callbacks={TrainingCheckpointCallback: not options.no_training_states},
        max_epochs=3,
        log_every_n_batches=4,
        seed=7,
    )

    @trainer.on("batch_end")
    def crash(*, state: TrainerState) -> None:
        if state.iteration == options.fail_at_iteration:
            raise RuntimeError(f"a bug in the script at iteration {state.iteration}")
        if state.iteration == options.kill_at_iteration:
            os.kill(os.getpid(), signal.SIGKILL)

    train_loader = DataLoader(dataset(72, seed=1), batch_size=8, shuffle=True)
    val_loader = DataLoader(dataset(40, seed=2), batch_size=10)
    trainer.train(train_loader, val_loader, resume="auto")
    torch.save(model.state_dict(), options.out)


if __name__ == "__main__":
    main()
