"""Every public argument refuses a wrong type and a wrong value with a clear error, in time.

The tables below hold, for every callable of ``trainbus.__all__`` that takes user arguments,
bad inputs per parameter: at least one of a wrong type and, where one exists, one of a wrong
value. Each must raise a :class:`~trainbus.errors.TrainbusError` whose message shows the
offending value (its ``repr``, or the text named in the case), and nothing may be written by
then: a Trainer (or a call) refused for its arguments leaves no MAPS behind, and a refused
call on a MAPS that holds a finished run leaves every file byte-identical. A completeness
test checks that every parameter has its cases, so a new argument cannot go unchecked.

Cases marked ``xfail(strict=True)`` are inputs the code does not refuse yet; each reason
says what goes wrong and where the check belongs.
"""

from __future__ import annotations

import datetime
import functools
import inspect
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import pytest
import torch
import torchmetrics
import torchmetrics.aggregation
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import trainbus
from tests.conftest import make_loader, make_model
from trainbus import (
    Callback,
    EarlyStoppingCallback,
    EventBus,
    EventSpec,
    LoggerCallback,
    LossMetricConfig,
    LRSchedulerCallback,
    Maps,
    MetricsWriterCallback,
    ModelCheckpointCallback,
    MonitorCallback,
    SaveCheckpoint,
    SaveTrainingState,
    SkipStep,
    Stop,
    SupervisedModel,
    TorchMetricConfig,
    Trainer,
    TrainerState,
    TrainingCheckpointCallback,
    load_weights,
    on,
    seed_everything,
)
from trainbus.errors import CheckpointError, TrainbusError
from trainbus.events.catalog import COUNTERS

if TYPE_CHECKING:
    from _pytest.mark.structures import ParameterSet  # what pytest.param returns

FAULT = pytest.mark.fault(
    "Wrong types and values for every public argument",
    outcome="a TrainbusError naming the value; no MAPS created, an existing one unchanged",
)

Kind = Literal["type", "value"]
Shown = str | Callable[[Path], str] | None


@dataclass(frozen=True)
class Case:
    """One bad input: ``call(path)`` passes ``value`` as ``argument`` of ``target``.

    ``shown`` is the text the error message must hold: by default ``repr(value)``; a string
    where the offending value has no meaningful repr (a loader object, a combination of
    arguments); a function of the MAPS path where the value is that path.
    """

    target: str
    argument: str
    kind: Kind
    value: object
    call: Callable[[Path], object]
    shown: Shown = None

    def expected(self, path: Path) -> str:
        if self.shown is None:
            return repr(self.value)
        return self.shown if isinstance(self.shown, str) else self.shown(path)


def _label(value: object) -> str:
    text = repr(value)
    if " at 0x" in text or "\n" in text:
        text = type(value).__name__
    return text if len(text) <= 40 else text[:37] + "..."


def bad(
    target: str,
    argument: str,
    kind: Kind,
    value: object,
    call: Callable[[Path], object],
    *,
    shown: Shown = None,
    gap: str | None = None,
) -> ParameterSet:
    """A table row; ``gap`` marks an input the code does not refuse yet (strict xfail)."""
    marks = [] if gap is None else [pytest.mark.xfail(strict=True, reason=gap)]
    return pytest.param(
        Case(target, argument, kind, value, call, shown),
        id=f"{target}:{argument}={_label(value)}",
        marks=marks,
    )


@dataclass(frozen=True)
class Bad:
    """A bad input of a per-argument table (see :func:`rows`)."""

    kind: Kind
    value: object
    shown: Shown = None
    gap: str | None = None


def wrong_type(value: object, *, shown: Shown = None, gap: str | None = None) -> Bad:
    return Bad("type", value, shown, gap)


def wrong_value(value: object, *, shown: Shown = None, gap: str | None = None) -> Bad:
    return Bad("value", value, shown, gap)


def rows(
    target: str,
    table: dict[str, list[Bad]],
    call: Callable[[str, object], Callable[[Path], object]],
) -> list[ParameterSet]:
    """Rows of ``table`` (argument -> bad inputs); ``call(argument, value)`` makes the call."""
    return [
        bad(target, argument, b.kind, b.value, call(argument, b.value), shown=b.shown, gap=b.gap)
        for argument, inputs in table.items()
        for b in inputs
    ]


# ----------------------------------------------------------------------------- helpers
def build(path: Path, /, **options: Any) -> Trainer:
    """A quiet Trainer (no default callbacks, no plugins); ``options`` override anything."""
    settings: dict[str, Any] = {
        "maps": path,
        "model": make_model(),
        "default_callbacks": False,
        "plugins": False,
        "max_epochs": 1,
    }
    settings.update(options)
    return Trainer(**settings)


def empty_loader() -> DataLoader[tuple[torch.Tensor, ...]]:
    return DataLoader(TensorDataset(torch.zeros(0, 4), torch.zeros(0).long()), batch_size=4)


def handler(*, state: TrainerState) -> None:
    """A valid handler of any event."""


def asks_for_missing(*, nothere: object) -> None:
    """A handler asking for a payload name no event provides."""


def unary_predicate_missing() -> bool:
    """A ``when`` that cannot take the state."""
    return True


STEP_LR = functools.partial(torch.optim.lr_scheduler.StepLR, step_size=1)
PLATEAU = functools.partial(torch.optim.lr_scheduler.ReduceLROnPlateau)


def plateau_instance() -> torch.optim.lr_scheduler.ReduceLROnPlateau:
    optimizer = torch.optim.SGD(make_model().parameters(), lr=0.1)
    return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer)


def path_text(name: str) -> Callable[[Path], str]:
    """The repr of the path of a sibling of the MAPS, as messages show it."""
    return lambda path: repr(str(path.with_name(name)))


def a_file(path: Path) -> Path:
    target = path.with_name("a-file")
    target.write_text("not a directory\n")
    return target


def a_foreign_directory(path: Path) -> Path:
    target = path.with_name("foreign")
    target.mkdir()
    (target / "notes.txt").write_text("keep me\n")
    return target


def mismatched_model() -> SupervisedModel:
    """A model whose layer sizes differ from :func:`make_model`'s (same keys, other shapes)."""
    network = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2))
    return SupervisedModel(network, nn.CrossEntropyLoss())


CUDA = torch.cuda.is_available()

# ----------------------------------------------------------------------------- Trainer
_NUMBERS = [
    wrong_type("2"),
    wrong_type(2.0),
    wrong_type(True),
    wrong_value(0),
    wrong_value(-1),
]

TRAINER: dict[str, list[Bad]] = {
    "maps": [
        wrong_type(5),
        wrong_type(None),
        wrong_type(b"maps"),
    ],
    "model": [
        wrong_type(None),
        wrong_type("model"),
        wrong_type(nn.Linear(4, 2)),
    ],
    "metrics": [
        wrong_type("loss"),
        wrong_type([LossMetricConfig()]),
        wrong_type({"loss": "mean"}, shown="'mean'"),
        wrong_value({"bad name": LossMetricConfig()}, shown="'bad name'"),
        wrong_value({3.5: LossMetricConfig()}, shown="3.5"),
    ],
    "callbacks": [
        wrong_type(
            "logger",
        ),
        wrong_type(3.5),
        wrong_type(LoggerCallback(console=False)),
        wrong_type([3.5], shown="3.5"),
        wrong_type([EarlyStoppingCallback], shown=repr(EarlyStoppingCallback)),
        wrong_value([EarlyStoppingCallback("accuracy", mode="max")], shown="'accuracy'"),
        wrong_value([ModelCheckpointCallback(), ModelCheckpointCallback()], shown="'last'"),
    ],
    "max_epochs": _NUMBERS,
    "val_every_n_epochs": _NUMBERS,
    "log_every_n_batches": _NUMBERS,
    "accumulate_grad_batches": _NUMBERS,
    "gradient_clip_val": [
        wrong_type("1.0"),
        wrong_type(True),
        wrong_value(0),
        wrong_value(-1.0),
        wrong_value(math.nan),
        wrong_value(math.inf),
        wrong_value(10**400),
    ],
    "gradient_clip_algorithm": [wrong_type(1), wrong_type(None), wrong_value("l2")],
    "device": [
        wrong_type(1),
        wrong_type(None),
        wrong_value("gpu"),
        *([] if CUDA else [wrong_value("cuda:0")]),
        wrong_value("meta"),
        wrong_value("mps"),
        wrong_value("xpu"),
        wrong_value(torch.device("meta")),
        *([wrong_value(f"cuda:{torch.cuda.device_count()}")] if CUDA else []),
    ],
    "precision": [wrong_type(32), wrong_type(None), wrong_value("fp32")],
    "compile": [
        wrong_type("max-autotune"),
        wrong_type(1),
        wrong_type(None),
        wrong_value(
            {"bogus": 1},
            shown="'bogus'",
        ),
    ],
    "seed": [
        wrong_type("42"),
        wrong_type(4.2),
        wrong_type(True),
        wrong_value(-1),
        wrong_value(2**32),
    ],
    "deterministic": [wrong_type("yes"), wrong_type(1), wrong_type(None)],
    "nonfinite_loss": [wrong_type(1), wrong_type(None), wrong_value("ignore")],
    "max_steps": _NUMBERS,
    "max_time": [
        wrong_type("1h"),
        wrong_type(True),
        wrong_value(0),
        wrong_value(-5.0),
        wrong_value(math.inf),
        wrong_value(datetime.timedelta(0), shown="datetime.timedelta(0)"),
    ],
    "limit_train_batches": [
        wrong_type("10"),
        wrong_type(None),
        wrong_type(True),
        wrong_value(0),
        wrong_value(0.0),
        wrong_value(1.5),
        wrong_value(-3),
    ],
    "limit_val_batches": [
        wrong_type("10"),
        wrong_type(None),
        wrong_type(True),
        wrong_value(1.5),
        wrong_value(-1),
    ],
    "val_check_interval": [
        wrong_type("10"),
        wrong_type(True),
        wrong_value(0),
        wrong_value(0.0),
        wrong_value(2.5),
    ],
    "validate_last_epoch": [wrong_type("yes"), wrong_type(1), wrong_type(None)],
    "fast_dev_run": [wrong_type("yes"), wrong_type(1), wrong_type(None)],
    "default_callbacks": [
        wrong_type(
            "logger",
        ),
        wrong_type(1),
        wrong_type(None),
        wrong_value([int], shown=repr(int)),
        wrong_value({int: False}),
        wrong_value({LoggerCallback: "no"}),
    ],
    "overwrite": [wrong_type("yes"), wrong_type(1), wrong_type(None)],
    "plugins": [
        wrong_type("tensorboard"),
        wrong_type(1),
        wrong_type([2.5], shown="2.5"),
        wrong_value(["no-such-plugin"], shown="'no-such-plugin'"),
        wrong_value([""], shown="''"),
    ],
    "ddp_options": [
        wrong_type("find_unused_parameters"),
        wrong_type(5),
        wrong_value({5: True}),
    ],
    "strategy": [
        wrong_type(2),
        wrong_type(None),
        wrong_value("zero"),
        wrong_value("FSDP"),
    ],
    "block": [
        wrong_type("tensorboard"),
        wrong_type(1),
        wrong_type(None),
        wrong_type([2.5], shown="2.5"),
        wrong_value([" "], shown="' '"),
    ],
}


def _trainer_call(argument: str, value: object) -> Callable[[Path], object]:
    return lambda path: build(path, **{argument: value})


TRAINER_CASES = [
    *rows("Trainer", TRAINER, _trainer_call),
    bad(
        "Trainer",
        "maps",
        "value",
        "a-file",
        lambda path: build(a_file(path)),
        shown=path_text("a-file"),
    ),
    bad(
        "Trainer",
        "maps",
        "value",
        "foreign",
        lambda path: build(a_foreign_directory(path), overwrite=True),
        shown=path_text("foreign"),
    ),
    bad(
        "Trainer",
        "maps",
        "value",
        "v{name}",
        lambda path: build(path.parent / "v{name}"),
        shown=lambda path: repr(str(path.parent / "v{name}")),
    ),
    bad(
        "Trainer",
        "precision",
        "value",
        "16",
        lambda path: build(path, device="cpu", precision="16"),
    ),
    bad(
        "Trainer",
        "overwrite",
        "type",
        "yes",
        lambda path: build(Maps(path), overwrite="yes"),
    ),
]


# ----------------------------------------------------- train / validate / test / predict
def _train_call(argument: str, value: object) -> Callable[[Path], object]:
    if argument == "train_loader":
        return lambda path: build(path).train(value)  # type: ignore[arg-type]
    if argument == "val_loader":
        return lambda path: build(path).train(make_loader(), value)  # type: ignore[arg-type]
    return lambda path: build(path).train(make_loader(), resume=value)  # type: ignore[arg-type]


def _loader_inputs(name: str) -> list[Bad]:
    return [
        wrong_type(None),
        wrong_type(5),
        wrong_type("batches"),
        wrong_type(b"batches"),
        wrong_value(empty_loader(), shown=f"{name} has no batches"),
        wrong_value([], shown=f"{name} has no batches"),
    ]


TRAIN: dict[str, list[Bad]] = {
    "train_loader": _loader_inputs("train_loader"),
    "val_loader": [
        wrong_type(5),
        wrong_type("batches"),
        wrong_value(empty_loader(), shown="val_loader has no batches"),
    ],
    "resume": [wrong_type("yes"), wrong_type(1), wrong_type(0), wrong_value("automatic")],
}


def _evaluation_call(method: str) -> Callable[[str, object], Callable[[Path], object]]:
    def call(argument: str, value: object) -> Callable[[Path], object]:
        return lambda path: getattr(build(path), method)(value)

    return call


LOADER_CASES = [
    *rows("Trainer.train", TRAIN, _train_call),
    *(
        row
        for method in ("validate", "test", "predict")
        for row in rows(
            f"Trainer.{method}", {"loader": _loader_inputs("loader")}, _evaluation_call(method)
        )
    ),
]

# ------------------------------------------------------------------------- from_maps
FROM_MAPS_CASES = [
    bad(
        "Trainer.from_maps",
        "maps",
        "type",
        5,
        lambda path: Trainer.from_maps(5, make_model()),  # type: ignore[arg-type]
    ),
    bad(
        "Trainer.from_maps",
        "maps",
        "type",
        None,
        lambda path: Trainer.from_maps(None, make_model()),  # type: ignore[arg-type]
    ),
    bad(
        "Trainer.from_maps",
        "maps",
        "value",
        "maps",
        lambda path: Trainer.from_maps(path, make_model()),
        shown=lambda path: repr(str(path)),
    ),
]

# ----------------------------------------------------- on / Trainer.on / EventBus.subscribe
_SUBSCRIPTION: dict[str, list[Bad]] = {
    "event": [
        wrong_type(5),
        wrong_type(["epoch_end"]),
        wrong_value("epoch_ends"),
        wrong_value(""),
    ],
    "priority": [wrong_type("1"), wrong_type(1.5), wrong_type(True)],
    "every": [wrong_type("2"), wrong_type(2.0), wrong_type(True), wrong_value(0), wrong_value(-1)],
    "once": [wrong_type("1"), wrong_type(1.5), wrong_type(False), wrong_value(0), wrong_value(-1)],
    "when": [
        wrong_type(5),
        wrong_type("state.current_epoch > 1"),
        wrong_value(unary_predicate_missing),
    ],
    "on_error": [wrong_type(1), wrong_type(True), wrong_value("ignore")],
    "id": [wrong_type(5), wrong_type(True), wrong_value(""), wrong_value("  ")],
    "before": [
        wrong_type(5),
        wrong_type(None),
        wrong_type([2.5], shown="2.5"),
        wrong_value([""], shown="''"),
    ],
    "after": [
        wrong_type(5),
        wrong_type(None),
        wrong_type([2.5], shown="2.5"),
        wrong_value(["  "], shown="'  '"),
    ],
    "reverse": [
        wrong_type("yes"),
        wrong_type(1),
        wrong_type(None),
        wrong_value(True, shown="'checkpoint'"),
    ],
}


def _event_and_options(argument: str, value: object) -> tuple[Any, dict[str, Any]]:
    if argument == "event":
        return value, {}
    # reverse=True is wrong only at an event that does not end a pair.
    return ("checkpoint" if argument == "reverse" else "epoch_end"), {argument: value}


def _trainer_on_call(argument: str, value: object) -> Callable[[Path], object]:
    event, options = _event_and_options(argument, value)
    return lambda path: build(path).on(event, **options)(handler)


def _on_call(argument: str, value: object) -> Callable[[Path], object]:
    """``@on`` marks only: names and ``reverse`` are checked when the callback is attached."""
    event, options = _event_and_options(argument, value)

    def call(path: Path) -> object:
        class Marked(Callback):
            @on(event, **options)
            def react(self, *, state: TrainerState) -> None:
                """A marked handler."""

        return build(path, callbacks=[Marked()])

    return call


def _subscribe_call(argument: str, value: object) -> Callable[[Path], object]:
    event, options = _event_and_options(argument, value)
    return lambda path: EventBus().subscribe(event, handler, **options)


# None means "the owner's default" only for @on marks; these two default to "raise".
_ON_ERROR_EXPLICIT: dict[str, list[Bad]] = {
    **_SUBSCRIPTION,
    "on_error": [*_SUBSCRIPTION["on_error"], wrong_type(None)],
}

SUBSCRIBE: dict[str, list[Bad]] = {
    **_ON_ERROR_EXPLICIT,
    "handler": [wrong_type(5), wrong_value(asks_for_missing, shown="'nothere'")],
    "source": [wrong_type(5), wrong_type(None), wrong_value(""), wrong_value("  ")],
    "owner": [wrong_type(5), wrong_type(b"owner"), wrong_value(""), wrong_value("  ")],
    "rank_zero_only": [wrong_type("yes"), wrong_type(1), wrong_type(None)],
}


def _subscribe_twice(path: Path) -> object:
    trainer = build(path)
    trainer.on("epoch_end", id="twice")(handler)
    return trainer.on("epoch_end", id="twice")(handler)


def _subscribe_any(argument: str, value: object) -> Callable[[Path], object]:
    if argument == "handler":
        return lambda path: EventBus().subscribe("epoch_end", value)  # type: ignore[arg-type]
    return _subscribe_call(argument, value)


SUBSCRIPTION_CASES = [
    *rows(
        "Trainer.on",
        {**_ON_ERROR_EXPLICIT, "rank_zero_only": SUBSCRIBE["rank_zero_only"]},
        _trainer_on_call,
    ),
    *rows("on", _SUBSCRIPTION, _on_call),
    *rows("EventBus.subscribe", SUBSCRIBE, _subscribe_any),
    *rows(
        "EventBus",
        {
            "rank": [
                wrong_type("0"),
                wrong_type(True),
                wrong_type(0.0),
                wrong_type(None),
                wrong_value(-1),
            ]
        },
        lambda argument, value: lambda path: EventBus(rank=value),  # type: ignore[arg-type]
    ),
    bad(
        "Trainer.on",
        "every",
        "value",
        2,
        lambda path: build(path).on("epoch_end", every=2, once=True)(handler),
        shown="every=2 and once=True",
    ),
    bad("Trainer.on", "id", "value", "twice", _subscribe_twice),
]


# ---------------------------------------------------------------- custom events, plan, emit


def _declare_call(argument: str, value: object) -> Callable[[Path], object]:
    spec = {"name": "custom_event", argument: value}
    return lambda path: EventBus().declare(EventSpec(**spec))


def _emit_custom(path: Path) -> None:
    trainer = build(path)
    trainer.bus.declare(EventSpec("custom_event", payload=("value",)))
    trainer.emit("custom_event", other=1)


EVENT_CASES = [
    *rows(
        "EventSpec",
        {
            "name": [wrong_type(5), wrong_value("Bad Name"), wrong_value("")],
            "payload": [
                wrong_type(["value"]),
                wrong_type((5,), shown="5"),
                wrong_value(("not a name",), shown="'not a name'"),
                wrong_value(("state",), shown="'state'"),
            ],
            "doc": [wrong_type(5), wrong_type(None)],
            "counter": [
                wrong_type(5),
                wrong_type(("iteration",)),
                wrong_value("no_such_counter"),
                wrong_value("max_epochs"),  # an int of the state, but not a counter
            ],
            "skippable": [wrong_type("yes"), wrong_type(1), wrong_type(None)],
        },
        _declare_call,
    ),
    *rows(
        "Trainer.plan",
        {"event": [wrong_type(5), wrong_value("epoch_ends")]},
        lambda argument, value: lambda path: build(path).plan(value),  # type: ignore[arg-type]
    ),
    *rows(
        "Trainer.emit",
        {
            "event": [
                wrong_type(5),
                wrong_value("no_such_event"),
                wrong_value(
                    "epoch_end",
                ),
            ]
        },
        lambda argument, value: lambda path: build(path).emit(value),  # type: ignore[arg-type]
    ),
    bad("Trainer.emit", "payload", "value", "other", _emit_custom, shown="'other'"),
]

# ------------------------------------------------------------------------- callbacks
_BOOL = [wrong_type("yes"), wrong_type(1), wrong_type(None)]
_COUNT = [wrong_type("1"), wrong_type(1.0), wrong_type(True), wrong_value(0), wrong_value(-1)]

EARLY_STOPPING: dict[str, list[Bad]] = {
    "metric": [
        wrong_type(5),
        wrong_type(None),
        wrong_type(b"loss"),
        wrong_value(""),
    ],
    "patience": _COUNT,
    "mode": [wrong_type(1), wrong_value("up"), wrong_value("MIN")],
    "min_delta": [
        wrong_type("0.1"),
        wrong_type(True),
        wrong_type(None),
        wrong_value(-0.1),
        wrong_value(math.nan),
        wrong_value(math.inf),
        wrong_value(10**400),
    ],
    "min_delta_mode": [wrong_type(1), wrong_type(None), wrong_value("pct")],
    "stopping_threshold": [wrong_type("1"), wrong_type(True), wrong_value(math.nan)],
    "divergence_threshold": [wrong_type("1"), wrong_type(True), wrong_value(math.inf)],
    "check_finite": _BOOL,
    "start_from_epoch": [wrong_type("1"), wrong_type(1.0), wrong_type(True), wrong_value(-1)],
    "restore_best_weights": _BOOL,
}


_UNDIRECTED = {"dice": torchmetrics.aggregation.MeanMetric()}
"""A metric that declares no higher_is_better, under a name that is no loss's."""


def _early_stopping_call(argument: str, value: object) -> Callable[[Path], object]:
    options = {"metric": "loss", argument: value}
    return lambda path: EarlyStoppingCallback(**options)


MODEL_CHECKPOINT: dict[str, list[Bad]] = {
    "metric": [wrong_type(5), wrong_type(b"loss"), wrong_value("")],
    "epochs": [
        wrong_type("1"),
        wrong_type(5),
        wrong_type([1.5], shown="1.5"),
        wrong_type([True], shown="True"),
        wrong_type({"a"}, shown="'a'"),
        wrong_value([-1], shown="-1"),
        wrong_value(range(0)),
        wrong_value(range(-2, 2)),
        wrong_value(set()),
    ],
    "save_last": _BOOL,
    "top_k": [
        wrong_type("1"),
        wrong_type(1.0),
        wrong_type(True),
        wrong_type(None),
        wrong_value(0),
        wrong_value(-2),
    ],
    "mode": [wrong_type(1), wrong_value("up")],
    "every_n_epochs": _COUNT,
    "prefix": [
        wrong_type(5),
        wrong_type(None),
        wrong_value("../x"),
        wrong_value("a/b"),
        wrong_value("-x"),
        wrong_value("a" * 200),
    ],
    "asynchronous": _BOOL,
}


def _model_checkpoint_call(argument: str, value: object) -> Callable[[Path], object]:
    options: dict[str, Any] = {argument: value}
    if argument in {"mode", "top_k"}:
        options.setdefault("metric", "accuracy")
        options.setdefault("mode", "max")
    return lambda path: ModelCheckpointCallback(**options)


TRAINING_CHECKPOINT: dict[str, list[Bad]] = {
    "every_n_epochs": _COUNT,
    "every_n_steps": _COUNT,
    "save_on_train_end": _BOOL,
    "keep": [*_COUNT, wrong_type(None)],
    "asynchronous": _BOOL,
}

LOGGER: dict[str, list[Bad]] = {
    "console": _BOOL,
    "progress_bar": [wrong_type("yes"), wrong_type(1)],
    "stream": [wrong_type(5), wrong_type("stderr")],
    "console_interval": [
        wrong_type("10"),
        wrong_type(True),
        wrong_type(None),
        wrong_value(0),
        wrong_value(-1.0),
        wrong_value(math.nan),
        wrong_value(math.inf),
        wrong_value(10**400),
    ],
}

MONITOR: dict[str, list[Bad]] = {
    "time_subscribers": [wrong_type("10"), wrong_type(1.5), wrong_type(True), wrong_value(-1)],
    "gpu": [wrong_type("yes"), wrong_type(1)],
    "table": _BOOL,
    "stream": [wrong_type(5), wrong_type("stdout")],
}

LR_SCHEDULER: dict[str, list[Bad]] = {
    "scheduler": [
        wrong_type(5),
        wrong_type(None),
        wrong_type("StepLR"),
        # A plateau scheduler needs the metric to watch.
        wrong_value(plateau_instance(), shown="ReduceLROnPlateau"),
    ],
    "interval": [wrong_type(1), wrong_type(None), wrong_value("batch")],
    "frequency": _COUNT,
    "monitor": [wrong_type(5), wrong_value("")],
    "optimizer_index": [wrong_type("0"), wrong_type(0.0), wrong_type(True), wrong_value(-1)],
}


def _lr_scheduler_call(argument: str, value: object) -> Callable[[Path], object]:
    options: dict[str, Any] = {"scheduler": STEP_LR, argument: value}
    return lambda path: LRSchedulerCallback(**options)


def _constructor(cls: type[Any], **fixed: Any) -> Callable[[str, object], Callable[[Path], object]]:
    def call(argument: str, value: object) -> Callable[[Path], object]:
        return lambda path: cls(**{**fixed, argument: value})

    return call


CALLBACK_CASES = [
    *rows("EarlyStoppingCallback", EARLY_STOPPING, _early_stopping_call),
    bad(
        "EarlyStoppingCallback",
        "stopping_threshold",
        "value",
        2.0,
        lambda path: EarlyStoppingCallback(
            "loss", stopping_threshold=2.0, divergence_threshold=1.0
        ),
    ),
    bad(
        "EarlyStoppingCallback",
        "metric",
        "value",
        "val_accuracy",
        lambda path: build(path, callbacks=[EarlyStoppingCallback("val_accuracy", mode="max")]),
    ),
    bad(
        "EarlyStoppingCallback",
        "mode",
        "value",
        None,
        lambda path: build(path, metrics=_UNDIRECTED, callbacks=[EarlyStoppingCallback("dice")]),
        shown="'dice'",  # no mode, and neither the metric nor its name tells one
    ),
    *rows("ModelCheckpointCallback", MODEL_CHECKPOINT, _model_checkpoint_call),
    bad(
        "ModelCheckpointCallback",
        "mode",
        "value",
        None,
        lambda path: build(path, metrics=_UNDIRECTED, callbacks=[ModelCheckpointCallback("dice")]),
        shown="'dice'",  # no mode, and neither the metric nor its name tells one
    ),
    bad(
        "ModelCheckpointCallback",
        "mode",
        "value",
        "min",
        lambda path: ModelCheckpointCallback(mode="min"),  # without a metric
    ),
    bad(
        "ModelCheckpointCallback",
        "top_k",
        "value",
        3,
        lambda path: ModelCheckpointCallback(top_k=3),  # without a metric
    ),
    bad(
        "ModelCheckpointCallback",
        "metric",
        "value",
        "f1",
        lambda path: build(path, callbacks=[ModelCheckpointCallback("f1", mode="max")]),
    ),
    *rows(
        "TrainingCheckpointCallback", TRAINING_CHECKPOINT, _constructor(TrainingCheckpointCallback)
    ),
    bad(
        "TrainingCheckpointCallback",
        "save_on_train_end",
        "value",
        False,
        lambda path: TrainingCheckpointCallback(None, None, save_on_train_end=False),
        shown="every_n_epochs, every_n_steps and save_on_train_end are all off",
    ),
    *rows("LoggerCallback", LOGGER, _constructor(LoggerCallback)),
    *rows("MonitorCallback", MONITOR, _constructor(MonitorCallback)),
    *rows("LRSchedulerCallback", LR_SCHEDULER, _lr_scheduler_call),
    bad(
        "LRSchedulerCallback",
        "monitor",
        "value",
        "accuracy",
        lambda path: build(path, callbacks=[LRSchedulerCallback(PLATEAU, monitor="accuracy")]),
    ),
    bad(
        "LRSchedulerCallback",
        "interval",
        "value",
        "step",
        lambda path: LRSchedulerCallback(plateau_instance(), interval="step", monitor="loss"),
    ),
]

# ---------------------------------------------------------------- model, metrics, commands
_NETWORK = nn.Sequential(nn.Linear(4, 2))
_LOSS = nn.CrossEntropyLoss()

MODEL_CASES = rows(
    "SupervisedModel",
    {
        "network": [
            wrong_type(None),
            wrong_type("network"),
            wrong_type(torch.zeros(2)),
            wrong_type(handler),
        ],
        "loss": [wrong_type(None), wrong_type("cross_entropy"), wrong_type(5)],
        "optimizer": [
            wrong_type("sgd"),
            wrong_type(5),
            wrong_type(torch.optim.SGD(_NETWORK.parameters(), lr=0.1)),
        ],
    },
    _constructor(SupervisedModel, network=_NETWORK, loss=_LOSS),
)

_ACCURACY = torchmetrics.Accuracy(task="binary")

METRIC_CASES = [
    *rows(
        "LossMetricConfig",
        {"loss_name": [wrong_type(5), wrong_type(None), wrong_type(b"loss"), wrong_value("")]},
        _constructor(LossMetricConfig),
    ),
    *rows(
        "TorchMetricConfig",
        {
            "metric": [
                wrong_type(5),
                wrong_type("accuracy"),
                wrong_type(LossMetricConfig()),
                wrong_type(torchmetrics.Accuracy),
            ],
            "preds": [wrong_type(5), wrong_type(None), wrong_value("")],
            "target": [wrong_type(5), wrong_type(None), wrong_value("")],
        },
        _constructor(TorchMetricConfig, metric=_ACCURACY),
    ),
]

_REASON = {"reason": [wrong_type(5), wrong_type(None), wrong_type(b"why")]}

COMMAND_CASES = [
    *rows(
        "Stop",
        {**_REASON, "resumable": _BOOL},
        _constructor(Stop),
    ),
    *rows("SkipStep", _REASON, _constructor(SkipStep)),
    *rows("SaveTrainingState", {**_REASON, "asynchronous": _BOOL}, _constructor(SaveTrainingState)),
    *rows(
        "SaveCheckpoint",
        {
            "tag": [
                wrong_type(5),
                wrong_type(None),
                wrong_value(""),
                wrong_value("../x"),
                wrong_value("a/b"),
                wrong_value(".hidden"),
                wrong_value("a" * 200),
            ],
            "metadata": [
                wrong_type("epoch=3"),
                wrong_type(5),
                wrong_type({"epoch": 3}),
                wrong_type((("epoch",),)),
                wrong_type(((1, 2),)),
                wrong_value((("loss", torch.tensor(0.5)),)),
                wrong_value((("epochs", [1, 2]),)),
            ],
            "asynchronous": _BOOL,
        },
        _constructor(SaveCheckpoint, tag="best"),
    ),
]

# --------------------------------------------------------------- functions and Maps
FUNCTION_CASES = [
    *rows(
        "seed_everything",
        {
            "seed": [
                wrong_type("42"),
                wrong_type(4.2),
                wrong_type(True),
                wrong_type(None),
                wrong_value(-1),
                wrong_value(2**32),
            ]
        },
        _constructor(seed_everything),
    ),
    *rows(
        "Maps",
        {
            "path": [wrong_type(5), wrong_type(None), wrong_type(b"maps")],
            "overwrite": _BOOL,
            "version": [wrong_type(5), wrong_type(None), wrong_value("newest")],
        },
        lambda argument, value: lambda path: Maps(**{"path": path, argument: value}),
    ),
    bad(
        "Maps",
        "path",
        "value",
        "v{version}{version}",
        lambda path: Maps(path.parent / "v{version}{version}"),
        shown=lambda path: repr(str(path.parent / "v{version}{version}")),
    ),
    bad(
        "Maps",
        "path",
        "value",
        "a-file",
        lambda path: Maps(a_file(path)),
        shown=path_text("a-file"),
    ),
    bad(
        "Maps",
        "overwrite",
        "value",
        True,
        lambda path: Maps(a_foreign_directory(path), overwrite=True),
        shown=path_text("foreign"),
    ),
    *rows(
        "load_weights",
        {
            "path": [wrong_type(5), wrong_type(None)],
            "model": [wrong_type(None), wrong_type("model"), wrong_type(5)],
            "tag": [wrong_type(2.5), wrong_value(""), wrong_value("../x"), wrong_value("a/b")],
            "strict": _BOOL,
        },
        lambda argument, value: (
            lambda path: load_weights(**{"path": path, "model": make_model(), argument: value})
        ),
    ),
    bad(
        "load_weights",
        "path",
        "value",
        "maps",
        lambda path: load_weights(path, make_model()),
        shown=lambda path: repr(str(path)),
    ),
]

CASES = [
    *TRAINER_CASES,
    *LOADER_CASES,
    *FROM_MAPS_CASES,
    *SUBSCRIPTION_CASES,
    *EVENT_CASES,
    *CALLBACK_CASES,
    *MODEL_CASES,
    *METRIC_CASES,
    *COMMAND_CASES,
    *FUNCTION_CASES,
]


@FAULT
@pytest.mark.parametrize("case", CASES)
def test_a_bad_argument_is_refused_by_name_before_a_maps_is_created(
    case: Case, tmp_path: Path
) -> None:
    path = tmp_path / "maps"
    with pytest.raises(TrainbusError) as excinfo:
        case.call(path)
    expected = case.expected(path)
    assert expected in str(excinfo.value), f"{expected} is not named in: {excinfo.value}"
    assert not path.exists()


@pytest.mark.parametrize("counter", COUNTERS)
def test_every_counter_an_event_may_name_counts_its_filters(counter: str) -> None:
    """Each name ``validate_spec`` accepts as a counter is an int of the state at dispatch."""
    bus = EventBus()
    bus.declare(EventSpec("counted", counter=counter))
    seen: list[int] = []

    def record(*, state: TrainerState) -> None:
        seen.append(getattr(state, counter))

    bus.subscribe("counted", record, every=2)
    for value in (1, 2, 3, 4):
        fields = {"current_epoch": value - 1} if counter == "epoch_number" else {counter: value}
        bus.emit("counted", state=TrainerState(**fields))
    assert seen == [2, 4]


# ------------------------------------------------------------ a MAPS holding a finished run
@dataclass(frozen=True)
class Finished:
    """Two MAPS of finished one-epoch runs: with every default callback, and with none."""

    run: Path
    bare: Path  # no TrainingCheckpointCallback: no training state to resume from


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Finished:
    root = tmp_path_factory.mktemp("finished")
    run = Trainer(
        root / "run",
        make_model(),
        callbacks=[LoggerCallback(console=False), MonitorCallback(table=False)],
        max_epochs=1,
        plugins=False,
    )
    run.train(make_loader(), make_loader(16))
    build(root / "bare").train(make_loader(), make_loader(16))
    return Finished(root / "run", root / "bare")


def snapshot(root: Path) -> dict[str, tuple[bytes, int] | None]:
    """Every file's bytes and modification time (directories as None), by relative path."""
    return {
        str(path.relative_to(root)): (
            (path.read_bytes(), path.stat().st_mtime_ns) if path.is_file() else None
        )
        for path in sorted(root.rglob("*"))
    }


@dataclass(frozen=True)
class OnFinished:
    """A bad call on the path of a finished MAPS (``bare``: the one without training state)."""

    case: Case
    bare: bool = False


def on_run(
    target: str,
    argument: str,
    kind: Kind,
    value: object,
    run: Callable[[Path], object],
    *,
    shown: Shown = None,
    bare: bool = False,
    gap: str | None = None,
) -> ParameterSet:
    """A row whose call gets the path of a finished MAPS (``bare``: the one without states)."""
    marks = [] if gap is None else [pytest.mark.xfail(strict=True, reason=gap)]
    return pytest.param(
        OnFinished(Case(target, argument, kind, value, run, shown), bare),
        id=f"{target}:{argument}={_label(value)}",
        marks=marks,
    )


def _from_maps(path: Path, **options: Any) -> Trainer:
    settings: dict[str, Any] = {"model": make_model(), "plugins": False}
    settings.update(options)
    return Trainer.from_maps(path, **settings)


def override(
    kind: Kind, name: str, value: object, *, shown: Shown = None, gap: str | None = None
) -> ParameterSet:
    """A row passing ``name=value`` as a keyword override of :meth:`Trainer.from_maps`."""
    return on_run(
        "Trainer.from_maps",
        "overrides",
        kind,
        {name: value},
        lambda path: _from_maps(path, **{name: value}),
        shown=repr(value) if shown is None else shown,
        gap=gap,
    )


def _on_loaded(method: str, *args: Any, **options: Any) -> Callable[[Path], object]:
    return lambda path: getattr(_from_maps(path), method)(*args, **options)


EXISTING = [
    on_run("Trainer.from_maps", "model", "type", None, lambda p: _from_maps(p, model=None)),
    on_run("Trainer.from_maps", "model", "type", "model", lambda p: _from_maps(p, model="model")),
    on_run(
        "Trainer.from_maps",
        "model",
        "value",
        "mismatched",
        lambda p: _from_maps(p, model=mismatched_model(), weights="last"),
        shown="do not fit model SupervisedModel",
    ),
    on_run("Trainer.from_maps", "metrics", "type", "loss", lambda p: _from_maps(p, metrics="loss")),
    on_run(
        "Trainer.from_maps",
        "metrics",
        "value",
        {"bad name": LossMetricConfig()},
        lambda p: _from_maps(p, metrics={"bad name": LossMetricConfig()}),
        shown="'bad name'",
    ),
    on_run("Trainer.from_maps", "callbacks", "type", 3.5, lambda p: _from_maps(p, callbacks=3.5)),
    on_run(
        "Trainer.from_maps",
        "callbacks",
        "value",
        "accuracy",
        lambda p: _from_maps(p, callbacks=[EarlyStoppingCallback("accuracy", mode="max")]),
    ),
    on_run("Trainer.from_maps", "weights", "type", 2.5, lambda p: _from_maps(p, weights=2.5)),
    on_run(
        "Trainer.from_maps", "weights", "value", "nope", lambda p: _from_maps(p, weights="nope")
    ),
    on_run("Trainer.from_maps", "weights", "value", "", lambda p: _from_maps(p, weights="")),
    on_run(
        "Trainer.from_maps", "weights", "value", "../x", lambda p: _from_maps(p, weights="../x")
    ),
    override("value", "max_epochs", 0),
    override("type", "max_epochs", "2"),
    override("value", "device", "gpu"),
    override("value", "precision", "64"),
    override("value", "seed", -1),
    override("value", "gradient_clip_val", -1.0),
    override("value", "nonfinite_loss", "ignore"),
    override("type", "default_callbacks", 1),
    override(
        "value",
        "bogus",
        1,
        shown="'bogus'",
    ),
    override(
        "type",
        "overwrite",
        "yes",
    ),
    on_run("Trainer.train", "train_loader", "type", None, _on_loaded("train", None)),
    on_run("Trainer.train", "train_loader", "type", 5, _on_loaded("train", 5)),
    on_run(
        "Trainer.train",
        "train_loader",
        "value",
        "empty",
        _on_loaded("train", empty_loader()),
        shown="train_loader has no batches",
    ),
    on_run(
        "Trainer.train",
        "train_loader",
        "value",
        "empty",
        lambda p: build(p).train(empty_loader(), resume=True),
        shown="train_loader has no batches",
    ),
    on_run("Trainer.train", "val_loader", "type", 5, _on_loaded("train", make_loader(), 5)),
    on_run(
        "Trainer.train",
        "val_loader",
        "value",
        "empty",
        _on_loaded("train", make_loader(), empty_loader()),
        shown="val_loader has no batches",
    ),
    on_run(
        "Trainer.train", "resume", "type", "yes", _on_loaded("train", make_loader(), resume="yes")
    ),
    on_run(
        "Trainer.train",
        "resume",
        "value",
        True,
        lambda p: build(p).train(make_loader(), resume=True),
        shown="holds no training state",
        bare=True,
    ),
    on_run(
        "Trainer.train",
        "resume",
        "value",
        "auto",
        lambda p: build(p).train(make_loader(), resume="auto"),
        shown="not every earlier call failed",
        bare=True,
    ),
    on_run(
        "Trainer.train",
        "resume",
        "value",
        False,
        lambda p: build(p).train(make_loader(), resume=False),
        shown="already exists and is not empty",
    ),
    *(
        on_run(f"Trainer.{method}", "loader", kind, value, _on_loaded(method, loader), shown=shown)
        for method in ("validate", "test", "predict")
        for kind, value, loader, shown in [
            ("type", None, None, None),
            ("value", "empty", empty_loader(), "loader has no batches"),
        ]
    ),
    on_run(
        "load_weights",
        "model",
        "value",
        "Linear",
        lambda p: load_weights(p, nn.Linear(3, 3)),
        shown="do not fit model Linear",
    ),
    on_run(
        "load_weights", "tag", "value", "nope", lambda p: load_weights(p, make_model(), tag="nope")
    ),
]


@FAULT
@pytest.mark.parametrize("row", EXISTING)
def test_a_bad_argument_leaves_a_finished_maps_byte_identical(
    row: OnFinished, finished: Finished
) -> None:
    path = finished.bare if row.bare else finished.run
    before = snapshot(path)
    with pytest.raises(TrainbusError) as excinfo:
        row.case.call(path)
    expected = row.case.expected(path)
    assert expected in str(excinfo.value), f"{expected} is not named in: {excinfo.value}"
    assert snapshot(path) == before


@FAULT
@pytest.mark.parametrize("strict", [True, False])
def test_weights_that_do_not_fit_leave_the_model_unchanged(
    finished: Finished, strict: bool
) -> None:
    model = mismatched_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match="do not fit model SupervisedModel"):
        load_weights(finished.run, model, strict=strict)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


# ---------------------------------------------------------------------- completeness
AUDITED: dict[str, Callable[..., Any]] = {
    "Trainer": Trainer,
    "Trainer.from_maps": Trainer.from_maps,
    "Trainer.train": Trainer.train,
    "Trainer.validate": Trainer.validate,
    "Trainer.test": Trainer.test,
    "Trainer.predict": Trainer.predict,
    "Trainer.on": Trainer.on,
    "Trainer.plan": Trainer.plan,
    "Trainer.emit": Trainer.emit,
    "on": on,
    "EventBus": EventBus,
    "EventBus.subscribe": EventBus.subscribe,
    "EventSpec": EventSpec,
    "EarlyStoppingCallback": EarlyStoppingCallback,
    "LRSchedulerCallback": LRSchedulerCallback,
    "ModelCheckpointCallback": ModelCheckpointCallback,
    "TrainingCheckpointCallback": TrainingCheckpointCallback,
    "LoggerCallback": LoggerCallback,
    "MonitorCallback": MonitorCallback,
    "MetricsWriterCallback": MetricsWriterCallback,
    "SupervisedModel": SupervisedModel,
    "LossMetricConfig": LossMetricConfig,
    "TorchMetricConfig": TorchMetricConfig,
    "Stop": Stop,
    "SkipStep": SkipStep,
    "SaveCheckpoint": SaveCheckpoint,
    "SaveTrainingState": SaveTrainingState,
    "load_weights": load_weights,
    "seed_everything": seed_everything,
    "Maps": Maps,
}
"""Every callable audited, by the name its cases use."""

NOT_AUDITED = {
    "Callback": "a base class without arguments",
    "Model": "a base class without arguments (nn.Module)",
    "TrainerState": "built by the Trainer, never by users",
    "TrainbusError": "an exception class",
}
"""Exported callables that take no user arguments."""

ACCEPTS_ANYTHING: dict[str, dict[str, str]] = {}
"""Parameters no input can be wrong for, with the reason (none: every one has a case)."""

NO_WRONG_TYPE: dict[str, dict[str, str]] = {
    "Trainer.emit": {
        "payload": "the values are whatever the custom event carries; only the names can be wrong"
    },
}
"""Parameters where only a wrong value exists, with the reason."""

NO_WRONG_VALUE: dict[str, dict[str, str]] = {
    "Trainer": {
        "model": "any trainbus.Model is a valid model",
        "deterministic": "both bools are valid",
        "overwrite": "both bools are valid",
        "validate_last_epoch": "both bools are valid",
        "fast_dev_run": "both bools are valid",
    },
    "Trainer.on": {
        "priority": "every int is a priority",
        "rank_zero_only": "both bools are valid",
    },
    "on": {"priority": "every int is a priority"},
    "EventBus.subscribe": {
        "priority": "every int is a priority",
        "rank_zero_only": "both bools are valid",
    },
    "EarlyStoppingCallback": {
        "check_finite": "both bools are valid",
        "restore_best_weights": "both bools are valid",
    },
    "ModelCheckpointCallback": {
        "save_last": "both bools are valid",
        "asynchronous": "both bools are valid",
    },
    "TrainingCheckpointCallback": {"asynchronous": "both bools are valid"},
    "LoggerCallback": {
        "console": "both bools are valid",
        "progress_bar": "True, False and None are all valid",
        "stream": "any object with write() is a stream",
    },
    "MonitorCallback": {
        "gpu": "True, False and None are all valid",
        "table": "both bools are valid",
        "stream": "any object with write() is a stream",
    },
    "SupervisedModel": {
        "network": "any nn.Module is a network",
        "loss": "any callable is a loss",
        "optimizer": "any callable is an optimizer factory (its result is checked at training)",
    },
    "TorchMetricConfig": {"metric": "any torchmetrics.Metric is valid"},
    "Stop": {"reason": "any text is a reason", "resumable": "both bools are valid"},
    "SkipStep": {"reason": "any text is a reason"},
    "SaveTrainingState": {
        "reason": "any text is a reason",
        "asynchronous": "both bools are valid",
    },
    "SaveCheckpoint": {"asynchronous": "both bools are valid"},
    "EventSpec": {"doc": "any text is a description", "skippable": "both bools are valid"},
    "load_weights": {"strict": "both bools are valid"},
}
"""Parameters where only a wrong type exists, with the reason."""


def parameters(function: Callable[..., Any]) -> tuple[list[str], list[str]]:
    """The named parameters (``self`` excluded) and the ``**kwargs`` names of ``function``."""
    named: list[str] = []
    extra: list[str] = []
    for parameter in inspect.signature(function).parameters.values():
        if parameter.name == "self" or parameter.kind is parameter.VAR_POSITIONAL:
            continue
        (extra if parameter.kind is parameter.VAR_KEYWORD else named).append(parameter.name)
    return named, extra


def _all_rows() -> Iterator[Case]:
    for row in CASES:
        case = row.values[0]
        assert isinstance(case, Case)
        yield case
    for row in EXISTING:
        on_finished = row.values[0]
        assert isinstance(on_finished, OnFinished)
        yield on_finished.case


def test_every_parameter_of_every_public_callable_has_bad_input_cases() -> None:
    covered: dict[str, dict[str, set[str]]] = {}
    for case in _all_rows():
        covered.setdefault(case.target, {}).setdefault(case.argument, set()).add(case.kind)
    missing = []
    stale = []
    for target, function in AUDITED.items():
        named, extra = parameters(function)
        kinds = covered.get(target, {})
        for name in named + extra:
            if name in ACCEPTS_ANYTHING.get(target, {}):
                continue
            if "type" not in kinds.get(name, set()) and name not in NO_WRONG_TYPE.get(target, {}):
                missing.append(f"{target}({name}=...): no wrong type")
            if "value" not in kinds.get(name, set()) and name not in NO_WRONG_VALUE.get(target, {}):
                missing.append(f"{target}({name}=...): no wrong value")
        exempt = {
            **ACCEPTS_ANYTHING.get(target, {}),
            **NO_WRONG_VALUE.get(target, {}),
            **NO_WRONG_TYPE.get(target, {}),
        }
        stale += [f"{target}.{n}" for n in [*kinds, *exempt] if n not in named + extra]
    assert not missing, "parameters without bad-input cases:\n" + "\n".join(missing)
    assert not stale, f"cases or exemptions name parameters that do not exist: {stale}"
    assert set(covered) <= set(AUDITED), set(covered) - set(AUDITED)


def test_every_exported_callable_and_trainer_method_is_audited() -> None:
    exported = {name for name in trainbus.__all__ if callable(getattr(trainbus, name))}
    top_level = {name for name in AUDITED if "." not in name}
    assert exported == top_level | set(NOT_AUDITED)
    methods = {
        f"Trainer.{name}"
        for name in dir(Trainer)  # its rooms' methods too (Subscribing)
        if not name.startswith("_")
        and callable(getattr(Trainer, name))
        and parameters(getattr(Trainer, name))[0]
    }
    assert methods == {name for name in AUDITED if name.startswith("Trainer.")}
