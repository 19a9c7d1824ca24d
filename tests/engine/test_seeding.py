"""The reproducible path: seed_everything before building the model, then Trainer(seed=...)."""

from __future__ import annotations

import functools
import re
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

import trainbus
from tests.conftest import make_dataset
from trainbus import SupervisedModel, Trainer, TrainingCheckpointCallback
from trainbus.engine import compute
from trainbus.errors import ConfigurationError, TrainbusWarning

NOT_SEEDED = r"initial weights were not seeded.*call trainbus\.seed_everything\({seed}\) before"


@pytest.fixture(autouse=True)
def no_pending_seeding() -> None:
    """Each test starts as a fresh process does: no seed_everything call left to claim."""
    compute.claim_seeding(None)


def build() -> SupervisedModel:
    """A model whose weights come from the global generator (no seeding of its own)."""
    network = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Dropout(0.2), nn.Linear(8, 2))
    return SupervisedModel(
        network, nn.CrossEntropyLoss(), optimizer=functools.partial(torch.optim.SGD, lr=0.1)
    )


def weights(model: nn.Module) -> list[torch.Tensor]:
    return [parameter.detach().clone() for parameter in model.parameters()]


def same(first: list[torch.Tensor], second: list[torch.Tensor]) -> bool:
    return all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


def maps_json(trainer: Trainer) -> dict[str, Any]:
    document: dict[str, Any] = trainer.maps.read_json("maps.json")
    return document


def resumable() -> dict[str, Any]:
    return {"callbacks": [TrainingCheckpointCallback()], "default_callbacks": False}


def shuffled() -> DataLoader[Any]:
    """Shuffled with the global generator: the Trainer's seed decides the order."""
    return DataLoader(make_dataset(), batch_size=8, shuffle=True)


def seeded_run(path: Path, seed: int) -> tuple[list[torch.Tensor], Trainer]:
    trainbus.seed_everything(seed)
    model = build()
    initial = weights(model)
    trainer = Trainer(path, model, max_epochs=2, seed=seed, **resumable())
    trainer.train(shuffled())
    return initial, trainer


def test_seed_everything_first_makes_two_runs_identical_and_says_so(tmp_path: Path) -> None:
    torch.rand(3)  # whatever ran before the script's seeding does not matter
    first_initial, first = seeded_run(tmp_path / "first", 0)
    torch.rand(5)
    second_initial, second = seeded_run(tmp_path / "second", 0)
    other_initial, other = seeded_run(tmp_path / "other", 1)
    assert same(first_initial, second_initial)
    assert same(weights(first.model), weights(second.model))
    assert not same(first_initial, weights(first.model))  # it trained
    assert not same(first_initial, other_initial)
    assert not same(weights(first.model), weights(other.model))
    for trainer, seed in ((first, 0), (second, 0), (other, 1)):
        document = maps_json(trainer)
        assert (document["seed"], document["initial_weights_seeded"]) == (seed, True)
        assert list(document).index("initial_weights_seeded") == list(document).index("seed") + 1


def test_a_seed_given_only_to_the_trainer_warns_once_and_records_false(tmp_path: Path) -> None:
    model = build()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = Trainer(tmp_path / "maps", model, default_callbacks=False, max_epochs=1, seed=0)
        trainer.train(shuffled())
    [warning] = [w for w in caught if issubclass(w.category, TrainbusWarning)]
    assert re.search(NOT_SEEDED.format(seed=0), str(warning.message))
    assert warning.filename == __file__  # points at the user's Trainer(...) line
    document = maps_json(trainer)
    assert (document["seed"], document["initial_weights_seeded"]) == (0, False)


def test_a_seeding_covers_the_model_of_one_trainer_only(tmp_path: Path) -> None:
    trainbus.seed_everything(3)
    Trainer(tmp_path / "first", build(), default_callbacks=False, seed=3)
    with pytest.warns(TrainbusWarning, match=NOT_SEEDED.format(seed=3)):
        second = Trainer(tmp_path / "second", build(), default_callbacks=False, seed=3)
    assert second.describe()["initial_weights_seeded"] is False


def test_a_trainer_without_a_seed_claims_the_seeding_too(tmp_path: Path) -> None:
    trainbus.seed_everything(3)
    unseeded = Trainer(tmp_path / "first", build(), default_callbacks=False)
    assert (unseeded.describe()["seed"], unseeded.describe()["initial_weights_seeded"]) == (
        None,
        None,
    )
    with pytest.warns(TrainbusWarning, match=NOT_SEEDED.format(seed=3)):
        Trainer(tmp_path / "second", build(), default_callbacks=False, seed=3)


def test_a_seeding_with_another_seed_does_not_cover_the_weights(tmp_path: Path) -> None:
    trainbus.seed_everything(1)
    with pytest.warns(TrainbusWarning, match=NOT_SEEDED.format(seed=2)):
        trainer = Trainer(tmp_path / "maps", build(), default_callbacks=False, seed=2)
    assert trainer.describe()["initial_weights_seeded"] is False


@pytest.mark.parametrize("seeded", [True, False])
def test_a_resumed_run_keeps_what_its_maps_recorded_without_a_warning(
    tmp_path: Path, seeded: bool
) -> None:
    path = tmp_path / "maps"
    if seeded:
        seeded_run(path, 5)
    else:
        with pytest.warns(TrainbusWarning):
            Trainer(path, build(), max_epochs=2, seed=5, **resumable()).train(shuffled())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed = Trainer.from_maps(path, build(), max_epochs=3, **resumable())
        resumed.train(shuffled())
    assert [str(w.message) for w in caught if issubclass(w.category, TrainbusWarning)] == []
    document = maps_json(resumed)
    assert (document["seed"], document["initial_weights_seeded"]) == (5, seeded)
    assert [call["call"] for call in document["calls"]] == ["train", "train"]


def test_an_invalid_seed_is_refused_before_any_generator_is_seeded(tmp_path: Path) -> None:
    model = build()
    state = torch.random.get_rng_state()
    with pytest.raises(ConfigurationError, match=r"seed=-1 is not an int"):
        Trainer(tmp_path / "maps", model, seed=-1)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert compute.LAST_SEEDING.calls == compute.LAST_SEEDING.claimed
