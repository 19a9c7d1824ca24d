"""The digits data set shipped inside scikit-learn: 1,797 grey 8x8 images of 10 digits."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, TensorDataset

from trainbus.errors import ConfigurationError


def load_digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """Images as ``(N, 1, 8, 8)`` floats in [0, 1] and labels as ``(N,)`` integers."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise ConfigurationError(
            "the demo reads the digits data set shipped with scikit-learn, which is not "
            "installed; install it with: pip install 'trainbus[demo]'"
        ) from exc
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target, dtype=torch.long)
    return images, labels


def digits_loaders(
    *, batch_size: int = 64, validation_fraction: float = 0.2, seed: int = 0
) -> tuple[DataLoader[tuple[torch.Tensor, ...]], DataLoader[tuple[torch.Tensor, ...]]]:
    """Training and validation loaders over a fixed, seeded split of the digits."""
    if not 0 < validation_fraction < 1:
        raise ConfigurationError(
            f"validation_fraction={validation_fraction!r} is not between 0 and 1"
        )
    images, labels = load_digits_tensors()
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    cut = int(len(labels) * (1 - validation_fraction))
    train, val = order[:cut], order[cut:]
    shuffling = torch.Generator().manual_seed(seed + 1)
    train_loader = DataLoader(
        TensorDataset(images[train], labels[train]),
        batch_size=batch_size,
        shuffle=True,
        generator=shuffling,
    )
    val_loader = DataLoader(TensorDataset(images[val], labels[val]), batch_size=256)
    return train_loader, val_loader
