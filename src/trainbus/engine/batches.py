"""Batches and what a step gives back: loader lengths, the last batch, the loss contract."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from types import MappingProxyType
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset

from trainbus.engine.compute import with_last
from trainbus.errors import DataError, ModelContractError


def numbered(batches: Iterator[Any], first: int, total: int | None) -> Iterator[tuple[Any, bool]]:
    """Pair each batch with whether it is the epoch's last.

    With a known length nothing is read ahead, so a batch is loaded exactly when the
    uninterrupted loop would load it (random augmentation in the main process stays exact
    across a resume); an iterable of unknown length is read one batch ahead.
    """
    if total is None:
        yield from with_last(batches)
        return
    for index, batch in enumerate(batches, first):
        yield batch, index + 1 == total


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


def reuses_workers(loader: object) -> bool:
    return isinstance(loader, DataLoader) and loader.persistent_workers and loader.num_workers > 0


def loss_of(output: Any) -> tuple[torch.Tensor, Mapping[str, torch.Tensor]]:
    """The loss to backpropagate and the named losses (read-only) of ``forward_step``."""
    losses: Mapping[str, torch.Tensor]
    if isinstance(output, torch.Tensor):
        loss, losses = output, MappingProxyType({"loss": output})
    elif isinstance(output, Mapping) and "loss" in output:
        loss, losses = output["loss"], MappingProxyType(output)
    else:
        raise ModelContractError(
            f"forward_step returned {_describe(output)}; return the loss as a scalar tensor, "
            "or a dict of named losses with the one to backpropagate under 'loss'"
        )
    if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
        raise ModelContractError(
            f"forward_step returned a loss that is {_describe(loss)}; the loss must be a scalar "
            "tensor: reduce it, e.g. loss.mean()"
        )
    if not loss.requires_grad:
        raise ModelContractError(
            "forward_step returned a loss that does not require grad; compute it from the "
            "model's parameters, outside torch.no_grad()"
        )
    return loss, losses


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    if isinstance(value, Mapping):
        return f"a dict with keys {sorted(map(str, value))}"
    return f"{type(value).__name__} {value!r}"[:100]


def detached(loss: torch.Tensor | None) -> torch.Tensor | None:
    """The loss without its graph (None stays None)."""
    return None if loss is None else loss.detach()


def detached_all(losses: Mapping[str, torch.Tensor] | None) -> Mapping[str, torch.Tensor] | None:
    """Every named loss without its graph, as a read-only mapping."""
    if losses is None:
        return None
    return MappingProxyType(
        {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in losses.items()}
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
