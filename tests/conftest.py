"""Shared fixtures: a tiny real model and real loaders, small enough for a 2-core machine."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from trainbus import Callback, SupervisedModel, Trainer


def make_dataset(samples: int = 48, features: int = 4, seed: int = 0) -> TensorDataset:
    """A linearly separable two-class problem."""
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(samples, features, generator=generator)
    target = (inputs.sum(dim=1) > 0).long()
    return TensorDataset(inputs, target)


def make_loader(
    samples: int = 48, batch_size: int = 8, *, shuffle: bool = False, seed: int = 0
) -> DataLoader[tuple[torch.Tensor, ...]]:
    generator = torch.Generator().manual_seed(seed + 100) if shuffle else None
    return DataLoader(
        make_dataset(samples, seed=seed),
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
    )


def make_model(seed: int = 0, lr: float = 0.05) -> SupervisedModel:
    torch.manual_seed(seed)
    network = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    return SupervisedModel(
        network, nn.CrossEntropyLoss(), optimizer=functools.partial(torch.optim.SGD, lr=lr)
    )


def rows_of(path: Path, column: str, stage: str | None = None) -> list[tuple[int, float]]:
    """``(global_step, column)`` of a TSV file of the MAPS (of one stage for metrics.tsv)."""
    lines = path.read_text().splitlines()
    header = lines[0].split("\t")
    rows = [dict(zip(header, line.split("\t"), strict=True)) for line in lines[1:]]
    return [
        (int(row["global_step"]), float(row[column]))
        for row in rows
        if stage is None or row["stage"] == stage
    ]


class ValidationCounter(Callback):
    """Counts the validations it saw; its count is part of every training state."""

    def __init__(self) -> None:
        self.seen = 0

    def on_validation_end(self) -> None:
        self.seen += 1

    def state_dict(self) -> dict[str, Any]:
        return {"seen": self.seen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seen = state["seen"]

    def reset(self) -> None:
        self.seen = 0


@pytest.fixture
def loader() -> DataLoader[tuple[torch.Tensor, ...]]:
    return make_loader()


@pytest.fixture
def model() -> SupervisedModel:
    return make_model()


@pytest.fixture
def maps_path(tmp_path: Path) -> Path:
    return tmp_path / "maps"


@pytest.fixture
def quiet_trainer(maps_path: Path) -> Callable[..., Trainer]:
    """Build a Trainer without default callbacks (override any keyword)."""

    def build(**kwargs: object) -> Trainer:
        options: dict[str, object] = {
            "maps": maps_path,
            "model": make_model(),
            "default_callbacks": False,
            "max_epochs": 2,
        }
        options.update(kwargs)
        return Trainer(**options)  # type: ignore[arg-type]

    return build


# ----------------------------------------------------------------- reliability report
_FAULTS: dict[str, dict[str, Any]] = {}


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """Count every trial of a test marked ``fault`` (each parametrized case is one trial)."""
    report = yield
    marker = item.get_closest_marker("fault")
    if marker is not None and report.when == "call" and not report.skipped:
        record = _FAULTS.setdefault(
            marker.args[0], {"trials": 0, "passed": 0, "outcome": marker.kwargs["outcome"]}
        )
        record["trials"] += 1
        record["passed"] += int(report.passed)
    return report


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Write the fault table to ``$TRAINBUS_RELIABILITY_REPORT`` (docs/reliability.md)."""
    target = os.environ.get("TRAINBUS_RELIABILITY_REPORT")
    if not target or not _FAULTS:
        return
    path = Path(target)
    head, _, tail = path.read_text().partition(REPORT_START) if path.exists() else ("", "", "")
    _, _, tail = tail.partition(REPORT_END)
    rows = [
        "| fault or bad input | trials | passed | outcome checked |",
        "|---|---:|---:|---|",
        *(
            f"| {name} | {r['trials']} | {r['passed']} | {r['outcome']} |"
            for name, r in sorted(_FAULTS.items())
        ),
    ]
    path.write_text(head + REPORT_START + "\n" + "\n".join(rows) + "\n" + REPORT_END + tail)


REPORT_START = "<!-- fault table: written by the test suite, do not edit -->"
REPORT_END = "<!-- end of fault table -->"
