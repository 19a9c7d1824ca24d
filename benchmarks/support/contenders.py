"""The contenders of ``compare.py``: the same training written by hand and with each engine.

Every runner takes a network and an iterable of batches and trains one epoch over them with
SGD. ``Runner`` is their type.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import tempfile
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainbus import SupervisedModel, Trainer, TrainerState

Batch = tuple[torch.Tensor, torch.Tensor]
Runner = Callable[[nn.Module, Iterable[Batch]], None]


STEP_EVENTS = (
    "batch_start",
    "forward_start",
    "backward_start",
    "backward_end",
    "optimizer_step_start",
    "optimizer_step_end",
    "batch_end",
)
MODELS = {
    # name: (features, hidden, classes, batch size). micro: almost no compute, so the time per
    # step is the loop's own overhead; tiny: framework overhead dominates; small: compute does.
    "micro": (2, 2, 2, 1),
    "tiny": (32, 64, 10, 32),
    "small": (256, 1024, 10, 256),
}
LR = 0.01


def make_network(model: str) -> nn.Module:
    features, hidden, classes, _ = MODELS[model]
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(features, hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, classes),
    )


def make_batches(model: str, steps: int) -> list[Batch]:
    features, _, classes, batch = MODELS[model]
    generator = torch.Generator().manual_seed(1)
    return [
        (
            torch.randn(batch, features, generator=generator),
            torch.randint(0, classes, (batch,), generator=generator),
        )
        for _ in range(steps)
    ]


def _noop(**_: Any) -> None:
    return None


# ------------------------------------------------------------------------------ contenders
def raw(network: nn.Module, batches: Iterable[Batch]) -> None:
    optimizer = torch.optim.SGD(network.parameters(), lr=LR)
    loss_function = nn.CrossEntropyLoss()
    network.train()
    for inputs, target in batches:
        loss = loss_function(network(inputs), target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def raw_with_callbacks(count: int) -> Runner:
    def run(network: nn.Module, batches: Iterable[Batch]) -> None:
        callbacks = [_noop] * count
        optimizer = torch.optim.SGD(network.parameters(), lr=LR)
        loss_function = nn.CrossEntropyLoss()
        network.train()
        for step, batch in enumerate(batches, 1):
            inputs, target = batch
            for callback in callbacks:
                callback(step=step, batch=batch)
            for callback in callbacks:
                callback(step=step, batch=batch)
            loss = loss_function(network(inputs), target)
            for callback in callbacks:
                callback(step=step, loss=loss)
            loss.backward()
            for callback in callbacks:
                callback(step=step, loss=loss)
            for callback in callbacks:
                callback(step=step, optimizer=optimizer)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            for callback in callbacks:
                callback(step=step, optimizer=optimizer)
            for callback in callbacks:
                callback(step=step, loss=loss)

    return run


def design_minimum(count: int) -> Runner:
    """The least a loop of trainbus's design does: the floor trainbus is measured against.

    Seven step events, each calling ``count`` functions with keyword arguments; two frozen
    state snapshots per step (one at the batch's start, one after the optimizer step); the loss
    kept on the device for the log interval. Nothing else: no filters, commands, accounting.
    """

    def run(network: nn.Module, batches: Iterable[Batch]) -> None:
        handlers = [_state_noop] * count
        optimizer = torch.optim.SGD(network.parameters(), lr=LR)
        loss_function = nn.CrossEntropyLoss()
        network.train()
        losses: list[torch.Tensor] = []
        samples = 0
        state = TrainerState()
        for step, batch in enumerate(batches, 1):
            inputs, target = batch
            samples += int(inputs.shape[0])
            state = TrainerState(
                stage="train",
                batch_idx=step - 1,
                iteration=step,
                global_step=step - 1,
                samples_seen=samples,
            )
            for handler in handlers:
                handler(state=state)
            for handler in handlers:
                handler(state=state)
            loss = loss_function(network(inputs), target)
            for handler in handlers:
                handler(state=state)
            loss.backward()
            for handler in handlers:
                handler(state=state)
            for handler in handlers:
                handler(state=state)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            state = TrainerState(
                stage="train",
                batch_idx=step - 1,
                iteration=step,
                global_step=step,
                samples_seen=samples,
            )
            for handler in handlers:
                handler(state=state)
            losses.append(loss.detach())
            for handler in handlers:
                handler(state=state)
        if losses:
            float(torch.stack(losses).mean())

    return run


def _supervised(network: nn.Module) -> SupervisedModel:
    return SupervisedModel(
        network, nn.CrossEntropyLoss(), optimizer=functools.partial(torch.optim.SGD, lr=LR)
    )


def trainbus_with_subscribers(count: int) -> Runner:
    def run(network: nn.Module, batches: Iterable[Batch]) -> None:
        with tempfile.TemporaryDirectory() as scratch:
            trainer = Trainer(
                Path(scratch) / "maps",
                _supervised(network),
                default_callbacks=False,
                plugins=False,
                max_epochs=1,
                log_every_n_batches=max(len(batches), 1),
            )
            for index in range(count):
                for event in STEP_EVENTS:
                    trainer.on(event, id=f"noop-{index}")(_state_noop)
            trainer.train(batches)

    return run


def _state_noop(*, state: Any) -> None:
    return None


def trainbus_defaults(network: nn.Module, batches: Iterable[Batch]) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        trainer = Trainer(Path(scratch) / "maps", _supervised(network), plugins=False, max_epochs=1)
        trainer.train(batches)


def ignite_runner(count: int) -> Runner:
    from ignite.engine import Events, create_supervised_trainer

    def run(network: nn.Module, batches: Iterable[Batch]) -> None:
        optimizer = torch.optim.SGD(network.parameters(), lr=LR)
        engine = create_supervised_trainer(network, optimizer, nn.CrossEntropyLoss())
        for _ in range(count):
            for event in (
                Events.ITERATION_STARTED,
                Events.GET_BATCH_STARTED,
                Events.GET_BATCH_COMPLETED,
                Events.ITERATION_COMPLETED,
            ):
                engine.add_event_handler(event, _ignite_noop)
        engine.run(batches, max_epochs=1)

    return run


def _ignite_noop(engine: Any) -> None:
    return None


def lightning_runner(count: int, *, defaults: bool) -> Runner:
    import lightning

    class Module(lightning.LightningModule):
        def __init__(self, network: nn.Module) -> None:
            super().__init__()
            self.network = network
            self.loss = nn.CrossEntropyLoss()

        def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
            inputs, target = batch
            return self.loss(self.network(inputs), target)  # type: ignore[no-any-return]

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=LR)

    class Noop(lightning.Callback):
        def on_train_batch_start(self, *_: Any) -> None: ...
        def on_before_backward(self, *_: Any) -> None: ...
        def on_after_backward(self, *_: Any) -> None: ...
        def on_before_optimizer_step(self, *_: Any) -> None: ...
        def on_before_zero_grad(self, *_: Any) -> None: ...
        def on_train_batch_end(self, *_: Any) -> None: ...

    def run(network: nn.Module, batches: Iterable[Batch]) -> None:
        with tempfile.TemporaryDirectory() as scratch:
            options: dict[str, Any] = {
                "max_epochs": 1,
                "accelerator": "cpu",
                "devices": 1,
                "default_root_dir": scratch,
                "num_sanity_val_steps": 0,
                "callbacks": [Noop() for _ in range(count)],
            }
            if not defaults:
                options.update(
                    enable_progress_bar=False,
                    enable_checkpointing=False,
                    enable_model_summary=False,
                    logger=False,
                )
            lightning.Trainer(**options).fit(Module(network), _Batches(batches))

    return run


class _Batches:
    """The batch list as one iterable (Lightning reads a bare list as several loaders)."""

    def __init__(self, batches: Iterable[Batch]) -> None:
        self.batches = batches

    def __iter__(self) -> Iterator[Batch]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)  # type: ignore[arg-type]  # a list or a timed batch list


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Console output goes nowhere (its cost stays: it is written, then dropped).

    Process-wide (``sys.stdout``, warnings, logging): enter it once, around a whole
    measurement, never inside the contenders' threads.
    """
    sink = io.StringIO()
    with (
        contextlib.redirect_stderr(sink),
        contextlib.redirect_stdout(sink),
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore")
        logging.disable(logging.CRITICAL)
        try:
            yield
        finally:
            logging.disable(logging.NOTSET)


def contenders(subscribers: int) -> dict[str, Runner]:
    found: dict[str, Runner] = {
        "raw": raw,
        f"raw+{subscribers}": raw_with_callbacks(subscribers),
        f"design+{subscribers}": design_minimum(subscribers),
        "trainbus": trainbus_with_subscribers(0),
        f"trainbus+{subscribers}": trainbus_with_subscribers(subscribers),
        "trainbus-defaults": trainbus_defaults,
    }
    try:
        found[f"ignite+{subscribers}"] = ignite_runner(subscribers)
        found["ignite"] = ignite_runner(0)
    except ImportError:
        print("ignite: not installed, skipped (pip install -e '.[bench]')")
    try:
        found[f"lightning+{subscribers}"] = lightning_runner(subscribers, defaults=False)
        found["lightning-defaults"] = lightning_runner(0, defaults=True)
    except ImportError:
        print("lightning: not installed, skipped (pip install -e '.[bench]')")
    return found
