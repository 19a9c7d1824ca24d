"""Batches and what a step gives back: loader lengths, the last batch, the loss contract."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset

from trainbus.errors import DataError, ModelContractError


def length(loader: Any) -> int | None:
    """``len(loader)``, or None for a loader without one (or whose ``__len__`` fails)."""
    try:
        return len(loader)
    except Exception:
        return None


def reliable_length(loader: Iterable[Any]) -> int | None:
    """``len(loader)`` when it is exact (an IterableDataset's length is only an estimate)."""
    if isinstance(loader, DataLoader) and isinstance(loader.dataset, IterableDataset):
        return None
    return length(loader)


def no_batches(loader: Iterable[Any] | None, epoch: int, *, again: bool) -> DataError:
    """The error for a train loader that gave no batch at ``epoch`` (0-based).

    ``again``: an earlier epoch of this call had batches; a loader that is its own iterator
    (a generator) was then used up by that epoch.
    """
    if again and loader is not None and iter(loader) is loader:
        return DataError(
            f"train_loader yielded no batches at epoch {epoch + 1} after yielding batches "
            f"before: {type(loader).__name__} is a one-shot iterator (a generator?), "
            "exhausted by the first epoch; pass something that can be iterated again every "
            "epoch, such as a DataLoader or a list of batches"
        )
    return DataError(
        f"train_loader yielded no batches{f' at epoch {epoch + 1}' if epoch else ''}; check "
        "that the dataset is not empty and that batch_size is not larger than the dataset "
        "with drop_last=True"
    )


def reuses_workers(loader: object) -> bool:
    return isinstance(loader, DataLoader) and loader.persistent_workers and loader.num_workers > 0


def loss_of(output: Any) -> torch.Tensor:
    """The loss to backpropagate from what ``forward_step`` returned (checked)."""
    if isinstance(output, torch.Tensor):
        loss = output
    elif isinstance(output, Mapping) and "loss" in output:
        loss = output["loss"]
    else:
        raise ModelContractError(
            f"forward_step returned {_describe(output)}; return the loss as a scalar tensor, "
            "or a dict of named losses with the one to backpropagate under 'loss'"
        )
    if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
        raise ModelContractError(
            f"forward_step returned a loss that is {_describe(loss)}; the loss must be a "
            "scalar tensor: reduce it, e.g. loss.mean()"
        )
    if not loss.requires_grad:
        raise ModelContractError(
            "forward_step returned a loss that does not require grad; compute it from the "
            "model's parameters, outside torch.no_grad()"
        )
    return loss


def named_losses(output: Any) -> Mapping[str, torch.Tensor]:
    """The named losses of a checked ``forward_step`` output, as a read-only mapping."""
    return MappingProxyType({"loss": output} if isinstance(output, torch.Tensor) else output)


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    if isinstance(value, Mapping):
        return f"a dict with keys {sorted(map(str, value))}"
    return f"{type(value).__name__} {value!r}"[:100]


def detached_all(output: Any) -> Mapping[str, torch.Tensor]:
    """Every named loss of a ``forward_step`` output without its graph, read-only."""
    return MappingProxyType(
        {
            k: v.detach() if isinstance(v, torch.Tensor) else v
            for k, v in named_losses(output).items()
        }
    )


def check_loader(name: str, loader: object) -> None:
    """Refuse what cannot be a loader (not iterable, a string, or of length 0), naming it."""
    if loader is None or isinstance(loader, str | bytes) or not isinstance(loader, Iterable):
        raise DataError(
            f"{name}={loader!r} is not iterable; pass a torch.utils.data.DataLoader (or any "
            "iterable of batches)"
        )
    if length(loader) == 0:
        raise DataError(
            f"{name} has no batches (len 0); check that the dataset is not empty and that "
            "batch_size is not larger than the dataset with drop_last=True"
        )
