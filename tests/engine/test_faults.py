"""SIGKILL at random points of real training processes, then resume: nothing lost or changed.

Each trial kills the job of ``resume_job.py`` at a random point, during a training step,
during validation, or in the middle of a checkpoint write (at a random file fsync), resumes it
in a new process and compares it with an uninterrupted run. ``TRAINBUS_SLOW=1`` runs 20
trials instead of the default 4.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from .test_resume import EPOCHS, assert_same_training, outcome, run_job
from .test_resume import uninterrupted as uninterrupted  # the shared reference run

TRIALS = 20 if os.environ.get("TRAINBUS_SLOW") == "1" else 4
KINDS = ("step", "validation", "write")


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
    kind, arguments = plan(seed)
    maps, out = tmp_path / "maps", tmp_path / "out.pt"
    cadence = ["--every-n-steps", "3"]
    run_job(maps, out, "--epochs", str(EPOCHS), *arguments, *cadence, expect_kill=True)
    if not (maps / "training").is_dir() or not any(
        p.name.startswith("state-") for p in (maps / "training").iterdir()
    ):
        pytest.skip(f"trial {seed} ({kind}) was killed before its first training state")
    run_job(maps, out, "--resume", "--epochs", str(EPOCHS), *cadence)
    resumed = outcome(maps, out)
    assert_same_training(uninterrupted(False), resumed)
    for line in resumed["calls"][-1]["resumed_from"]["skipped"]:
        assert "corrupt" in line or "latest" in line  # passed over, never used
