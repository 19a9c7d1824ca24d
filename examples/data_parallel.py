"""Data-parallel training: the same script alone or under torchrun, nothing changed.

    python examples/data_parallel.py runs/data-parallel
    torchrun --nproc-per-node=2 examples/data_parallel.py runs/data-parallel-2
    torchrun --nproc-per-node=2 examples/data_parallel.py runs/sharded --strategy fsdp

Each rank trains on its share of every epoch (a DistributedSampler is put in the loader for
you); rank 0 writes the MAPS and prints; the metrics are those of the whole validation set.
Run it again after an interruption to resume (resume=True starts afresh if there is no MAPS).
``--strategy fsdp`` shards the parameters over the ranks instead of replicating them.
"""

from __future__ import annotations

import argparse
import functools

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from trainbus import LRSchedulerCallback, SupervisedModel, Trainer, TrainerState, seed_everything


def blobs(samples: int, seed: int) -> TensorDataset:
    """Two Gaussian blobs in 8 dimensions."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (samples,), generator=generator)
    points = torch.randn(samples, 8, generator=generator) + labels.unsqueeze(1) * 1.5
    return TensorDataset(points, labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("maps", help="the experiment directory")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--strategy", default="auto", choices=["auto", "ddp", "fsdp"])
    options = parser.parse_args()

    # Before building the model: every rank draws the same initial weights, run after run.
    seed_everything(0)
    network = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 2))
    model = SupervisedModel(
        network, nn.CrossEntropyLoss(), optimizer=functools.partial(torch.optim.SGD, lr=0.2)
    )
    scheduler = LRSchedulerCallback(
        functools.partial(torch.optim.lr_scheduler.StepLR, step_size=2, gamma=0.5)
    )
    trainer = Trainer(
        options.maps,
        model,
        callbacks=[scheduler],
        max_epochs=options.epochs,
        seed=0,
        strategy=options.strategy,
    )

    @trainer.on("train_end", rank_zero_only=True)
    def summary(*, state: TrainerState) -> None:
        group = torch.distributed
        backend = group.get_backend() if group.is_initialized() else "none"
        print(
            f"rank {state.rank} of {state.world_size}: {state.global_step} steps, "
            f"{state.samples_seen} samples, validation loss {state.metrics['loss']:.4f} "
            f"(process group: {backend}, device: {trainer.device}, strategy: {options.strategy})"
        )

    train = DataLoader(blobs(512, seed=1), batch_size=32, shuffle=True)
    validation = DataLoader(blobs(200, seed=2), batch_size=50)
    trainer.train(train, validation, resume=True)


if __name__ == "__main__":
    main()
