from __future__ import annotations

import copy
import dataclasses
import json
import pickle
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader

from trainbus import Trainer, TrainerState
from trainbus.engine.state import FrozenDict, StateKeeper
from trainbus.errors import ConfigurationError

from ..conftest import make_loader, make_model


class ProbingLoader:
    """A loader that records the trainer's snapshot count each time it yields a batch."""

    def __init__(self, loader: DataLoader[Any]) -> None:
        self.loader = loader
        self.trainer: Trainer | None = None
        self.counts: list[int] = []

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Any]:
        for batch in self.loader:
            assert self.trainer is not None
            self.counts.append(self.trainer.snapshots_built)
            yield batch


@pytest.fixture(scope="module")
def trained_state(tmp_path_factory: pytest.TempPathFactory) -> TrainerState:
    maps = tmp_path_factory.mktemp("state") / "maps"
    trainer = Trainer(maps, make_model(), default_callbacks=False, max_epochs=2)
    return trainer.train(make_loader(), make_loader(16))


def test_assigning_a_field_raises_frozen_instance_error(trained_state: TrainerState) -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        trained_state.current_epoch = 5  # type: ignore[misc]
    assert trained_state.current_epoch == 1


def test_state_is_slotted_and_refuses_new_attributes(trained_state: TrainerState) -> None:
    assert "__slots__" in vars(TrainerState)
    assert not hasattr(trained_state, "__dict__")
    with pytest.raises((AttributeError, TypeError)):
        object.__setattr__(trained_state, "extra", 1)


def test_state_survives_a_pickle_round_trip(trained_state: TrainerState) -> None:
    restored = pickle.loads(pickle.dumps(trained_state))
    assert restored == trained_state
    assert restored is not trained_state
    assert isinstance(restored.metrics, FrozenDict)
    assert restored.metrics["loss"] == trained_state.metrics["loss"]
    assert hash(restored) == hash(trained_state)


@pytest.mark.parametrize(
    "mutate",
    [
        pytest.param(lambda m: m.__setitem__("loss", 0.0), id="setitem"),
        pytest.param(lambda m: m.__delitem__("loss"), id="delitem"),
        pytest.param(lambda m: m.update(loss=0.0), id="update"),
        pytest.param(lambda m: m.pop("loss"), id="pop"),
        pytest.param(lambda m: m.popitem(), id="popitem"),
        pytest.param(lambda m: m.clear(), id="clear"),
        pytest.param(lambda m: m.setdefault("other", 1.0), id="setdefault"),
        pytest.param(lambda m: m.__ior__({"loss": 0.0}), id="ior"),
    ],
)
def test_state_metrics_mapping_refuses_mutation(
    trained_state: TrainerState, mutate: Callable[[FrozenDict], object]
) -> None:
    before = dict(trained_state.metrics)
    with pytest.raises(TypeError, match="read-only"):
        mutate(trained_state.metrics)
    assert dict(trained_state.metrics) == before


def test_frozen_dict_copies_are_the_same_read_only_object(trained_state: TrainerState) -> None:
    metrics = trained_state.metrics
    assert copy.copy(metrics) is metrics
    assert copy.deepcopy(metrics) is metrics
    editable = dict(metrics)
    editable["loss"] = -1.0
    assert metrics["loss"] != -1.0


def test_as_dict_is_json_serialisable_with_plain_values(trained_state: TrainerState) -> None:
    plain = trained_state.as_dict()
    assert set(plain) == {f.name for f in dataclasses.fields(TrainerState)}
    decoded = json.loads(json.dumps(plain))
    assert decoded["metrics"] == dict(trained_state.metrics)
    assert decoded["best_epochs"] == dict(trained_state.best_epochs)
    assert decoded["learning_rates"] == [0.05]
    assert decoded["iteration"] == 12
    assert type(plain["metrics"]) is dict


def test_epoch_number_and_should_stop_derive_from_fields() -> None:
    state = TrainerState(current_epoch=3)
    assert state.epoch_number == 4
    assert not state.should_stop
    assert TrainerState(stopped_by="EarlyStoppingCallback").should_stop


def test_state_keeper_returns_the_same_snapshot_until_the_next_update() -> None:
    keeper = StateKeeper(max_epochs=3)
    assert keeper.snapshots_built == 0
    first = keeper.snapshot()
    assert keeper.snapshot() is first
    assert keeper.snapshots_built == 1
    keeper.update(iteration=1)
    assert keeper.snapshots_built == 1
    second = keeper.snapshot()
    assert second is not first
    assert (first.iteration, second.iteration) == (0, 1)
    assert second.max_epochs == 3
    assert keeper.snapshots_built == 2


def test_state_keeper_get_reads_values_without_building_a_snapshot() -> None:
    keeper = StateKeeper()
    keeper.update(global_step=7, metrics={"loss": 0.5})
    assert keeper.get("global_step") == 7
    assert isinstance(keeper.get("metrics"), FrozenDict)
    assert keeper.snapshots_built == 0


def test_state_keeper_refuses_unknown_fields_and_names_them() -> None:
    keeper = StateKeeper()
    with pytest.raises(ConfigurationError, match=r"no field\(s\) \['epoch'\]"):
        keeper.update(epoch=1)


def test_every_subscriber_between_two_changes_receives_the_same_state_object(
    quiet_trainer: Callable[..., Trainer],
) -> None:
    trainer = quiet_trainer(max_epochs=1, device="cpu")
    events = ("batch_start", "forward_start", "backward_start", "backward_end")
    events += ("optimizer_step_start", "optimizer_step_end", "batch_end")
    received: dict[str, list[list[TrainerState]]] = {event: [[], []] for event in events}
    for event in events:
        for index in (0, 1):

            def record(*, state: TrainerState, _log: list[TrainerState] = received[event][index]):
                _log.append(state)

            trainer.on(event, priority=index)(record)
    trainer.train(make_loader())

    for event in events:
        first, second = received[event]
        assert len(first) == len(second) == 6
        assert all(a is b for a, b in zip(first, second, strict=True)), event

    for batch in range(6):
        unchanged = [received[event][0][batch] for event in events[:5]]
        assert all(state is unchanged[0] for state in unchanged)
        after_step = received["optimizer_step_end"][0][batch]
        assert after_step is not unchanged[0]
        assert after_step.global_step == unchanged[0].global_step + 1


def test_no_snapshot_is_built_during_training_without_subscribers(maps_path: Any) -> None:
    loader = ProbingLoader(make_loader())
    trainer = Trainer(maps_path, make_model(), default_callbacks=False, max_epochs=2)
    loader.trainer = trainer
    result = trainer.train(loader)
    assert loader.counts == [0] * 12
    assert trainer.snapshots_built == 1
    assert result is trainer.state
    assert trainer.snapshots_built == 1


def test_a_batch_level_subscriber_costs_one_snapshot_per_batch(tmp_path: Any) -> None:
    silent = Trainer(tmp_path / "silent", make_model(), default_callbacks=False, max_epochs=2)
    silent.train(make_loader())

    listened = Trainer(tmp_path / "listened", make_model(), default_callbacks=False, max_epochs=2)
    iterations: list[int] = []

    @listened.on("forward_start")
    def seen(*, state: TrainerState) -> None:
        iterations.append(state.iteration)

    listened.train(make_loader())
    assert iterations == list(range(1, 13))
    assert listened.snapshots_built - silent.snapshots_built == 12


def test_snapshot_values_are_plain_python_not_tensors(trained_state: TrainerState) -> None:
    for value in trained_state.as_dict().values():
        assert not isinstance(value, torch.Tensor)
    assert all(type(v) is float for v in trained_state.metrics.values())
    assert all(type(v) is float for v in trained_state.learning_rates)
