"""Random states and loader positions (``trainbus.engine.resume``) on real DataLoaders."""

from __future__ import annotations

import io
import random
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset, RandomSampler, TensorDataset

from trainbus.engine.resume import (
    EpochStart,
    capture_random_states,
    restore_random_states,
    resumed_iterator,
)
from trainbus.errors import CheckpointError

DATA = TensorDataset(torch.arange(36, dtype=torch.float32).unsqueeze(1))


def draws() -> tuple[float, float, float]:
    return random.random(), float(np.random.rand()), float(torch.rand(()))


def test_random_states_round_trip_through_a_weights_only_load() -> None:
    states = capture_random_states()
    expected = [draws() for _ in range(3)]
    buffer = io.BytesIO()
    torch.save(states, buffer)
    buffer.seek(0)
    restore_random_states(torch.load(buffer, weights_only=True))
    assert [draws() for _ in range(3)] == expected


class Stream(IterableDataset[torch.Tensor]):
    def __iter__(self) -> Any:
        yield from torch.randperm(20).split(4)


LOADERS: dict[str, Callable[[], Iterable[Any]]] = {
    "shuffle-global-generator": lambda: DataLoader(DATA, batch_size=4, shuffle=True),
    "shuffle-own-generator": lambda: DataLoader(
        DATA, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(5)
    ),
    "sampler-with-generator": lambda: DataLoader(
        DATA, batch_size=5, sampler=RandomSampler(DATA, generator=torch.Generator().manual_seed(9))
    ),
    "no-batching": lambda: DataLoader(DATA, batch_size=None, shuffle=True),
    "drop-last": lambda: DataLoader(DATA, batch_size=5, shuffle=True, drop_last=True),
    "worker-processes": lambda: DataLoader(DATA, batch_size=4, shuffle=True, num_workers=2),
    "persistent-workers": lambda: DataLoader(
        DATA, batch_size=4, shuffle=True, num_workers=2, persistent_workers=True
    ),
    "iterable-dataset": lambda: DataLoader(Stream(), batch_size=None),
    "plain-list": lambda: [torch.full((2,), float(i)) for i in range(7)],
}


def as_lists(batches: Iterable[Any]) -> list[list[float]]:
    result = []
    for batch in batches:
        tensor = batch[0] if isinstance(batch, list | tuple) else batch
        result.append(tensor.flatten().tolist())
    return result


@pytest.mark.parametrize("kind", sorted(LOADERS))
@pytest.mark.parametrize("skip", [0, 3])
def test_a_resumed_epoch_yields_the_batches_the_uninterrupted_epoch_had_left(
    kind: str, skip: int
) -> None:
    torch.manual_seed(0)
    loader = LOADERS[kind]()
    for _epoch in range(2):  # the second epoch checks generators advanced by the first
        start = EpochStart.capture(loader)
        straight = as_lists(iter(loader))
        after = torch.get_rng_state()
        resumed = as_lists(resumed_iterator(loader, start, skip))
        assert resumed == straight[skip:]
        torch.set_rng_state(after)


def test_skipping_draws_indices_without_loading_samples() -> None:
    loaded: list[int] = []

    class Recording(torch.utils.data.Dataset[int]):
        def __len__(self) -> int:
            return 30

        def __getitem__(self, index: int) -> int:
            loaded.append(index)
            return index

    loader = DataLoader(Recording(), batch_size=5, shuffle=True)
    start = EpochStart.capture(loader)
    straight = [batch.tolist() for batch in loader]
    loaded.clear()
    iterator = resumed_iterator(loader, start, 4)
    assert loaded == []
    assert [batch.tolist() for batch in iterator] == straight[4:]
    assert sorted(loaded) == sorted(i for batch in straight[4:] for i in batch)


def test_a_loader_built_differently_is_refused_with_the_generators_named() -> None:
    with_generator = DataLoader(
        DATA, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(1)
    )
    start = EpochStart.capture(DataLoader(DATA, batch_size=4, shuffle=True))
    with pytest.raises(CheckpointError, match=r"generators \['loader'\] differ .*\[\]"):
        resumed_iterator(with_generator, start, 1)


def test_an_epoch_start_survives_a_weights_only_round_trip() -> None:
    loader = LOADERS["shuffle-own-generator"]()
    start = EpochStart.capture(loader)
    buffer = io.BytesIO()
    torch.save(start.as_dict(), buffer)
    buffer.seek(0)
    loaded = EpochStart.from_dict(torch.load(buffer, weights_only=True))
    straight = as_lists(iter(loader))
    assert as_lists(resumed_iterator(loader, loaded, 2)) == straight[2:]
