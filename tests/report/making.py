"""Real trainings into MAPS directories, for the report tests (and, as a script, a slow one to
watch: ``python -m tests.report.making MAPS SECONDS_PER_BATCH``)."""

from __future__ import annotations

import contextlib
import functools
import re
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import torch

from tests.conftest import make_loader, make_model
from trainbus import (
    Callback,
    EarlyStoppingCallback,
    LRSchedulerCallback,
    MonitorCallback,
    Stop,
    Trainer,
    TrainerState,
)

HOSTILE_METRIC = "<script>document.title='pwned'</script>"
HOSTILE_RUN = "<img src=x onerror=\"document.title='pwned'\">"
HOSTILE_SUBSCRIBER = "</text><script>document.title='pwned'</script>"
HOSTILE_REASON = "--><script>document.title='pwned'</script><!--"


def trainbus(*arguments: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """The ``trainbus`` command in a process of its own."""
    return subprocess.run(
        [sys.executable, "-m", "trainbus.cli", *arguments],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def figure(page: str, key: str) -> str:
    """The ``<figure id="fig-KEY">`` element of a report page ("" when it is not there)."""
    found = re.search(rf'<figure id="fig-{key}">.*?</figure>', page, re.DOTALL)
    return found.group(0) if found else ""


def data_paths(svg: str) -> int:
    """How many data series (lines of two points or more, bars) an SVG draws."""
    return len(re.findall(r'<g id="data-[^"]+">\s*<path[^>]* d="M[^"]+L', svg))


def _loaders() -> tuple[object, object]:
    return make_loader(48), make_loader(32, seed=1)


def early_stopped(maps: Path) -> Path:
    """Validation each epoch, a halving learning rate, stopped early after a few epochs."""
    trainer = Trainer(
        maps,
        make_model(lr=0.5),
        callbacks=[
            EarlyStoppingCallback("loss", patience=1, min_delta=0.05),
            LRSchedulerCallback(
                functools.partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5)
            ),
        ],
        max_epochs=20,
        log_every_n_batches=2,
    )
    trainer.train(*_loaders())
    return maps


class Boom(Callback):
    """Fails in the middle of the first epoch."""

    def on_batch_end(self, *, state: TrainerState) -> None:
        if state.iteration == 3:
            raise RuntimeError("boom in the first epoch")


def crashed(maps: Path) -> Path:
    trainer = Trainer(maps, make_model(), callbacks=[Boom()], max_epochs=3, log_every_n_batches=2)
    with contextlib.suppress(RuntimeError):
        trainer.train(*_loaders())
    return maps


def resumed(maps: Path) -> Path:
    """Two epochs, then two more resumed from the training state."""
    Trainer(maps, make_model(), max_epochs=2, log_every_n_batches=2).train(*_loaders())
    Trainer.from_maps(maps, make_model(), max_epochs=4).train(*_loaders())
    return maps


def unmonitored(maps: Path) -> Path:
    """No Monitor (no monitor.json) and no validation."""
    trainer = Trainer(maps, make_model(), max_epochs=2, default_callbacks={MonitorCallback: False})
    trainer.train(make_loader(48))
    return maps


class Hostile(Callback):
    """A subscriber whose id is markup, stopping training with a reason that is markup."""

    callback_id = HOSTILE_SUBSCRIBER

    def on_epoch_end(self, *, state: TrainerState) -> Stop | None:
        return Stop(HOSTILE_REASON) if state.current_epoch == 1 else None


def hostile(maps: Path) -> Path:
    """A run directory, subscriber id, stop reason and metric name that are markup.

    The Trainer accepts only identifiers as metric names, so the hostile one is a column
    another tool added to metrics.tsv after training (the report plots unknown columns too).
    """
    trainer = Trainer(maps, make_model(), callbacks=[Hostile()], max_epochs=3)
    trainer.train(*_loaders())
    table = maps / "metrics.tsv"
    lines = table.read_text().splitlines()
    extra = [f"{lines[0]}\t{HOSTILE_METRIC}"]
    extra += [f"{line}\t{0.5 + index / 10}" for index, line in enumerate(lines[1:])]
    table.write_text("\n".join(extra) + "\n")
    return maps


class Slow(Callback):
    """Sleeps after each batch, so that a run lasts long enough to be watched."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def on_batch_end(self) -> None:
        time.sleep(self.seconds)


def slow(maps: Path, seconds: float, epochs: int = 4) -> Path:
    trainer = Trainer(
        maps, make_model(), callbacks=[Slow(seconds)], max_epochs=epochs, log_every_n_batches=2
    )
    trainer.train(*_loaders())
    return maps


def build_all(root: Path) -> Mapping[str, Path]:
    return {
        "early": early_stopped(root / "early"),
        "crashed": crashed(root / "crashed"),
        "resumed": resumed(root / "resumed"),
        "unmonitored": unmonitored(root / "unmonitored"),
    }


if __name__ == "__main__":
    slow(Path(sys.argv[1]), float(sys.argv[2]))
