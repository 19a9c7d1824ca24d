"""Memory over a long run: process RSS (and CUDA allocated memory) must stay flat.

Run: ``.venv/bin/python benchmarks/memory.py`` (``--quick`` for a short smoke run,
``--steps N``). Trains a small network with trainbus and its default callbacks for many short
epochs (so per-epoch work, checkpoints and logs repeat too) and samples the resident set size
after every epoch. Reports the first and last samples after warm-up and the growth per 1000
steps: a loop that kept per-step history (losses on the device, snapshots, dispatch records)
would grow linearly.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainbus import SupervisedModel, Trainer
from trainbus.handlers.monitor import current_rss_bytes

EPOCH_STEPS = 50


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default 20000)")
    arguments = parser.parse_args()
    steps = arguments.steps or (500 if arguments.quick else 20_000)
    epochs = max(steps // EPOCH_STEPS, 2)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    network = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10))
    model = SupervisedModel(
        network, nn.CrossEntropyLoss(), optimizer=functools.partial(torch.optim.SGD, lr=0.01)
    )
    generator = torch.Generator().manual_seed(1)
    batches = [
        (torch.randn(32, 64, generator=generator), torch.randint(0, 10, (32,), generator=generator))
        for _ in range(EPOCH_STEPS)
    ]
    samples: list[tuple[int, int, int]] = []
    with tempfile.TemporaryDirectory() as scratch:
        trainer = Trainer(
            Path(scratch) / "maps",
            model,
            max_epochs=epochs,
            device=device,
            plugins=False,
            log_every_n_batches=10,
        )

        @trainer.on("epoch_end")
        def sample(*, state: Any) -> None:
            rss = current_rss_bytes() or 0
            cuda = torch.cuda.memory_allocated() if device == "cuda" else 0
            samples.append((state.global_step, rss, cuda))

        with contextlib.redirect_stderr(io.StringIO()):
            trainer.train(batches)
    warm = samples[len(samples) // 5 :]  # after allocator and import warm-up
    (first_step, first_rss, first_cuda), (last_step, last_rss, last_cuda) = warm[0], warm[-1]
    per_thousand = 1000 / max(last_step - first_step, 1)
    print(
        f"{steps} steps, {epochs} epochs of {EPOCH_STEPS} on {device}; torch {torch.__version__}, "
        f"python {platform.python_version()}"
    )
    print(
        f"RSS: {first_rss / 2**20:.1f} MiB at step {first_step}, {last_rss / 2**20:.1f} MiB at "
        f"step {last_step}: {(last_rss - first_rss) * per_thousand / 2**10:+.1f} KiB per 1000 steps"
    )
    if device == "cuda":
        print(
            f"CUDA allocated: {first_cuda} B -> {last_cuda} B: "
            f"{(last_cuda - first_cuda) * per_thousand:+.0f} B per 1000 steps"
        )


if __name__ == "__main__":
    sys.exit(main())
