"""Side-by-side step time: a hand-written loop, trainbus, PyTorch Ignite and PyTorch Lightning.

Run: ``.venv/bin/python benchmarks/compare.py`` (``--quick`` for a short smoke run,
``--model tiny|small``, ``--subscribers N``, ``--repeats R``, ``--json FILE``). Ignite and
Lightning come from the optional ``bench`` extra (``pip install -e ".[bench]"``); a peer that
is not installed is skipped.

Every contender trains the same network, from the same initial weights, on the same list of
in-memory batches with the same SGD optimizer, in this one process; contenders are
interleaved in a new random order at each repeat, so drifting machine load spreads over all
of them. Each measurement times two runs of one epoch, of ``S`` and ``3 S`` steps: the
difference, divided by ``2 S``, is the steady time per step, free of what a framework does
once per run (building a MAPS, spawning a progress bar, ...), which is reported apart as the
fixed cost. Reported: the median over repeats, the spread (lowest to highest), and the ratio
of medians to the hand-written loop.

Contenders (``N`` = ``--subscribers``):

- ``raw``: the hand-written loop.
- ``raw+N``: the same loop calling a plain list of N no-op functions at each of the seven
  points where trainbus emits a step event: the floor for any callback system.
- ``trainbus+N``: trainbus without default callbacks, N no-op subscribers on each step event.
- ``trainbus-defaults``: trainbus with its default callbacks (logger, monitor, metrics
  writer, model and training checkpoints), writing a MAPS in a temporary directory.
- ``ignite+N`` / ``ignite``: ``create_supervised_trainer`` with N no-op handlers on each
  per-iteration event, and with none (Ignite has no default handlers).
- ``lightning+N`` / ``lightning-defaults``: Lightning with N no-op callbacks on each step hook
  and nothing else, and with its defaults (progress bar, logger, checkpointing, summary).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import io
import json
import logging
import os
import platform
import random
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

import trainbus
from trainbus import SupervisedModel, Trainer

Batch = tuple[torch.Tensor, torch.Tensor]
Runner = Callable[[nn.Module, list[Batch]], None]

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
def raw(network: nn.Module, batches: list[Batch]) -> None:
    optimizer = torch.optim.SGD(network.parameters(), lr=LR)
    loss_function = nn.CrossEntropyLoss()
    network.train()
    for inputs, target in batches:
        loss = loss_function(network(inputs), target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def raw_with_callbacks(count: int) -> Runner:
    def run(network: nn.Module, batches: list[Batch]) -> None:
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


def _supervised(network: nn.Module) -> SupervisedModel:
    return SupervisedModel(
        network, nn.CrossEntropyLoss(), optimizer=functools.partial(torch.optim.SGD, lr=LR)
    )


def trainbus_with_subscribers(count: int) -> Runner:
    def run(network: nn.Module, batches: list[Batch]) -> None:
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


def trainbus_defaults(network: nn.Module, batches: list[Batch]) -> None:
    with tempfile.TemporaryDirectory() as scratch, _quiet():
        trainer = Trainer(Path(scratch) / "maps", _supervised(network), plugins=False, max_epochs=1)
        trainer.train(batches)


def ignite_runner(count: int) -> Runner:
    from ignite.engine import Events, create_supervised_trainer

    def run(network: nn.Module, batches: list[Batch]) -> None:
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

    def run(network: nn.Module, batches: list[Batch]) -> None:
        with tempfile.TemporaryDirectory() as scratch, _quiet():
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

    def __init__(self, batches: list[Batch]) -> None:
        self.batches = batches

    def __iter__(self) -> Iterator[Batch]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Console output goes nowhere (its cost stays: it is written, then dropped)."""
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


# ------------------------------------------------------------------------------ measuring
def timed(runner: Runner, model: str, batches: list[Batch]) -> float:
    network = make_network(model)
    gc.collect()
    gc.disable()  # as timeit does: a collection landing in one run only is noise
    try:
        started = time.perf_counter()
        runner(network, batches)
        return time.perf_counter() - started
    finally:
        gc.enable()


def measure(
    runners: dict[str, Runner], model: str, steps: int, repeats: int, seed: int
) -> dict[str, dict[str, float]]:
    short, long = make_batches(model, steps), make_batches(model, 3 * steps)
    per_step: dict[str, list[float]] = {name: [] for name in runners}
    ratios: dict[str, list[float]] = {name: [] for name in runners}
    fixed: dict[str, list[float]] = {name: [] for name in runners}
    order = list(runners)
    shuffler = random.Random(seed)
    for name in order:  # warm-up: imports, allocator, first-call caches
        timed(runners[name], model, short[:3])
    for _ in range(repeats):
        shuffler.shuffle(order)
        for name in order:
            short_time = timed(runners[name], model, short)
            long_time = timed(runners[name], model, long)
            step = (long_time - short_time) / (2 * steps)
            per_step[name].append(step)
            fixed[name].append(short_time - steps * step)
        for name in runners:
            # Against the raw loop of the same repeat: slow drifts of the machine cancel.
            ratios[name].append(per_step[name][-1] / per_step["raw"][-1])
    results = {}
    for name in runners:
        results[name] = {
            "median_us": statistics.median(per_step[name]) * 1e6,
            "low_us": min(per_step[name]) * 1e6,
            "high_us": max(per_step[name]) * 1e6,
            "ratio": statistics.median(ratios[name]),
            "ratio_low": min(ratios[name]),
            "ratio_high": max(ratios[name]),
            "fixed_ms": statistics.median(fixed[name]) * 1e3,
        }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few steps, 1 repeat (CI smoke run)")
    parser.add_argument("--model", choices=sorted(MODELS), default="tiny")
    parser.add_argument("--subscribers", type=int, default=10)
    parser.add_argument("--steps", type=int, default=None, help="steps of the short run")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    arguments = parser.parse_args()
    torch.set_num_threads(arguments.threads)
    steps = arguments.steps or (
        20 if arguments.quick else (400 if arguments.model == "tiny" else 60)
    )
    repeats = arguments.repeats or (1 if arguments.quick else 7)
    runners = contenders(arguments.subscribers)
    print(
        f"model {arguments.model}, {steps} and {3 * steps} steps, {repeats} repeats, "
        f"torch {torch.__version__} ({arguments.threads} thread), "
        f"trainbus {trainbus.__version__}, python {platform.python_version()}, "
        f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()})"
    )
    results = measure(runners, arguments.model, steps, repeats, seed=0)
    print(
        f"{'contender':<20} {'us/step':>9} {'spread':>15} {'x raw':>7} {'x raw spread':>13} "
        f"{'fixed ms':>9}"
    )
    for name, row in results.items():
        spread = f"{row['low_us']:.1f}-{row['high_us']:.1f}"
        ratio_spread = f"{row['ratio_low']:.2f}-{row['ratio_high']:.2f}"
        print(
            f"{name:<20} {row['median_us']:>9.1f} {spread:>15} {row['ratio']:>7.3f} "
            f"{ratio_spread:>13} {row['fixed_ms']:>9.1f}"
        )
    if arguments.json is not None:
        arguments.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
