"""SIGKILL at random points of real training processes, then resume: nothing lost or changed.

Each trial kills the job of ``resume_job.py`` at a random point, during a training step,
during validation, or in the middle of a checkpoint write (at a random file fsync), resumes it
in a new process and compares it with an uninterrupted run. ``TRAINBUS_SLOW=1`` runs 20
trials instead of the default 4.

The asynchronous trials run the same job with every checkpoint written in the background
(``asynchronous=True``), killed while a background write is likely in flight (the step
right after a state was asked for) or at a random file fsync of the writer thread; the
uninterrupted run they are compared with writes synchronously.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from .test_resume import EPOCHS, JOB, assert_same_training, outcome, run_job
from .test_resume import uninterrupted as uninterrupted  # the shared reference run

SLOW = os.environ.get("TRAINBUS_SLOW") == "1"
TRIALS = 20 if SLOW else 4
ASYNCHRONOUS_TRIALS = 20 if SLOW else 3
KINDS = ("step", "validation", "write")

ASYNCHRONOUS_JOB = """
import functools, runpy, sys
from trainbus import ModelCheckpointCallback, TrainingCheckpointCallback
for kind in (ModelCheckpointCallback, TrainingCheckpointCallback):
    kind.__init__ = functools.partialmethod(kind.__init__, asynchronous=True)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""
"""``resume_job.py`` with every checkpoint callback made asynchronous."""


def plan(seed: int) -> tuple[str, list[str]]:
    """The kind of kill of trial ``seed`` and the arguments that inject it."""
    chooser = random.Random(seed)
    kind = KINDS[seed % len(KINDS)] if seed < len(KINDS) else chooser.choice(KINDS)
    if kind == "step":
        return kind, ["--kill-at-iteration", str(chooser.randint(4, 60))]
    if kind == "validation":
        return kind, ["--kill-in-validation", str(chooser.randint(0, 5))]
    return kind, ["--kill-in-write", str(chooser.randint(5, 60))]


@pytest.mark.fault(
    "SIGKILL at a random point (training step, validation, checkpoint write), resume",
    outcome="weights, optimizer, counters, metrics.tsv, training_loss.tsv and the "
    "early-stopping decision bit-identical to an uninterrupted run; no corrupt state used",
)
@pytest.mark.parametrize("seed", range(TRIALS))
def test_a_run_killed_anywhere_resumes_bit_identical(
    seed: int, uninterrupted: Callable[[bool], dict[str, Any]], tmp_path: Path
) -> None:
    kill_and_resume(seed, plan, run, uninterrupted(False), tmp_path)


def run(maps: Path, out: Path, *arguments: str, killed: bool = False) -> None:
    """The resume job, synchronous saves (``killed``: it must die by SIGKILL)."""
    run_job(maps, out, *arguments, expect_kill=killed)


def kill_and_resume(
    seed: int,
    planned: Callable[[int], tuple[str, list[str]]],
    job: Callable[..., None],
    expected: dict[str, Any],
    tmp_path: Path,
) -> None:
    """Kill ``job`` where trial ``seed`` of ``planned`` says, resume, compare with ``expected``."""
    kind, arguments = planned(seed)
    maps, out = tmp_path / "maps", tmp_path / "out.pt"
    cadence = ["--every-n-steps", "3"]
    job(maps, out, "--epochs", str(EPOCHS), *arguments, *cadence, killed=True)
    if not (maps / "training").is_dir() or not any(
        p.name.startswith("state-") for p in (maps / "training").iterdir()
    ):
        pytest.skip(f"trial {seed} ({kind}) was killed before its first training state")
    job(maps, out, "--resume", "--epochs", str(EPOCHS), *cadence)
    resumed = outcome(maps, out)
    assert_same_training(expected, resumed)
    for line in resumed["calls"][-1]["resumed_from"]["skipped"]:
        assert "corrupt" in line or "latest" in line  # passed over, never used


def run_asynchronous_job(maps: Path, out: Path, *arguments: str, killed: bool = False) -> None:
    completed = subprocess.run(
        [sys.executable, "-c", ASYNCHRONOUS_JOB, str(JOB), str(maps), str(out), *arguments],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert completed.returncode == (-signal.SIGKILL if killed else 0), completed.stderr[-3000:]
    assert out.exists() != killed


def asynchronous_plan(seed: int) -> tuple[str, list[str]]:
    """The kill of asynchronous trial ``seed``: after a state was asked for, or in a write."""
    chooser = random.Random(1000 + seed)
    if seed % 2 == 0:
        # States are asked for every 3 steps: the next step runs beside its write.
        return "step", ["--kill-at-iteration", str(3 * chooser.randint(1, 18) + 1)]
    return "write", ["--kill-in-write", str(chooser.randint(3, 60))]


@pytest.mark.fault(
    "SIGKILL during an asynchronous (background) checkpoint write, resume",
    outcome="the previous training state is chosen and verifies; weights, optimizer, counters, "
    "metrics.tsv, training_loss.tsv and the early-stopping decision bit-identical to an "
    "uninterrupted synchronous run",
)
@pytest.mark.parametrize("seed", range(ASYNCHRONOUS_TRIALS))
def test_a_run_killed_during_a_background_write_resumes_bit_identical(
    seed: int, uninterrupted: Callable[[bool], dict[str, Any]], tmp_path: Path
) -> None:
    kill_and_resume(seed, asynchronous_plan, run_asynchronous_job, uninterrupted(False), tmp_path)
