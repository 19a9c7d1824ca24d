from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
import torchmetrics
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from trainbus import (
    EarlyStoppingCallback,
    EventSpec,
    LossMetricConfig,
    MetricsWriterCallback,
    SkipStep,
    Stop,
    SupervisedModel,
    Trainer,
    TrainerState,
)
from trainbus.errors import (
    ConfigurationError,
    ConfigurationTypeError,
    DataError,
    ModelContractError,
    TrainbusWarning,
)

from ..conftest import make_dataset, make_loader, make_model

Batch = tuple[torch.Tensor, torch.Tensor]


def parameters_of(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def manual_training(
    model: SupervisedModel,
    batches: Sequence[Batch],
    *,
    epochs: int,
    lr: float = 0.05,
    accumulate: int = 1,
    clip: Callable[[Any, float], object] | None = None,
    clip_value: float = 0.0,
    mean_over_group: bool = True,
) -> list[torch.Tensor]:
    network = model.network
    optimizer = torch.optim.SGD(network.parameters(), lr=lr)
    loss_function = nn.CrossEntropyLoss()
    for _ in range(epochs):
        for start in range(0, len(batches), accumulate):
            group = batches[start : start + accumulate]
            divisor = len(group) if mean_over_group else accumulate
            for inputs, target in group:
                (loss_function(network(inputs), target) / divisor).backward()
            if clip is not None:
                clip(network.parameters(), clip_value)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return parameters_of(model)


def assert_same_weights(left: Sequence[torch.Tensor], right: Sequence[torch.Tensor]) -> None:
    assert len(left) == len(right)
    assert all(torch.equal(a, b) for a, b in zip(left, right, strict=True))


def differs(left: Sequence[torch.Tensor], right: Sequence[torch.Tensor]) -> bool:
    return any(not torch.equal(a, b) for a, b in zip(left, right, strict=True))


class NoLengthLoader:
    """An iterable of batches without ``len``."""

    def __init__(self, batches: Sequence[Any]) -> None:
        self.batches = list(batches)

    def __iter__(self) -> Iterator[Any]:
        return iter(self.batches)


class PerSampleLossModel(SupervisedModel):
    def forward_step(self, batch: Any) -> torch.Tensor:
        inputs, target = batch
        return nn.functional.cross_entropy(self.network(inputs), target, reduction="none")


class UnnamedLossModel(SupervisedModel):
    def forward_step(self, batch: Any) -> dict[str, torch.Tensor]:
        inputs, target = batch
        return {"total": self.loss(self.network(inputs), target)}


def read_maps(path: Path) -> dict[str, Any]:
    return json.loads((path / "maps.json").read_text())


def test_training_without_accumulation_equals_a_plain_pytorch_loop_exactly(
    quiet_trainer: Callable[..., Trainer],
) -> None:
    trainer = quiet_trainer(device="cpu")
    trainer.train(make_loader())
    expected = manual_training(make_model(), list(make_loader()), epochs=2)
    assert_same_weights(parameters_of(trainer.model), expected)
    assert differs(parameters_of(make_model()), expected)


def test_gradient_accumulation_equals_a_loop_stepping_every_three_batches_and_the_remainder(
    quiet_trainer: Callable[..., Trainer],
) -> None:
    loader = make_loader(samples=56)
    assert len(loader) == 7
    trainer = quiet_trainer(device="cpu", accumulate_grad_batches=3)
    state = trainer.train(loader)
    batches = list(loader)
    expected = manual_training(make_model(), batches, epochs=2, accumulate=3)
    actual = parameters_of(trainer.model)
    for a, b in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, b)
    assert state.global_step == 6
    alternatives = [
        manual_training(make_model(), batches, epochs=2),
        manual_training(make_model(), batches[:6], epochs=2, accumulate=3),
        manual_training(make_model(), batches, epochs=2, accumulate=3, mean_over_group=False),
    ]
    for alternative in alternatives:
        assert not all(torch.allclose(a, b) for a, b in zip(actual, alternative, strict=True))


@pytest.mark.parametrize(
    ("algorithm", "value", "clip"),
    [
        ("norm", 0.05, torch.nn.utils.clip_grad_norm_),
        ("value", 0.01, torch.nn.utils.clip_grad_value_),
    ],
)
def test_gradient_clipping_matches_torch_clipping_in_a_manual_loop(
    quiet_trainer: Callable[..., Trainer],
    algorithm: str,
    value: float,
    clip: Callable[[Any, float], object],
) -> None:
    trainer = quiet_trainer(
        device="cpu", gradient_clip_val=value, gradient_clip_algorithm=algorithm
    )
    trainer.train(make_loader())
    batches = list(make_loader())
    expected = manual_training(make_model(), batches, epochs=2, clip=clip, clip_value=value)
    actual = parameters_of(trainer.model)
    assert_same_weights(actual, expected)
    assert differs(actual, manual_training(make_model(), batches, epochs=2))


def test_bf16_precision_trains_on_the_cpu(quiet_trainer: Callable[..., Trainer]) -> None:
    trainer = quiet_trainer(device="cpu", precision="bf16", log_every_n_batches=2)
    before = parameters_of(trainer.model)
    losses: list[float] = []

    @trainer.on("loss_logged")
    def record(*, train_loss: float) -> None:
        losses.append(train_loss)

    state = trainer.train(make_loader())
    assert len(losses) == 6
    assert all(math.isfinite(loss) for loss in losses)
    assert state.train_loss is not None
    assert math.isfinite(state.train_loss)
    assert differs(before, parameters_of(trainer.model))
    assert all(p.dtype is torch.float32 for p in trainer.model.parameters())


def test_fp16_precision_on_the_cpu_is_refused(maps_path: Path) -> None:
    with pytest.raises(ConfigurationError, match=r"precision='16' needs a CUDA device.*'bf16'"):
        Trainer(maps_path, make_model(), device="cpu", precision="16")
    assert not maps_path.exists()


def shuffled_loader() -> DataLoader[Any]:
    return DataLoader(make_dataset(), batch_size=8, shuffle=True)


def test_runs_with_the_same_seed_give_identical_weights(tmp_path: Path) -> None:
    def run(name: str, seed: int) -> list[torch.Tensor]:
        model = make_model()  # seeds its own weights, the same in every run
        with pytest.warns(TrainbusWarning, match="initial weights were not seeded"):
            trainer = Trainer(
                tmp_path / name, model, default_callbacks=False, max_epochs=2, seed=seed
            )
        trainer.train(shuffled_loader())
        return parameters_of(trainer.model)

    first = run("first", 3)
    second = run("second", 3)
    other = run("other", 4)
    assert_same_weights(first, second)
    assert differs(first, other)


def test_deterministic_mode_is_on_during_the_call_and_restored_afterwards(
    quiet_trainer: Callable[..., Trainer],
) -> None:
    assert not torch.are_deterministic_algorithms_enabled()
    trainer = quiet_trainer(deterministic=True, max_epochs=1)
    during: list[bool] = []

    @trainer.on("batch_start")
    def record() -> None:
        during.append(torch.are_deterministic_algorithms_enabled())

    trainer.train(make_loader())
    assert during == [True] * 6
    assert not torch.are_deterministic_algorithms_enabled()


def test_deterministic_mode_is_restored_when_training_fails(
    quiet_trainer: Callable[..., Trainer],
) -> None:
    trainer = quiet_trainer(deterministic=True, max_epochs=1)

    @trainer.on("forward_start")
    def explode() -> None:
        raise RuntimeError("fails inside deterministic mode")

    with pytest.raises(RuntimeError, match="fails inside deterministic mode"):
        trainer.train(make_loader())
    assert not torch.are_deterministic_algorithms_enabled()


@pytest.mark.parametrize(
    ("accumulate", "global_step"),
    [(1, 12), (2, 6), (4, 4), (6, 2), (7, 2)],
)
def test_state_counters_after_training(
    quiet_trainer: Callable[..., Trainer], accumulate: int, global_step: int
) -> None:
    trainer = quiet_trainer(accumulate_grad_batches=accumulate)
    state = trainer.train(make_loader())
    assert state is trainer.state
    assert state.stage == "idle"
    assert state.current_epoch == 1
    assert state.epoch_number == 2
    assert state.max_epochs == 2
    assert state.batch_idx == 5
    assert state.num_batches == 6
    assert state.iteration == 12
    assert state.global_step == global_step
    assert state.samples_seen == 96
    assert state.learning_rates == (0.05,)
    assert state.train_loss is not None
    assert not state.should_stop


def test_num_batches_is_none_for_a_loader_without_len(
    quiet_trainer: Callable[..., Trainer],
) -> None:
    trainer = quiet_trainer(max_epochs=1)
    seen: list[int | None] = []

    @trainer.on("batch_end")
    def record(*, state: TrainerState) -> None:
        seen.append(state.num_batches)

    state = trainer.train(NoLengthLoader(list(make_loader(samples=20))))
    assert seen == [None, None, None]
    assert state.samples_seen == 20
    assert state.global_step == 3


def test_learning_rates_follow_a_scheduler_in_the_state(
    quiet_trainer: Callable[..., Trainer],
) -> None:
    trainer = quiet_trainer(max_epochs=3)
    rates: list[tuple[int, tuple[float, ...], float]] = []

    @trainer.on("train_start")
    def schedule(*, optimizers: list[torch.optim.Optimizer]) -> None:
        scheduler = torch.optim.lr_scheduler.StepLR(optimizers[0], step_size=1, gamma=0.5)

        @trainer.on("epoch_end", priority=10)
        def step() -> None:
            scheduler.step()

    @trainer.on("optimizer_step_end")
    def record(*, state: TrainerState, optimizers: list[torch.optim.Optimizer]) -> None:
        actual = optimizers[0].param_groups[0]["lr"]
        rates.append((state.current_epoch, state.learning_rates, actual))

    trainer.train(make_loader())
    assert len(rates) == 18
    assert all(in_state == (actual,) for _, in_state, actual in rates)
    assert {epoch: in_state for epoch, in_state, _ in rates} == {
        0: (0.05,),
        1: (0.025,),
        2: (0.0125,),
    }


def test_stop_at_batch_end_cuts_the_epoch_short(quiet_trainer: Callable[..., Trainer]) -> None:
    trainer = quiet_trainer(max_epochs=3)
    events: list[tuple[str, int]] = []

    @trainer.on("batch_end", id="stopper", when=lambda s: s.iteration == 3)
    def stop() -> Stop:
        return Stop("enough batches")

    for event in ("validation_start", "epoch_end", "train_end", "teardown"):

        def record(*, state: TrainerState, _event: str = event) -> None:
            events.append((_event, state.current_epoch))

        trainer.on(event)(record)

    state = trainer.train(make_loader(), make_loader(16))
    assert events == [("epoch_end", 0), ("train_end", 0), ("teardown", 0)]
    assert state.iteration == 3
    assert state.current_epoch == 0
    assert state.stopped_by == "stopper"
    assert state.stop_reason == "enough batches"
    assert state.should_stop
    assert state.metrics == {}
    call = read_maps(trainer.maps.path)["calls"][-1]
    assert call["status"] == "stopped"
    assert call["stop"] == {
        "by": "stopper",
        "reason": "enough batches",
        "resumable": False,
    }
    assert {"event": "batch_end", "source": "stopper", "command": repr(Stop("enough batches"))} in (
        call["requests"]
    )


def test_a_stop_without_reason_records_where_it_was_asked(
    quiet_trainer: Callable[..., Trainer],
) -> None:
    trainer = quiet_trainer(max_epochs=3)

    @trainer.on("epoch_end", id="quitter")
    def stop() -> Stop:
        return Stop()

    state = trainer.train(make_loader(), make_loader(16))
    assert state.stop_reason == "requested at epoch_end"
    assert state.stopped_by == "quitter"
    assert state.iteration == 6
    assert state.metrics


def test_stop_at_epoch_start_finishes_the_epoch_as_the_catalogue_documents(
    quiet_trainer: Callable[..., Trainer],
) -> None:
    trainer = quiet_trainer(max_epochs=3)
    validated: list[int] = []

    @trainer.on("epoch_start", id="stopper")
    def stop() -> Stop:
        return Stop("at epoch start")

    @trainer.on("validation_end")
    def record(*, state: TrainerState) -> None:
        validated.append(state.current_epoch)

    state = trainer.train(make_loader(), make_loader(16))
    assert state.current_epoch == 0
    assert state.iteration == 6
    assert validated == [0]


def test_skipping_every_batch_at_batch_start_leaves_the_weights_unchanged(
    quiet_trainer: Callable[..., Trainer],
) -> None:
    trainer = quiet_trainer()
    before = parameters_of(trainer.model)
    received: list[tuple[object, object]] = []
    forwards: list[int] = []

    @trainer.on("batch_start")
    def skip() -> SkipStep:
        return SkipStep("not this one")

    @trainer.on("forward_start")
    def forward(*, state: TrainerState) -> None:
        forwards.append(state.iteration)

    @trainer.on("batch_end")
    def record(*, loss: torch.Tensor | None, losses: object) -> None:
        received.append((loss, losses))

    state = trainer.train(make_loader())
    assert_same_weights(before, parameters_of(trainer.model))
    assert received == [(None, None)] * 12
    assert forwards == []
    assert state.global_step == 0
    assert state.iteration == 12
    assert state.train_loss is None


def test_skipping_one_batch_at_batch_start_trains_on_the_others(
    quiet_trainer: Callable[..., Trainer],
) -> None:
    trainer = quiet_trainer(device="cpu")

    @trainer.on("batch_start", when=lambda s: s.batch_idx == 2)
    def skip() -> SkipStep:
        return SkipStep()

    state = trainer.train(make_loader())
    batches = list(make_loader())
    expected = manual_training(make_model(), batches[:2] + batches[3:], epochs=2)
    assert_same_weights(parameters_of(trainer.model), expected)
    assert state.global_step == 10


def test_skipping_the_last_batch_still_steps_the_open_accumulation_group(
    quiet_trainer: Callable[..., Trainer],
) -> None:
    trainer = quiet_trainer(device="cpu", accumulate_grad_batches=3)

    @trainer.on("batch_start", when=lambda s: s.batch_idx == 4)
    def skip() -> SkipStep:
        return SkipStep()

    loader = make_loader(samples=40)
    state = trainer.train(loader)
    expected = manual_training(make_model(), list(loader)[:4], epochs=2, accumulate=3)
    assert state.global_step == 4
    assert all(p.grad is None for p in trainer.model.parameters())
    for a, b in zip(parameters_of(trainer.model), expected, strict=True):
        torch.testing.assert_close(a, b)


def test_skipping_at_optimizer_step_start_leaves_the_weights_unchanged(
    quiet_trainer: Callable[..., Trainer],
) -> None:
    trainer = quiet_trainer()
    before = parameters_of(trainer.model)
    backwards: list[int] = []

    @trainer.on("optimizer_step_start")
    def skip() -> SkipStep:
        return SkipStep("frozen")

    @trainer.on("backward_end")
    def record(*, state: TrainerState) -> None:
        backwards.append(state.iteration)

    state = trainer.train(make_loader())
    assert_same_weights(before, parameters_of(trainer.model))
    assert backwards == list(range(1, 13))
    assert state.global_step == 0
    assert all(p.grad is None for p in trainer.model.parameters())


def test_best_metrics_follow_higher_is_better(quiet_trainer: Callable[..., Trainer]) -> None:
    trainer = quiet_trainer(
        max_epochs=4,
        metrics={
            "loss": LossMetricConfig(),
            "accuracy": torchmetrics.Accuracy(task="multiclass", num_classes=2),
        },
        model=make_model(lr=0.5),
    )
    history: list[dict[str, float]] = []

    @trainer.on("validation_end")
    def record(*, metrics: dict[str, float]) -> None:
        history.append(dict(metrics))

    state = trainer.train(make_loader(), flipped_loader())
    accuracy = [entry["accuracy"] for entry in history]
    loss = [entry["loss"] for entry in history]
    assert len(history) == 4
    assert accuracy.index(max(accuracy)) != accuracy.index(min(accuracy))
    assert loss.index(max(loss)) != loss.index(min(loss))
    assert state.best_metrics == {"loss": min(loss), "accuracy": max(accuracy)}
    assert state.best_epochs == {
        "loss": loss.index(min(loss)),
        "accuracy": accuracy.index(max(accuracy)),
    }


def flipped_loader() -> DataLoader[Any]:
    inputs, target = make_dataset(16, seed=1).tensors
    return DataLoader(TensorDataset(inputs, 1 - target), batch_size=8)


def test_validate_test_and_predict_return_what_they_promise(
    quiet_trainer: Callable[..., Trainer],
) -> None:
    trainer = quiet_trainer(device="cpu")
    trainer.train(make_loader())
    weights = parameters_of(trainer.model)
    loader = make_loader(samples=20, seed=1)
    inputs, target = make_dataset(20, seed=1).tensors
    with torch.no_grad():
        expected_loss = nn.functional.cross_entropy(trainer.model.network(inputs), target)

    validated = trainer.validate(loader)
    tested = trainer.test(loader)
    predictions = trainer.predict(loader)

    assert set(validated) == {"loss"}
    assert type(validated["loss"]) is float
    assert validated["loss"] == pytest.approx(expected_loss.item(), rel=1e-5)
    assert tested == validated
    assert trainer.state.metrics == validated
    assert [tuple(p.shape) for p in predictions] == [(8, 2), (8, 2), (4, 2)]
    assert all(p.device.type == "cpu" for p in predictions)
    with torch.no_grad():
        torch.testing.assert_close(torch.cat(predictions), trainer.model.network(inputs))
    assert_same_weights(weights, parameters_of(trainer.model))
    assert [call["call"] for call in read_maps(trainer.maps.path)["calls"]] == [
        "train",
        "validate",
        "test",
        "predict",
    ]


def test_validate_before_training_evaluates_the_initial_model(
    quiet_trainer: Callable[..., Trainer],
) -> None:
    trainer = quiet_trainer()
    inputs, target = make_dataset().tensors
    with torch.no_grad():
        expected = nn.functional.cross_entropy(make_model().network(inputs), target).item()
    assert trainer.validate(make_loader())["loss"] == pytest.approx(expected, rel=1e-5)
    assert trainer.state.stage == "idle"
    assert trainer.state.iteration == 0


def test_every_two_on_epoch_end_fires_on_epoch_numbers_two_and_four(
    quiet_trainer: Callable[..., Trainer],
) -> None:
    trainer = quiet_trainer(max_epochs=5)
    fired: list[int] = []

    @trainer.on("epoch_end", every=2)
    def record(*, state: TrainerState) -> None:
        fired.append(state.epoch_number)

    trainer.train(make_loader(samples=16))
    assert fired == [2, 4]


def test_emit_delivers_a_declared_custom_event(quiet_trainer: Callable[..., Trainer]) -> None:
    trainer = quiet_trainer()
    trainer.bus.declare(EventSpec("sample_logged", payload=("value",)))
    received: list[tuple[int, str]] = []

    @trainer.on("sample_logged")
    def record(*, value: int, state: TrainerState) -> None:
        received.append((value, state.stage))

    @trainer.on("epoch_end", once=True)
    def announce() -> None:
        trainer.emit("sample_logged", value=7)

    trainer.train(make_loader())
    assert received == [(7, "train")]


def test_emit_with_a_wrong_payload_names_both_payloads(
    quiet_trainer: Callable[..., Trainer],
) -> None:
    trainer = quiet_trainer()
    trainer.bus.declare(EventSpec("sample_logged", payload=("value",)))
    received: list[object] = []
    trainer.on("sample_logged")(lambda *, value: received.append(value))
    with pytest.raises(
        ConfigurationError,
        match=r"emit\('sample_logged'\) got payload \['amount'\], but the event declares "
        r"\['value'\]",
    ):
        trainer.emit("sample_logged", amount=7)
    assert received == []


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        pytest.param(
            {"model": nn.Linear(4, 2)},
            ConfigurationTypeError,
            r"model=Linear\(.*\) is not a trainbus\.Model.*SupervisedModel\(network, loss\)",
            id="model-not-a-trainbus-model",
        ),
        pytest.param(
            {"max_epochs": 0},
            ConfigurationError,
            r"max_epochs=0 is not a positive integer; pass e\.g\. max_epochs=1",
            id="max-epochs-zero",
        ),
        pytest.param(
            {"max_epochs": -1},
            ConfigurationError,
            r"max_epochs=-1 is not a positive integer",
            id="max-epochs-negative",
        ),
        pytest.param(
            {"max_epochs": 1.5},
            ConfigurationError,
            r"max_epochs=1\.5 is not a positive integer",
            id="max-epochs-float",
        ),
        pytest.param(
            {"gradient_clip_val": -1},
            ConfigurationError,
            r"gradient_clip_val=-1 is not a positive finite number; pass e\.g\. "
            r"gradient_clip_val=1\.0, or None",
            id="negative-clip",
        ),
        pytest.param(
            {"gradient_clip_algorithm": "l2"},
            ConfigurationError,
            r"gradient_clip_algorithm='l2' is not 'norm' or 'value'",
            id="clip-algorithm",
        ),
        pytest.param(
            {"device": "tpu"},
            ConfigurationError,
            r"device='tpu' is not a device name; use 'auto', 'cpu', 'cuda' or 'cuda:N'",
            id="device-tpu",
        ),
        pytest.param(
            {"default_callbacks": [EarlyStoppingCallback]},
            ConfigurationError,
            r"default_callbacks lists \[<class '.*EarlyStoppingCallback'>\], which are not "
            r"default callbacks; the defaults are \['LoggerCallback', 'MonitorCallback', "
            r"'MetricsWriterCallback', 'ModelCheckpointCallback', 'TrainingCheckpointCallback'\]",
            id="not-a-default-callback",
        ),
        pytest.param(
            {"callbacks": [object()]},
            ConfigurationTypeError,
            r"callbacks\[0\] is <object object at .*>, not a trainbus Callback; subclass "
            r"trainbus\.Callback",
            id="callback-object",
        ),
        pytest.param(
            {"callbacks": [MetricsWriterCallback]},
            ConfigurationTypeError,
            r"callbacks\[0\] is <class '.*MetricsWriterCallback'>, not a trainbus Callback "
            r"\(a class was passed: instantiate it",
            id="callback-class",
        ),
        pytest.param(
            {"callbacks": [EarlyStoppingCallback("accuracy", mode="max")]},
            ConfigurationError,
            r"EarlyStoppingCallback monitors metric 'accuracy', which the Trainer does not "
            r"compute\. Known metrics: \['loss'\]\. Add it to Trainer\(metrics=\.\.\.\)",
            id="unknown-metric",
        ),
        pytest.param(
            {"callbacks": [EarlyStoppingCallback("val_loss")]},
            ConfigurationError,
            r"monitors metric 'val_loss', which the Trainer does not compute\. "
            r"Did you mean 'loss'\?",
            id="unknown-metric-did-you-mean",
        ),
        pytest.param(
            {"seed": -3},
            ConfigurationError,
            r"seed=-3 is not an int in \[0, 2\*\*32\)",
            id="negative-seed",
        ),
    ],
)
def test_bad_construction_arguments_fail_clearly_and_write_nothing(
    maps_path: Path, options: dict[str, Any], error: type[Exception], message: str
) -> None:
    arguments: dict[str, Any] = {"maps": maps_path, "model": make_model(), "max_epochs": 2}
    arguments.update(options)
    with pytest.raises(error, match=message):
        Trainer(**arguments)
    assert not maps_path.exists()


@pytest.mark.parametrize("priority", [1.5, "high", True, None])
def test_a_priority_that_is_not_an_int_is_refused_by_trainer_on(
    quiet_trainer: Callable[..., Trainer], priority: object
) -> None:
    trainer = quiet_trainer()
    with pytest.raises(
        ConfigurationTypeError, match=rf"priority={priority!r} \(\w+\) is not an int"
    ):
        trainer.on("epoch_end", priority=priority)(lambda: None)  # type: ignore[arg-type]
    assert trainer.plan("epoch_end") == []


def test_a_loss_that_is_not_a_scalar_names_its_shape(
    quiet_trainer: Callable[..., Trainer],
) -> None:
    model = PerSampleLossModel(make_model().network, nn.CrossEntropyLoss())
    trainer = quiet_trainer(model=model)
    with pytest.raises(
        ModelContractError,
        match=r"loss that is a tensor of shape \(8,\); the loss must be a scalar tensor: "
        r"reduce it, e\.g\. loss\.mean\(\)",
    ):
        trainer.train(make_loader())


def test_a_loss_dict_without_loss_key_names_its_keys(
    quiet_trainer: Callable[..., Trainer],
) -> None:
    model = UnnamedLossModel(make_model().network, nn.CrossEntropyLoss())
    trainer = quiet_trainer(model=model)
    with pytest.raises(
        ModelContractError,
        match=r"forward_step returned a dict with keys \['total'\]; .* under 'loss'",
    ):
        trainer.train(make_loader())


def test_an_empty_dataloader_is_refused_before_anything_is_written(
    quiet_trainer: Callable[..., Trainer], maps_path: Path
) -> None:
    empty = DataLoader(TensorDataset(torch.empty(0, 4), torch.empty(0, dtype=torch.long)))
    trainer = quiet_trainer()
    with pytest.raises(DataError, match=r"train_loader has no batches \(len 0\)"):
        trainer.train(empty)
    with pytest.raises(DataError, match=r"val_loader has no batches \(len 0\)"):
        trainer.train(make_loader(), empty)
    with pytest.raises(DataError, match=r"loader has no batches \(len 0\)"):
        trainer.validate(empty)
    assert not maps_path.exists()


def test_an_iterable_without_len_that_yields_nothing_is_refused(
    quiet_trainer: Callable[..., Trainer], maps_path: Path
) -> None:
    trainer = quiet_trainer()
    with pytest.raises(DataError, match=r"train_loader yielded no batches; check that"):
        trainer.train(NoLengthLoader([]))
    assert read_maps(maps_path)["calls"][-1]["status"] == "failed"
    with pytest.raises(DataError, match=r"val_loader yielded no batches"):
        trainer.train(make_loader(), NoLengthLoader([]))


def test_a_loader_that_is_not_iterable_is_refused(quiet_trainer: Callable[..., Trainer]) -> None:
    trainer = quiet_trainer()
    with pytest.raises(DataError, match=r"train_loader=42 is not iterable"):
        trainer.train(42)  # type: ignore[arg-type]


@pytest.mark.fault(
    "A handler that raises",
    outcome=(
        "training stops with a note naming the event and the handler; exception and teardown "
        "run; the call recorded failed"
    ),
)
def test_a_failing_handler_propagates_with_a_note_and_the_run_is_recorded_failed(
    quiet_trainer: Callable[..., Trainer], maps_path: Path
) -> None:
    trainer = quiet_trainer()
    seen: list[tuple[str, object]] = []

    @trainer.on("batch_end", id="boom", when=lambda s: s.iteration == 2)
    def explode() -> None:
        raise RuntimeError("kaboom")

    @trainer.on("exception")
    def on_exception(*, exception: BaseException, state: TrainerState) -> None:
        seen.append(("exception", exception))

    @trainer.on("teardown")
    def on_teardown(*, state: TrainerState) -> None:
        seen.append(("teardown", state.iteration))

    with pytest.raises(RuntimeError, match="kaboom") as caught:
        trainer.train(make_loader())
    assert "trainbus: raised by handler 'boom' while handling event 'batch_end'" in (
        caught.value.__notes__
    )
    assert seen == [("exception", caught.value), ("teardown", 2)]
    call = read_maps(maps_path)["calls"][-1]
    assert call["status"] == "failed"
    assert call["error"] == "RuntimeError: kaboom"
    assert call["iteration"] == 2
    assert trainer.state.stage == "idle"


@pytest.mark.fault(
    "An exception handler that raises too",
    outcome="the original error propagates, the second one attached as a note",
)
def test_a_failing_exception_handler_does_not_hide_the_original_error(
    quiet_trainer: Callable[..., Trainer], maps_path: Path
) -> None:
    trainer = quiet_trainer()
    later: list[BaseException] = []

    @trainer.on("forward_start")
    def explode() -> None:
        raise RuntimeError("original failure")

    @trainer.on("exception", id="clumsy", priority=5)
    def clumsy() -> None:
        raise ValueError("secondary failure")

    @trainer.on("exception", id="careful")
    def careful(*, exception: BaseException) -> None:
        later.append(exception)

    with pytest.raises(RuntimeError, match="original failure") as caught:
        trainer.train(make_loader())
    notes = caught.value.__notes__
    assert "trainbus: exception handler 'clumsy' also raised ValueError: secondary failure" in notes
    assert later == [caught.value]
    assert read_maps(maps_path)["calls"][-1]["error"] == "RuntimeError: original failure"


def test_a_failing_teardown_after_an_error_becomes_a_note(
    quiet_trainer: Callable[..., Trainer],
) -> None:
    trainer = quiet_trainer()

    @trainer.on("epoch_start")
    def explode() -> None:
        raise RuntimeError("first")

    @trainer.on("teardown")
    def broken_teardown() -> None:
        raise OSError("disk gone")

    with pytest.raises(RuntimeError, match="first") as caught:
        trainer.train(make_loader())
    assert any(
        "while tearing down after this error, OSError: disk gone" in note
        for note in caught.value.__notes__
    )


def test_predict_on_an_iterable_that_yields_nothing_is_a_clear_error(
    quiet_trainer: Callable[..., Trainer],
) -> None:
    trainer = quiet_trainer()
    with pytest.raises(DataError, match="no batches"):
        trainer.predict(iter([]))


def test_a_failing_evaluation_leaves_the_model_in_training_mode(
    quiet_trainer: Callable[..., Trainer],
) -> None:
    trainer = quiet_trainer(max_epochs=1)
    trainer.model.train()
    with pytest.raises(DataError):
        trainer.validate(iter([]))
    assert trainer.model.training


def test_compile_opt_in_wraps_the_steps_and_trains_to_the_same_weights(tmp_path: Path) -> None:
    loader = make_loader(samples=16, batch_size=8)
    results = []
    for name, compile_options in (("eager", False), ("compiled", {"backend": "eager"})):
        trainer = Trainer(
            tmp_path / name,
            make_model(),
            default_callbacks=False,
            max_epochs=1,
            device="cpu",
            compile=compile_options,
        )
        trainer.train(loader)
        results.append((trainer, [p.detach().clone() for p in trainer.model.parameters()]))
    (_, plain), (compiled_trainer, compiled) = results
    assert hasattr(compiled_trainer.model.forward_step, "_torchdynamo_orig_callable")
    assert all(torch.allclose(a, b) for a, b in zip(plain, compiled, strict=True))


class PoisonedModel(SupervisedModel):
    """Returns a NaN loss at chosen training steps (counted by forward_step calls)."""

    def __init__(self, poisoned: set[int]) -> None:
        reference = make_model()
        super().__init__(reference.network, reference.loss, reference.optimizer_factory)
        self.poisoned = poisoned
        self.steps = 0

    def forward_step(self, batch: Any) -> Any:
        self.steps += 1
        loss = super().forward_step(batch)
        return loss * float("nan") if self.steps in self.poisoned else loss


@pytest.mark.fault(
    "A NaN training loss (default policy)",
    outcome="training stops at that log interval, the steps named; never trains past it",
)
def test_a_non_finite_loss_stops_training_at_its_log_interval_naming_the_steps(
    quiet_trainer: Callable[..., Trainer],
) -> None:
    trainer = quiet_trainer(model=PoisonedModel({5}), log_every_n_batches=2, max_epochs=3)
    state = trainer.train(make_loader())
    assert state.stopped_by == "trainbus.nonfinite_loss"
    assert state.stop_reason is not None and "over steps 5-6 (not finite)" in state.stop_reason
    assert "nonfinite_loss='skip'" in state.stop_reason
    assert state.iteration == 6  # never trains past the interval that showed it
    assert not state.stop_resumable


@pytest.mark.fault(
    "A NaN training loss with nonfinite_loss='skip'",
    outcome="the batch skipped with a warning naming the step; weights stay finite",
)
def test_skip_leaves_the_weights_untouched_by_a_non_finite_batch_and_warns(
    quiet_trainer: Callable[..., Trainer],
) -> None:
    model = PoisonedModel({3})
    trainer = quiet_trainer(model=model, nonfinite_loss="skip", max_epochs=1)
    with pytest.warns(TrainbusWarning, match=r"loss of training step 3 .* is nan; the batch"):
        state = trainer.train(make_loader())
    assert state.stopped_by is None
    assert state.global_step == 5  # 6 batches, one skipped
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert state.train_loss is not None and math.isfinite(state.train_loss)


def test_a_bad_nonfinite_policy_is_refused(quiet_trainer: Callable[..., Trainer]) -> None:
    with pytest.raises(ConfigurationError, match=r"nonfinite_loss='ignore' is not 'stop' or"):
        quiet_trainer(nonfinite_loss="ignore")
