from __future__ import annotations

import contextlib
import functools
import io
import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.optim import lr_scheduler as schedulers

from trainbus import Model, SkipStep, Trainer, TrainerState, TrainingCheckpointCallback
from trainbus.errors import (
    CheckpointError,
    ConfigurationError,
    ConfigurationTypeError,
    TrainbusWarning,
)
from trainbus.handlers.lr_scheduler import LRSchedulerCallback

from ..conftest import make_loader, make_model

LR = 0.05  # make_model's SGD learning rate
BATCHES = 6  # make_loader(): 48 samples in batches of 8


class ConstantLossModel(Model):
    """A loss that never changes (so a monitored plateau happens), one SGD parameter."""

    def __init__(self, lr: float = 0.1) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(4))
        self.lr = lr

    def forward_step(self, batch: Any) -> torch.Tensor:
        return self.weight.sum() * 0 + 1.0

    def build_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD([self.weight], lr=self.lr)


class PrebuiltOptimizersModel(Model):
    """Builds its optimizers at construction, so a scheduler can be built on them beforehand."""

    def __init__(self, lrs: Sequence[float] = (0.1,)) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.first = nn.Linear(4, 8)
        self.second = nn.Linear(8, 2)
        groups = [self.first.parameters(), self.second.parameters()]
        if len(lrs) == 1:
            groups = [self.parameters()]
        self.optimizers: list[torch.optim.Optimizer] = [
            torch.optim.SGD(params, lr=lr) for params, lr in zip(groups, lrs, strict=True)
        ]

    def forward_step(self, batch: Any) -> torch.Tensor:
        inputs, target = batch
        logits = self.second(torch.relu(self.first(inputs)))
        return nn.functional.cross_entropy(logits, target)

    def build_optimizers(self) -> list[torch.optim.Optimizer]:
        return self.optimizers


def record(trainer: Trainer, event: str) -> list[tuple[float, ...]]:
    """``state.learning_rates`` at every ``event``, seen before any handler of it runs."""
    seen: list[tuple[float, ...]] = []

    @trainer.on(event, priority=100)
    def remember(*, state: TrainerState) -> None:
        seen.append(state.learning_rates)

    return seen


def first_rates(rates: Iterable[tuple[float, ...]]) -> list[float]:
    return [values[0] for values in rates]


# ------------------------------------------------------------------- schedules


@pytest.mark.parametrize(
    ("factory", "frequency", "epoch_rates"),
    [
        pytest.param(
            functools.partial(schedulers.StepLR, step_size=1, gamma=0.5),
            1,
            [LR, LR / 2, LR / 4, LR / 8, LR / 16],
            id="step_lr-every-epoch",
        ),
        pytest.param(
            functools.partial(schedulers.StepLR, step_size=2, gamma=0.5),
            1,
            [LR, LR, LR / 2, LR / 2, LR / 4],
            id="step_lr-step_size-2",
        ),
        pytest.param(
            functools.partial(schedulers.StepLR, step_size=1, gamma=0.5),
            2,
            [LR, LR, LR / 2, LR / 2, LR / 4],
            id="step_lr-frequency-2",
        ),
        pytest.param(
            functools.partial(schedulers.StepLR, step_size=1, gamma=0.5),
            3,
            [LR, LR, LR, LR / 2, LR / 2],
            id="step_lr-frequency-3",
        ),
        pytest.param(
            lambda optimizer: schedulers.MultiStepLR(optimizer, milestones=[1, 4], gamma=0.1),
            1,
            [LR, LR / 10, LR / 10, LR / 10, LR / 100],
            id="multistep-lambda-factory",
        ),
    ],
)
def test_epoch_interval_follows_the_schedule_in_state(
    quiet_trainer: Callable[..., Trainer],
    factory: Callable[[torch.optim.Optimizer], schedulers.LRScheduler],
    frequency: int,
    epoch_rates: list[float],
) -> None:
    callback = LRSchedulerCallback(factory, frequency=frequency)
    trainer = quiet_trainer(callbacks=[callback], max_epochs=len(epoch_rates))
    at_epoch_start = record(trainer, "epoch_start")
    at_step = record(trainer, "optimizer_step_end")

    trainer.train(make_loader())

    assert first_rates(at_epoch_start) == pytest.approx(epoch_rates)
    # Within an epoch every optimizer step used the epoch's learning rate.
    expected_steps = [rate for rate in epoch_rates for _ in range(BATCHES)]
    assert first_rates(at_step) == pytest.approx(expected_steps)
    assert trainer.optimizers[0] is callback.scheduler.optimizer  # type: ignore[union-attr]


def reference_run(
    factory: Callable[[torch.optim.Optimizer], schedulers.LRScheduler],
    *,
    frequency: int,
    epochs: int,
    accumulate: int,
) -> tuple[list[float], dict[str, torch.Tensor]]:
    """The learning rate of every optimizer step and the final weights, by a plain loop."""
    model = make_model()
    optimizer = model.build_optimizers()
    scheduler = factory(optimizer)
    rates: list[float] = []
    steps = 0
    for _ in range(epochs):
        batches = list(make_loader())
        for index, batch in enumerate(batches):
            loss = model.forward_step(batch)
            assert isinstance(loss, torch.Tensor)
            (loss / accumulate).backward()  # type: ignore[no-untyped-call]
            if (index + 1) % accumulate == 0 or index + 1 == len(batches):
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                rates.append(float(optimizer.param_groups[0]["lr"]))
                steps += 1
                if steps % frequency == 0:
                    scheduler.step()
    return rates, model.state_dict()


@pytest.mark.parametrize(
    ("factory", "frequency", "accumulate"),
    [
        pytest.param(
            functools.partial(schedulers.OneCycleLR, max_lr=0.2, total_steps=3 * BATCHES),
            1,
            1,
            id="one_cycle",
        ),
        pytest.param(
            lambda optimizer: schedulers.LambdaLR(optimizer, lambda step: 1 / (1 + step)),
            1,
            1,
            id="lambda",
        ),
        pytest.param(
            lambda optimizer: schedulers.LambdaLR(optimizer, lambda step: 0.8**step),
            4,
            1,
            id="lambda-frequency-4",
        ),
        pytest.param(
            functools.partial(schedulers.CosineAnnealingLR, T_max=4),
            1,
            2,
            id="cosine-accumulate-2",
        ),
        pytest.param(
            functools.partial(schedulers.LinearLR, start_factor=0.25, total_iters=5),
            2,
            3,
            id="linear-frequency-2-accumulate-3",
        ),
    ],
)
def test_step_interval_matches_a_hand_written_loop(
    quiet_trainer: Callable[..., Trainer],
    factory: Callable[[torch.optim.Optimizer], schedulers.LRScheduler],
    frequency: int,
    accumulate: int,
) -> None:
    epochs = 3
    expected_rates, expected_weights = reference_run(
        factory, frequency=frequency, epochs=epochs, accumulate=accumulate
    )
    trainer = quiet_trainer(
        callbacks=[LRSchedulerCallback(factory, interval="step", frequency=frequency)],
        max_epochs=epochs,
        accumulate_grad_batches=accumulate,
    )
    at_step = record(trainer, "optimizer_step_end")

    trainer.train(make_loader())

    assert len(set(expected_rates)) > 1  # the schedule does change the learning rate
    assert first_rates(at_step) == expected_rates
    weights = trainer.model.state_dict()
    for name, value in expected_weights.items():
        assert torch.equal(weights[name], value), name


def test_skipped_optimizer_steps_are_not_counted(quiet_trainer: Callable[..., Trainer]) -> None:
    callback = LRSchedulerCallback(
        functools.partial(schedulers.StepLR, step_size=1, gamma=0.5), interval="step"
    )
    trainer = quiet_trainer(callbacks=[callback], max_epochs=1)

    @trainer.on("optimizer_step_start", when=lambda state: state.iteration % 2 == 0)
    def skip_even() -> SkipStep:
        return SkipStep("every second step is skipped")

    trainer.train(make_loader())

    assert trainer.state.global_step == BATCHES // 2
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(LR / 2 ** (BATCHES // 2))


# -------------------------------------------------------------------- plateau


@pytest.mark.parametrize(
    ("frequency", "val_every", "epoch_rates", "final_rate"),
    [
        # patience=1: the 1st validation sets best, the 3rd is the 2nd without improvement.
        pytest.param(1, 1, [0.1, 0.1, 0.1, 0.05, 0.05, 0.025], 0.025, id="every-validation"),
        pytest.param(2, 1, [0.1] * 6, 0.05, id="frequency-2-counts-validations"),
        pytest.param(1, 2, [0.1] * 6, 0.05, id="validation-every-2-epochs"),
        pytest.param(1, 3, [0.1] * 6, 0.1, id="two-validations-only"),
    ],
)
def test_plateau_reduces_the_rate_when_the_loss_stalls(
    quiet_trainer: Callable[..., Trainer],
    frequency: int,
    val_every: int,
    epoch_rates: list[float],
    final_rate: float,
) -> None:
    callback = LRSchedulerCallback(
        functools.partial(schedulers.ReduceLROnPlateau, factor=0.5, patience=1),
        monitor="loss",
        frequency=frequency,
    )
    trainer = quiet_trainer(
        model=ConstantLossModel(),
        callbacks=[callback],
        max_epochs=6,
        val_every_n_epochs=val_every,
    )
    at_epoch_start = record(trainer, "epoch_start")

    trainer.train(make_loader(16), make_loader(8, seed=1))

    assert trainer.state.metrics["loss"] == pytest.approx(1.0)
    assert first_rates(at_epoch_start) == pytest.approx(epoch_rates)
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(final_rate)
    assert isinstance(callback.scheduler, schedulers.ReduceLROnPlateau)


def test_plateau_without_validation_warns(quiet_trainer: Callable[..., Trainer]) -> None:
    callback = LRSchedulerCallback(schedulers.ReduceLROnPlateau, monitor="loss")
    trainer = quiet_trainer(model=ConstantLossModel(), callbacks=[callback], max_epochs=2)

    with pytest.warns(TrainbusWarning, match="never stepped.*pass a val_loader"):
        trainer.train(make_loader(16))

    assert trainer.optimizers[0].param_groups[0]["lr"] == 0.1


def test_plateau_monitor_must_be_a_trainer_metric(quiet_trainer: Callable[..., Trainer]) -> None:
    callback = LRSchedulerCallback(schedulers.ReduceLROnPlateau, monitor="los")
    with pytest.raises(ConfigurationError, match=r"monitors metric 'los'.*Did you mean 'loss'"):
        quiet_trainer(callbacks=[callback])
    assert callback.metric_names() == ("los",)


# ------------------------------------------------------- instance vs factory


@pytest.mark.parametrize(
    ("form", "lrs", "optimizer_index"),
    [
        pytest.param("factory", (0.1,), 0, id="factory"),
        pytest.param("instance", (0.1,), 0, id="instance"),
        pytest.param("factory", (0.1, 0.2), 1, id="factory-second-optimizer"),
        pytest.param("instance", (0.1, 0.2), 1, id="instance-second-optimizer"),
        pytest.param("factory", (0.1, 0.2), 0, id="factory-first-of-two"),
    ],
)
def test_instance_and_factory_drive_the_chosen_optimizer(
    quiet_trainer: Callable[..., Trainer],
    form: str,
    lrs: tuple[float, ...],
    optimizer_index: int,
) -> None:
    model = PrebuiltOptimizersModel(lrs)
    if form == "instance":
        built = schedulers.ExponentialLR(model.optimizers[optimizer_index], gamma=0.5)
        callback = LRSchedulerCallback(built)
        assert callback.scheduler is built
    else:
        callback = LRSchedulerCallback(
            functools.partial(schedulers.ExponentialLR, gamma=0.5),
            optimizer_index=optimizer_index,
        )
        assert callback.scheduler is None
    trainer = quiet_trainer(model=model, callbacks=[callback], max_epochs=3)
    at_epoch_start = record(trainer, "epoch_start")

    trainer.train(make_loader())

    def rates_after(epochs: int) -> tuple[float, ...]:
        return tuple(
            lr * 0.5**epochs if index == optimizer_index else lr for index, lr in enumerate(lrs)
        )

    assert callback.scheduler is not None
    assert callback.scheduler.optimizer is model.optimizers[optimizer_index]
    assert callback.optimizer_index == optimizer_index
    for epoch, rates in enumerate(at_epoch_start):
        assert rates == pytest.approx(rates_after(epoch))
    current = tuple(g["lr"] for o in trainer.optimizers for g in o.param_groups)
    assert current == pytest.approx(rates_after(3))


# --------------------------------------------------------------- bad arguments


def _foreign_step_lr() -> schedulers.StepLR:
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    return schedulers.StepLR(optimizer, step_size=1)


def _foreign_plateau() -> schedulers.ReduceLROnPlateau:
    return schedulers.ReduceLROnPlateau(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1))


STEP_LR = functools.partial(schedulers.StepLR, step_size=1)


@pytest.mark.parametrize(
    ("arguments", "error", "message"),
    [
        pytest.param(
            {"scheduler": "step"},
            ConfigurationTypeError,
            r"scheduler='step' is neither a learning-rate scheduler nor a factory.*partial",
            id="scheduler-string",
        ),
        pytest.param(
            {"scheduler": None},
            ConfigurationTypeError,
            r"scheduler=None is neither",
            id="scheduler-none",
        ),
        pytest.param(
            {"scheduler": STEP_LR, "interval": "batch"},
            ConfigurationError,
            r"interval='batch' is not 'epoch' or 'step'",
            id="interval-unknown",
        ),
        pytest.param(
            {"scheduler": STEP_LR, "interval": None},
            ConfigurationError,
            r"interval=None is not 'epoch' or 'step'",
            id="interval-none",
        ),
        *(
            pytest.param(
                {"scheduler": STEP_LR, "frequency": value},
                ConfigurationError,
                rf"frequency={re.escape(repr(value))} is not a positive integer",
                id=f"frequency-{value!r}",
            )
            for value in (0, -2, True, 1.5, "2")
        ),
        *(
            pytest.param(
                {"scheduler": STEP_LR, "optimizer_index": value},
                ConfigurationError,
                rf"optimizer_index={re.escape(repr(value))} is not a non-negative integer",
                id=f"optimizer_index-{value!r}",
            )
            for value in (-1, True, 1.0, None)
        ),
        *(
            pytest.param(
                {"scheduler": schedulers.ReduceLROnPlateau, "monitor": value},
                ConfigurationError,
                rf"monitor={re.escape(repr(value))} is not a metric name or None",
                id=f"monitor-{value!r}",
            )
            for value in ("", 3, ("loss",))
        ),
        pytest.param(
            {"scheduler": _foreign_plateau()},
            ConfigurationError,
            r"ReduceLROnPlateau reduces .* but monitor is None; pass the metric",
            id="plateau-instance-without-monitor",
        ),
        pytest.param(
            {"scheduler": _foreign_plateau(), "monitor": "loss", "interval": "step"},
            ConfigurationError,
            r"interval='step' cannot drive ReduceLROnPlateau",
            id="plateau-instance-per-step",
        ),
        pytest.param(
            {"scheduler": _foreign_step_lr(), "monitor": "loss"},
            ConfigurationError,
            r"monitor='loss' is given, but StepLR does not read a metric",
            id="monitor-with-step_lr-instance",
        ),
    ],
)
def test_bad_arguments_are_refused_at_construction(
    arguments: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        LRSchedulerCallback(**arguments)


def _wrong_optimizer(optimizer: torch.optim.Optimizer) -> schedulers.StepLR:
    return _foreign_step_lr()


@pytest.mark.parametrize(
    ("scheduler", "options", "error", "message"),
    [
        pytest.param(
            lambda optimizer: "not a scheduler",
            {},
            ConfigurationTypeError,
            r"returned 'not a scheduler', not a torch.optim.lr_scheduler scheduler",
            id="factory-returns-other",
        ),
        pytest.param(
            functools.partial(schedulers.StepLR, gamma=0.5),
            {},
            ConfigurationError,
            r"calling the scheduler factory .* failed .*step_size.*only missing argument",
            id="factory-misses-an-argument",
        ),
        pytest.param(
            _wrong_optimizer,
            {},
            ConfigurationError,
            r"built StepLR on another optimizer than the one it was given \(optimizers\[0\]\)",
            id="factory-uses-another-optimizer",
        ),
        pytest.param(
            schedulers.ReduceLROnPlateau,
            {},
            ConfigurationError,
            r"ReduceLROnPlateau reduces .* but monitor is None",
            id="plateau-factory-without-monitor",
        ),
        pytest.param(
            schedulers.ReduceLROnPlateau,
            {"monitor": "loss", "interval": "step"},
            ConfigurationError,
            r"interval='step' cannot drive ReduceLROnPlateau",
            id="plateau-factory-per-step",
        ),
        pytest.param(
            STEP_LR,
            {"monitor": "loss"},
            ConfigurationError,
            r"monitor='loss' is given, but StepLR does not read a metric; drop monitor",
            id="monitor-with-step_lr-factory",
        ),
        pytest.param(
            STEP_LR,
            {"optimizer_index": 1},
            ConfigurationError,
            r"optimizer_index=1 but the model built 1 optimizer\(s\); pass an index below 1",
            id="optimizer_index-out-of-range",
        ),
        pytest.param(
            _foreign_step_lr(),
            {},
            ConfigurationError,
            r"drives an optimizer that is not one of the Trainer's 1 optimizer\(s\)\. "
            r"SupervisedModel .* pass a factory instead",
            id="instance-on-a-foreign-optimizer",
        ),
    ],
)
def test_bad_schedulers_are_refused_at_train_start(
    quiet_trainer: Callable[..., Trainer],
    scheduler: Any,
    options: dict[str, Any],
    error: type[Exception],
    message: str,
) -> None:
    trainer = quiet_trainer(callbacks=[LRSchedulerCallback(scheduler, **options)])
    steps = record(trainer, "optimizer_step_end")

    with pytest.raises(error, match=message):
        trainer.train(make_loader())

    assert steps == []


# ---------------------------------------------------------- state and config


def test_state_round_trips_through_a_weights_only_load(
    quiet_trainer: Callable[..., Trainer],
) -> None:
    factory = functools.partial(schedulers.OneCycleLR, max_lr=0.3, total_steps=4 * BATCHES)
    callback = LRSchedulerCallback(factory, interval="step", frequency=2)
    trainer = quiet_trainer(callbacks=[callback], max_epochs=2)
    trainer.train(make_loader())
    saved = callback.state_dict()
    buffer = io.BytesIO()
    torch.save(saved, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)

    assert saved["steps"] == 2 * BATCHES
    assert saved["class"] == "torch.optim.lr_scheduler.OneCycleLR"
    assert saved["scheduler"]["last_epoch"] == BATCHES  # frequency=2: one step in two

    # A fresh callback keeps the state until train_start builds the scheduler, then loads it.
    restored = LRSchedulerCallback(factory, interval="step", frequency=2)
    restored.load_state_dict(loaded)
    assert restored.state_dict() == loaded
    assert [restored.scheduler] == [None]  # not built before train_start
    rate = trainer.optimizers[0].param_groups[0]["lr"]
    restored.on_train_start(optimizers=[torch.optim.SGD(trainer.model.parameters(), lr=LR)])
    built = restored.scheduler
    assert isinstance(built, schedulers.OneCycleLR)
    assert restored.state_dict() == saved
    assert built.get_last_lr() == [rate]


def test_state_of_another_scheduler_class_is_refused(
    quiet_trainer: Callable[..., Trainer],
) -> None:
    callback = LRSchedulerCallback(STEP_LR)
    quiet_trainer(callbacks=[callback], max_epochs=1).train(make_loader())
    other = LRSchedulerCallback(functools.partial(schedulers.ExponentialLR, gamma=0.5))
    other.load_state_dict(callback.state_dict())
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)

    with pytest.raises(CheckpointError, match=r"holds the state of a torch.optim.*StepLR"):
        other.on_train_start(optimizers=[optimizer])


@pytest.mark.parametrize(
    ("callback", "expected"),
    [
        pytest.param(
            LRSchedulerCallback(functools.partial(schedulers.StepLR, step_size=2, gamma=0.5)),
            {
                "scheduler": "torch.optim.lr_scheduler.StepLR",
                "factory": None,
                "interval": "epoch",
                "frequency": 1,
                "monitor": None,
                "optimizer_index": 0,
            },
            id="partial",
        ),
        pytest.param(
            LRSchedulerCallback(
                lambda optimizer: schedulers.ExponentialLR(optimizer, gamma=0.5),
                interval="step",
                frequency=3,
            ),
            {
                "scheduler": "torch.optim.lr_scheduler.ExponentialLR",
                "interval": "step",
                "frequency": 3,
            },
            id="lambda",
        ),
        pytest.param(
            LRSchedulerCallback(schedulers.ReduceLROnPlateau, monitor="loss"),
            {
                "scheduler": "torch.optim.lr_scheduler.ReduceLROnPlateau",
                "factory": None,
                "monitor": "loss",
            },
            id="class",
        ),
    ],
)
def test_config_describes_the_scheduler_in_maps_json(
    quiet_trainer: Callable[..., Trainer],
    maps_path: Path,
    callback: LRSchedulerCallback,
    expected: dict[str, Any],
) -> None:
    before = callback.config()
    trainer = quiet_trainer(model=ConstantLossModel(), callbacks=[callback], max_epochs=1)
    trainer.train(make_loader(16), make_loader(8))

    written = json.loads((maps_path / "maps.json").read_text())
    (entry,) = [c for c in written["callbacks"] if c["id"] == "LRSchedulerCallback"]
    config = entry["config"]
    assert config == callback.config()
    assert {key: config[key] for key in expected} == expected
    options = config["options"]
    if "StepLR" in config["scheduler"]:
        assert before["options"] == {"step_size": 2, "gamma": 0.5}
        assert options["step_size"] == 2 and options["gamma"] == 0.5
    elif "Exponential" in config["scheduler"]:
        assert before["scheduler"] is None and "<lambda>" in before["factory"]
        assert options["gamma"] == 0.5
    else:
        assert options["mode"] == "min" and options["patience"] == 10
        assert "best" not in options and "num_bad_epochs" not in options


# ---------------------------------------------------------------- exact resume


class SimulatedKillError(Exception):
    """Raised in the middle of training to stand for a killed job."""


RESUME_CASES = [
    pytest.param(
        make_model,
        lambda model: LRSchedulerCallback(
            functools.partial(schedulers.StepLR, step_size=1, gamma=0.5)
        ),
        id="step_lr-per-epoch",
    ),
    pytest.param(
        make_model,
        lambda model: LRSchedulerCallback(
            functools.partial(schedulers.OneCycleLR, max_lr=0.2, total_steps=4 * BATCHES),
            interval="step",
        ),
        id="one_cycle-per-step",
    ),
    pytest.param(
        make_model,
        lambda model: LRSchedulerCallback(
            functools.partial(schedulers.LinearLR, start_factor=0.2, total_iters=20),
            interval="step",
            frequency=2,
        ),
        id="linear-per-2-steps",
    ),
    pytest.param(
        make_model,
        lambda model: LRSchedulerCallback(
            functools.partial(schedulers.ReduceLROnPlateau, factor=0.5, patience=0, threshold=0.5),
            monitor="loss",
        ),
        id="plateau",
    ),
    pytest.param(
        PrebuiltOptimizersModel,
        lambda model: LRSchedulerCallback(
            schedulers.OneCycleLR(model.optimizers[0], max_lr=0.2, total_steps=4 * BATCHES),
            interval="step",
        ),
        id="one_cycle-instance",
    ),
]


def _train(
    maps: Path,
    build_model: Callable[[], Model],
    make_callback: Callable[[Any], LRSchedulerCallback],
    *,
    interrupt_at: int | None = None,
    resume: bool = False,
) -> tuple[Trainer, list[tuple[int, tuple[float, ...]]]]:
    model = build_model()
    callbacks = [make_callback(model), TrainingCheckpointCallback(every_n_steps=3)]
    if resume:
        trainer = Trainer.from_maps(maps, model, callbacks=callbacks, default_callbacks=False)
    else:
        trainer = Trainer(maps, model, callbacks=callbacks, default_callbacks=False, max_epochs=4)
    rates: list[tuple[int, tuple[float, ...]]] = []

    @trainer.on("optimizer_step_end")
    def remember(*, state: TrainerState) -> None:
        rates.append((state.global_step, state.learning_rates))

    if interrupt_at is not None:

        @trainer.on("checkpoint")
        def interrupt(*, state: TrainerState, kind: str) -> None:
            if kind == "training" and state.iteration == interrupt_at:
                raise SimulatedKillError(f"interrupted at iteration {interrupt_at}")

    expect = (
        pytest.raises(SimulatedKillError) if interrupt_at is not None else contextlib.nullcontext()
    )
    with expect:
        trainer.train(make_loader(), make_loader(16, seed=1))
    return trainer, rates


@pytest.mark.parametrize(("build_model", "make_callback"), RESUME_CASES)
def test_resume_in_the_middle_of_an_epoch_is_exact(
    tmp_path: Path,
    build_model: Callable[[], Model],
    make_callback: Callable[[Any], LRSchedulerCallback],
) -> None:
    straight, straight_rates = _train(tmp_path / "straight", build_model, make_callback)
    interrupt_at = BATCHES + 3  # in the middle of the second epoch
    _, first_rates_ = _train(
        tmp_path / "resumed", build_model, make_callback, interrupt_at=interrupt_at
    )
    resumed, resumed_rates = _train(tmp_path / "resumed", build_model, make_callback, resume=True)

    assert [step for step, _ in first_rates_] == list(range(1, interrupt_at + 1))
    assert resumed_rates[0][0] == interrupt_at + 1
    assert len({rates for _, rates in straight_rates}) > 1  # the schedule changed the rate
    assert first_rates_ + resumed_rates == straight_rates
    assert resumed.state.global_step == straight.state.global_step == 4 * BATCHES
    for name, value in straight.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[name], value), name
    straight_groups = straight.optimizers[0].param_groups[0]
    resumed_groups = resumed.optimizers[0].param_groups[0]
    assert resumed_groups["lr"] == straight_groups["lr"]
    straight_scheduler = _scheduler_of(straight)
    resumed_scheduler = _scheduler_of(resumed)
    assert resumed_scheduler.state_dict() == straight_scheduler.state_dict()


def _scheduler_of(trainer: Trainer) -> Any:
    (callback,) = [c for c in trainer.callbacks if isinstance(c, LRSchedulerCallback)]
    assert callback.scheduler is not None
    return callback.scheduler


def test_resume_keeps_the_restored_learning_rate_before_the_next_step(
    tmp_path: Path,
) -> None:
    """Building LinearLR multiplies the rate by start_factor; the resume must not do it again."""

    def make_callback(model: Model) -> LRSchedulerCallback:
        return LRSchedulerCallback(
            functools.partial(schedulers.LinearLR, start_factor=0.5, total_iters=100),
            interval="step",
            frequency=1000,  # never steps: the rate stays the one building the scheduler set
        )

    _train(tmp_path / "maps", make_model, make_callback, interrupt_at=BATCHES + 3)
    resumed, rates = _train(tmp_path / "maps", make_model, make_callback, resume=True)

    assert {rate for _, rate in rates} == {(LR * 0.5,)}
    assert resumed.optimizers[0].param_groups[0]["lr"] == pytest.approx(LR * 0.5)


def test_learning_rates_reach_the_state_mapping_of_every_event(
    quiet_trainer: Callable[..., Trainer],
) -> None:
    trainer = quiet_trainer(
        callbacks=[LRSchedulerCallback(functools.partial(schedulers.StepLR, step_size=1))],
        max_epochs=2,
    )
    at_epoch_end: list[Mapping[str, Any]] = []

    @trainer.on("epoch_end")
    def remember(*, state: TrainerState) -> None:
        at_epoch_end.append(state.as_dict())

    trainer.train(make_loader())

    # epoch_end's state still shows the rate the epoch trained with; the next epoch the new one.
    rates = [rate for entry in at_epoch_end for rate in entry["learning_rates"]]
    assert rates == pytest.approx([LR, LR / 10])
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(LR / 100)


# ------------------------------------------------------------------------ reset


def test_reset_forgets_the_built_scheduler_its_counters_and_a_loaded_state() -> None:
    factory = functools.partial(schedulers.StepLR, step_size=1, gamma=0.5)
    callback = LRSchedulerCallback(factory, interval="step", frequency=2)
    fresh = LRSchedulerCallback(factory, interval="step", frequency=2)
    optimizer = torch.optim.SGD(make_model().parameters(), lr=LR)
    callback.on_train_start(optimizers=[optimizer])
    for _ in range(3):
        optimizer.step()
        callback.on_optimizer_step_end()
    saved = callback.state_dict()
    assert saved["steps"] == 3
    assert saved != fresh.state_dict()

    callback.reset()

    assert callback.scheduler is None
    assert callback.state_dict() == fresh.state_dict()
    assert callback.config() == fresh.config()
    assert vars(callback) == vars(fresh)

    callback.load_state_dict(saved)  # waits for a train_start that a new run replaces
    callback.reset()
    assert callback.state_dict() == fresh.state_dict()
    assert vars(callback) == vars(fresh)


def test_reset_keeps_a_scheduler_passed_built_and_the_given_optimizer_index() -> None:
    model = PrebuiltOptimizersModel((0.1, 0.2))
    built = schedulers.ExponentialLR(model.optimizers[1], gamma=0.5)
    callback = LRSchedulerCallback(built)
    callback.on_train_start(optimizers=model.optimizers)
    model.optimizers[1].step()
    callback.on_epoch_end()
    assert callback.optimizer_index == 1
    fresh = LRSchedulerCallback(built)
    assert callback.state_dict() != fresh.state_dict()

    callback.reset()

    assert callback.scheduler is built
    assert built.last_epoch == 1  # the given scheduler's own progress cannot be rewound
    assert callback.optimizer_index == 0
    assert callback.state_dict() == fresh.state_dict()
    assert callback.config() == fresh.config()
    assert vars(callback) == vars(fresh)
