"""What maps.json says of the loaders of a train call: their batch size."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import BatchSampler, DataLoader, IterableDataset, SequentialSampler

from tests.conftest import make_dataset, make_loader, make_model
from trainbus import Trainer
from trainbus.engine import record


def train_call(path: Path, train_loader: Any, val_loader: Any = None) -> dict[str, Any]:
    trainer = Trainer(path, make_model(), default_callbacks=False, max_epochs=1)
    trainer.train(train_loader, val_loader)
    [call] = trainer.maps.read_json("maps.json")["calls"]
    assert call["call"] == "train"
    loaders: dict[str, Any] = call["loaders"]
    return loaders


def test_a_train_call_records_the_batch_size_of_both_loaders(tmp_path: Path) -> None:
    loaders = train_call(tmp_path / "maps", make_loader(batch_size=8), make_loader(24, 16))
    assert loaders == {"train": {"batch_size": 8}, "val": {"batch_size": 16}}


def test_a_batch_sampler_gives_its_batch_size_and_no_validation_is_null(tmp_path: Path) -> None:
    dataset = make_dataset()
    sampler = BatchSampler(SequentialSampler(dataset), batch_size=6, drop_last=False)
    loaders = train_call(tmp_path / "maps", DataLoader(dataset, batch_sampler=sampler))
    assert loaders == {"train": {"batch_size": 6}, "val": None}


def test_a_list_of_batches_records_the_size_it_observed(tmp_path: Path) -> None:
    inputs, target = make_dataset().tensors
    batches = [(inputs[i : i + 5], target[i : i + 5]) for i in range(0, 45, 5)]
    loaders = train_call(tmp_path / "maps", batches, make_loader(16, 4))
    assert loaders == {"train": {"batch_size": None, "observed": 5}, "val": {"batch_size": 4}}


class ReadyBatches(IterableDataset[tuple[torch.Tensor, torch.Tensor]]):
    """Yields whole batches of 7: the loader itself does no batching."""

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        inputs, target = make_dataset(21).tensors
        for start in range(0, 21, 7):
            yield inputs[start : start + 7], target[start : start + 7]


class Batches:
    """An iterable of batches without a length, read again at each epoch."""

    def __iter__(self) -> Iterator[Any]:
        return iter(make_loader(batch_size=12))


@pytest.mark.parametrize(
    "loader",
    [DataLoader(ReadyBatches(), batch_size=None), Batches()],
    ids=["dataloader-without-batching", "iterable"],
)
def test_a_batch_size_that_cannot_be_known_without_loading_is_null(
    tmp_path: Path, loader: Any
) -> None:
    assert train_call(tmp_path / "maps", loader) == {"train": {"batch_size": None}, "val": None}


def test_describing_loaders_loads_no_batch() -> None:
    class Counted(Batches):
        iterations = 0

        def __iter__(self) -> Iterator[Any]:
            Counted.iterations += 1
            return super().__iter__()

    assert record.loaders({"train": Counted()}) == {"train": {"batch_size": None}}
    assert Counted.iterations == 0
