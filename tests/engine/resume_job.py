"""A training job for the resume tests, run in its own process.

``python resume_job.py MAPS OUT [--epochs N] [--kill-at-iteration I] [--kill-in-validation E]
[--every-n-steps K] [--workers W] [--own-generator] [--resume]`` trains a small network with
dropout on a ``shuffle=True`` loader that has no generator of its own (the global torch
generator draws its permutations; ``--own-generator`` gives it one), with early stopping,
and writes the final weights and optimizer state to OUT. ``--kill-*`` sends SIGKILL to the
process itself at that point: nothing is flushed or cleaned up, as when a cluster kills a job.
``--signal-at-iteration I --signal SIGTERM|SIGINT`` sends that signal instead, and again while
the training state is written. ``--kill-in-write N`` sends SIGKILL in the middle of a
checkpoint write, at its N-th file fsync.
"""

from __future__ import annotations

import argparse
import functools
import os
import signal
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from trainbus import (
    EarlyStoppingCallback,
    LoggerCallback,
    ModelCheckpointCallback,
    SupervisedModel,
    Trainer,
    TrainerState,
    TrainingCheckpointCallback,
)


def dataset(samples: int, seed: int) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(samples, 6, generator=generator)
    target = (inputs[:, :3].sum(dim=1) > inputs[:, 3:].sum(dim=1)).long()
    return TensorDataset(inputs, target)


def build_model() -> SupervisedModel:
    torch.manual_seed(0)
    network = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 2))
    optimizer = functools.partial(torch.optim.AdamW, lr=0.02, weight_decay=0.01)
    return SupervisedModel(network, nn.CrossEntropyLoss(), optimizer=optimizer)


def callbacks(every_n_steps: int | None) -> list[Any]:
    return [
        LoggerCallback(console=False),
        EarlyStoppingCallback("loss", patience=2, min_delta=0.02),
        ModelCheckpointCallback("loss"),
        TrainingCheckpointCallback(every_n_steps=every_n_steps),
    ]


def kill_in_write(count: int) -> None:
    """SIGKILL this process at the ``count``-th file fsync of a checkpoint write."""
    from trainbus.engine import checkpoint

    original = checkpoint._fsync_file
    calls = [0]

    def fsync_then_maybe_die(path: Any) -> None:
        calls[0] += 1
        if calls[0] == count:
            os.kill(os.getpid(), signal.SIGKILL)
        original(path)

    checkpoint._fsync_file = fsync_then_maybe_die  # type: ignore[assignment]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("maps")
    parser.add_argument("out")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--kill-at-iteration", type=int)
    parser.add_argument("--kill-in-validation", type=int)
    parser.add_argument("--every-n-steps", type=int)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--persistent", action="store_true", help="persistent worker processes")
    parser.add_argument("--own-generator", action="store_true")
    parser.add_argument("--kill-in-write", type=int, help="SIGKILL at the N-th file fsync")
    parser.add_argument("--signal-at-iteration", type=int)
    parser.add_argument("--signal", choices=("SIGTERM", "SIGINT"), default="SIGTERM")
    parser.add_argument("--resume", action="store_true")
    options = parser.parse_args()

    generator = torch.Generator().manual_seed(5) if options.own_generator else None
    if options.kill_in_write:
        kill_in_write(options.kill_in_write)
    train_loader = DataLoader(
        dataset(72, seed=1),
        batch_size=8,
        shuffle=True,
        num_workers=options.workers,
        persistent_workers=options.persistent,
        generator=generator,
    )
    val_loader = DataLoader(dataset(40, seed=2), batch_size=10)
    model = build_model()
    if options.resume:
        trainer = Trainer.from_maps(
            options.maps,
            model,
            callbacks=callbacks(options.every_n_steps),
            max_epochs=options.epochs,
        )
    else:
        trainer = Trainer(
            options.maps,
            model,
            callbacks=callbacks(options.every_n_steps),
            max_epochs=options.epochs,
            log_every_n_batches=4,
            seed=7,
        )

    @trainer.on("batch_end")
    def kill_in_training(*, state: TrainerState) -> None:
        if state.iteration == options.kill_at_iteration:
            os.kill(os.getpid(), signal.SIGKILL)

    @trainer.on("batch_end")
    def signal_in_training(*, state: TrainerState) -> None:
        if state.iteration == options.signal_at_iteration:
            os.kill(os.getpid(), signal.Signals[options.signal])

    @trainer.on("evaluation_step_end")
    def kill_in_validation(*, state: TrainerState) -> None:
        if state.stage == "validation" and state.current_epoch == options.kill_in_validation:
            os.kill(os.getpid(), signal.SIGKILL)

    final = trainer.train(train_loader, val_loader)
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": trainer.optimizers[0].state_dict(),
            "state": final.as_dict(),
        },
        options.out,
    )


if __name__ == "__main__":
    main()
