"""Step time around a training-state save: asynchronous=True against blocking saves.

A model of a few large Linear layers (over 200 MB of float32 parameters by default) trains on
the CPU (``--device cuda``: on the GPU, the host copy then a device-to-host transfer); a
TrainingCheckpointCallback writes a training state every N steps. Blocking and
asynchronous runs alternate in this process (the same machine, the same disk), and the
table gives, per mode, the median time of an ordinary step, of a step that saves (from the
end of the step before to the end of the saving step's boundary), and the waits for a
previous background write. ``--quick`` runs a tiny model once per mode (a smoke run).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from trainbus import Callback, SupervisedModel, Trainer, TrainerState, TrainingCheckpointCallback


class StepClock(Callback):
    """Time between consecutive ``batch_end`` events; a save runs in the interval after it."""

    def __init__(self) -> None:
        self.ends: list[float] = []

    def on_batch_end(self, *, state: TrainerState) -> None:
        self.ends.append(time.perf_counter())


def build(width: int, layers: int) -> SupervisedModel:
    torch.manual_seed(0)
    network = nn.Sequential(*(nn.Linear(width, width) for _ in range(layers)))
    return SupervisedModel(
        network, nn.MSELoss(), optimizer=functools.partial(torch.optim.SGD, lr=1e-4)
    )


def run(
    root: Path,
    *,
    asynchronous: bool,
    width: int,
    layers: int,
    steps: int,
    every: int,
    device: str = "cpu",
) -> dict[str, float]:
    """One training run; the step times split into saving and ordinary steps (milliseconds)."""
    inputs = torch.randn(steps * 4, width)
    loader = DataLoader(TensorDataset(inputs, inputs), batch_size=4)
    clock = StepClock()
    saver = TrainingCheckpointCallback(
        None, every, save_on_train_end=False, keep=1, asynchronous=asynchronous
    )
    trainer = Trainer(
        root,
        build(width, layers),
        callbacks=[saver, clock],
        default_callbacks=False,
        max_epochs=1,
        device=device,
    )
    started = time.perf_counter()
    trainer.train(loader)
    total = time.perf_counter() - started
    # Interval i runs from the end of step i + 1 to the end of step i + 2: the boundary of
    # step i + 1 (its save, if any) and the next step's compute.
    intervals = [1000 * (b - a) for a, b in zip(clock.ends, clock.ends[1:], strict=False)]
    saving = [t for i, t in enumerate(intervals) if (i + 1) % every == 0]
    plain = [t for i, t in enumerate(intervals) if (i + 1) % every and i + 1 > every]
    writer = trainer._saver.background
    return {
        "plain": statistics.median(plain),
        "save": statistics.median(saving),
        "total": total,
        "waits": writer.waits,
        "wait_ms": 1000 * writer.wait_seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny model, one round")
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--every", type=int, default=10, help="a training state every N steps")
    parser.add_argument("--rounds", type=int, default=2, help="blocking/asynchronous pairs")
    parser.add_argument("--directory", help="where the MAPS go (default: a temporary folder)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (the model trains there)")
    options = parser.parse_args()
    if options.quick:
        options.width, options.layers, options.steps, options.every, options.rounds = (
            64,
            2,
            12,
            3,
            1,
        )
    parameters = options.layers * (options.width * options.width + options.width)
    print(
        f"checkpoint_async: {parameters * 4 / 1e6:.2f} MB of float32 parameters "
        f"({options.layers} x Linear({options.width}, {options.width})), SGD, a training state "
        f"every {options.every} steps, {options.steps} steps, {options.rounds} round(s), "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {options.device}"
    )
    results: dict[str, list[dict[str, float]]] = {"blocking": [], "asynchronous": []}
    with tempfile.TemporaryDirectory(dir=options.directory) as scratch:
        print(f"MAPS under {scratch}")
        for round_ in range(options.rounds):
            for mode in (
                ("blocking", "asynchronous") if round_ % 2 == 0 else ("asynchronous", "blocking")
            ):
                results[mode].append(
                    run(
                        Path(scratch) / f"{mode}-{round_}",
                        asynchronous=mode == "asynchronous",
                        width=options.width,
                        layers=options.layers,
                        steps=options.steps,
                        every=options.every,
                        device=options.device,
                    )
                )
    columns = ("step ms", 9), ("save step ms", 13), ("overhead ms", 12), ("run s", 7)
    print(f"{'mode':<13} " + " ".join(f"{n:>{w}}" for n, w in columns) + "  waits  wait ms")
    for mode, runs in results.items():
        plain = statistics.median(r["plain"] for r in runs)
        save = statistics.median(r["save"] for r in runs)
        print(
            f"{mode:<13} {plain:>9.1f} {save:>13.1f} {save - plain:>12.1f} "
            f"{statistics.median(r['total'] for r in runs):>7.2f} "
            f"{sum(r['waits'] for r in runs):>6.0f} {sum(r['wait_ms'] for r in runs):>8.1f}"
        )


if __name__ == "__main__":
    main()
