"""Shared fixtures: a tiny real model and real loaders, small enough for a 2-core machine."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from trainbus import SupervisedModel, Trainer


def make_dataset(samples: int = 48, features: int = 4, seed: int = 0) -> TensorDataset:
    """A linearly separable two-class problem."""
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(samples, features, generator=generator)
    target = (inputs.sum(dim=1) > 0).long()
    return TensorDataset(inputs, target)


def make_loader(
    samples: int = 48, batch_size: int = 8, *, shuffle: bool = False, seed: int = 0
) -> DataLoader[tuple[torch.Tensor, ...]]:
    generator = torch.Generator().manual_seed(seed + 100) if shuffle else None
    return DataLoader(
        make_dataset(samples, seed=seed),
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
    )


def make_model(seed: int = 0, lr: float = 0.05) -> SupervisedModel:
    torch.manual_seed(seed)
    network = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    return SupervisedModel(
        network, nn.CrossEntropyLoss(), optimizer=functools.partial(torch.optim.SGD, lr=lr)
    )


@pytest.fixture
def loader() -> DataLoader[tuple[torch.Tensor, ...]]:
    return make_loader()


@pytest.fixture
def model() -> SupervisedModel:
    return make_model()


@pytest.fixture
def maps_path(tmp_path: Path) -> Path:
    return tmp_path / "maps"


@pytest.fixture
def quiet_trainer(maps_path: Path) -> Callable[..., Trainer]:
    """Build a Trainer without default callbacks (override any keyword)."""

    def build(**kwargs: object) -> Trainer:
        options: dict[str, object] = {
            "maps": maps_path,
            "model": make_model(),
            "default_callbacks": False,
            "max_epochs": 2,
        }
        options.update(kwargs)
        return Trainer(**options)  # type: ignore[arg-type]

    return build
