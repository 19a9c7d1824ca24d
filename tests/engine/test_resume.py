"""Exact resume across processes: an interrupted run, resumed in a new process, ends bit-identical.

Each case trains the job of ``resume_job.py`` (dropout, a ``shuffle=True`` loader drawing from
the global generator, AdamW, early stopping) in a subprocess, interrupts it (a completed
shorter run, or SIGKILL at a chosen point), resumes it in a second subprocess with
``Trainer.from_maps`` and compares everything with one uninterrupted run: weights, optimizer
state, final counters, metric rows, training-loss rows and the early-stopping decision.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

JOB = Path(__file__).with_name("resume_job.py")
EPOCHS = 8  # early stopping ends the uninterrupted run after epoch 6


def run_job(
    maps: Path, out: Path, *arguments: str, expect_kill: bool = False, status: int = 0
) -> None:
    completed = subprocess.run(
        [sys.executable, str(JOB), str(maps), str(out), *arguments],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if expect_kill:
        assert completed.returncode == -signal.SIGKILL, completed.stderr[-3000:]
        assert not out.exists()
    else:
        assert completed.returncode == status, completed.stderr[-3000:]


def outcome(maps: Path, out: Path) -> dict[str, Any]:
    result = torch.load(out, weights_only=True)
    calls = json.loads((maps / "maps.json").read_text())["calls"]
    return {
        "result": result,
        "metrics": (maps / "metrics.tsv").read_text(),
        "training_loss": (maps / "training_loss.tsv").read_text(),
        "stop": calls[-1].get("stop"),
        "calls": calls,
    }


def assert_same_training(expected: dict[str, Any], actual: dict[str, Any]) -> None:
    for name, tensor in expected["result"]["model"].items():
        assert torch.equal(tensor, actual["result"]["model"][name]), name
    assert_same_nested(expected["result"]["optimizer"], actual["result"]["optimizer"])
    assert expected["result"]["state"] == actual["result"]["state"]
    assert expected["metrics"] == actual["metrics"]
    assert expected["training_loss"] == actual["training_loss"]
    assert expected["stop"] == actual["stop"]


def assert_same_nested(expected: Any, actual: Any) -> None:
    if isinstance(expected, torch.Tensor):
        assert torch.equal(expected, actual)
    elif isinstance(expected, dict):
        assert expected.keys() == actual.keys()
        for key in expected:
            assert_same_nested(expected[key], actual[key])
    elif isinstance(expected, list | tuple):
        assert len(expected) == len(actual)
        for left, right in zip(expected, actual, strict=True):
            assert_same_nested(left, right)
    else:
        assert expected == actual


@pytest.fixture(scope="module")
def uninterrupted(
    tmp_path_factory: pytest.TempPathFactory,
) -> Callable[..., dict[str, Any]]:
    """The uninterrupted run: with the global generator or the loader's own one, and with
    persistent worker processes (whose iterator draws differently after the first epoch)."""
    runs: dict[tuple[bool, bool], dict[str, Any]] = {}

    def get(own_generator: bool, persistent: bool = False) -> dict[str, Any]:
        key = (own_generator, persistent)
        if key not in runs:
            root = tmp_path_factory.mktemp("straight")
            extra = ("--own-generator",) if own_generator else ()
            if persistent:
                extra += PERSISTENT
            run_job(root / "maps", root / "out.pt", "--epochs", str(EPOCHS), *extra)
            result = outcome(root / "maps", root / "out.pt")
            if not persistent:  # its shuffling differs: it trains on to the last epoch
                assert result["stop"] is not None, "the reference run must stop early"
                assert result["result"]["state"]["current_epoch"] < EPOCHS - 1
            runs[key] = result
        return runs[key]

    return get


STEPS_4 = ("--every-n-steps", "4")
PERSISTENT = ("--workers", "2", "--persistent")
INTERRUPTIONS: dict[str, tuple[tuple[str, ...], bool, tuple[str, ...]]] = {
    # case: (arguments of the interrupted run, killed?, extra arguments of the resumed run)
    "after-2-complete-epochs": (("--epochs", "2"), False, ()),
    "sigkill-mid-epoch": (("--kill-at-iteration", "13", *STEPS_4), True, STEPS_4),
    "sigkill-in-validation": (("--kill-in-validation", "2", *STEPS_4), True, STEPS_4),
    "sigkill-after-last-batch-state": (
        ("--kill-in-validation", "2", "--every-n-steps", "9"),
        True,
        ("--every-n-steps", "9"),
    ),
    "own-generator-sigkill-after-an-epoch-end-state": (
        ("--kill-at-iteration", "12", "--own-generator"),
        True,
        ("--own-generator",),
    ),
    "own-generator-sigkill-mid-epoch": (
        ("--kill-at-iteration", "13", "--own-generator", *STEPS_4),
        True,
        ("--own-generator", *STEPS_4),
    ),
    "sigkill-with-worker-processes": (
        ("--kill-at-iteration", "31", "--every-n-steps", "5", "--workers", "2"),
        True,
        ("--every-n-steps", "5", "--workers", "2"),
    ),
    "persistent-workers-sigkill-after-an-epoch-end-state": (
        ("--kill-at-iteration", "12", *PERSISTENT),
        True,
        PERSISTENT,
    ),
    "persistent-workers-sigkill-mid-epoch": (
        ("--kill-at-iteration", "13", *STEPS_4, *PERSISTENT),
        True,
        (*STEPS_4, *PERSISTENT),
    ),
}


@pytest.mark.fault(
    (
        "SIGKILL at chosen points: mid-epoch, in validation, right after a state at an "
        "epoch's last batch, with worker processes (persistent or not), with the loader's own "
        "generator; or a shorter run extended"
    ),
    outcome="bit-identical weights, optimizer, counters, metric and loss rows, stop decision",
)
@pytest.mark.parametrize("case", sorted(INTERRUPTIONS))
def test_resume_in_a_new_process_is_bit_identical(
    case: str, uninterrupted: Callable[..., dict[str, Any]], tmp_path: Path
) -> None:
    interrupted, killed, resumed_with = INTERRUPTIONS[case]
    maps, out = tmp_path / "maps", tmp_path / "out.pt"
    run_job(maps, out, *interrupted, expect_kill=killed)
    if not killed:
        out.unlink()
    run_job(maps, out, "--resume", "--epochs", str(EPOCHS), *resumed_with)
    resumed = outcome(maps, out)
    reference = uninterrupted("--own-generator" in interrupted, "--persistent" in interrupted)
    assert_same_training(reference, resumed)
    resume_record = resumed["calls"][-1]["resumed_from"]
    assert resume_record["skipped"] == []
    assert resume_record["state"].startswith("state-")


@pytest.mark.fault(
    "SIGKILL after rows were written past the last training state",
    outcome="no duplicate or missing row in training_loss.tsv",
)
def test_a_killed_run_leaves_rows_that_the_resume_rewrites_once(
    uninterrupted: Callable[..., dict[str, Any]], tmp_path: Path
) -> None:
    maps, out = tmp_path / "maps", tmp_path / "out.pt"
    # Killed at iteration 22: rows for iterations 20 (loss) were written after the state at 16.
    run_job(maps, out, "--kill-at-iteration", "22", "--every-n-steps", "8", expect_kill=True)
    rows_before = (maps / "training_loss.tsv").read_text().splitlines()
    assert any(line.split("\t")[2] == "20" for line in rows_before[1:])
    run_job(maps, out, "--resume", "--epochs", str(EPOCHS), "--every-n-steps", "8")
    rows = (maps / "training_loss.tsv").read_text().splitlines()
    iterations = [int(line.split("\t")[2]) for line in rows[1:]]
    assert iterations == sorted(set(iterations))
    assert uninterrupted(False)["training_loss"] == (maps / "training_loss.tsv").read_text()


@pytest.mark.fault(
    "SIGTERM or SIGINT during training",
    outcome=(
        "a training state at the next step boundary, exit status 128+signum, bit-identical resume"
    ),
)
@pytest.mark.parametrize("name", ["SIGTERM", "SIGINT"])
def test_a_signal_saves_at_the_next_step_exits_128_plus_signum_and_resumes_exactly(
    name: str, uninterrupted: Callable[..., dict[str, Any]], tmp_path: Path
) -> None:
    maps, out = tmp_path / "maps", tmp_path / "out.pt"
    number = signal.Signals[name]
    run_job(maps, out, "--signal-at-iteration", "13", "--signal", name, status=128 + number)
    assert not out.exists()  # train() did not return: the process exited
    states = sorted(p.name for p in (maps / "training").iterdir() if p.name.startswith("state-"))
    assert "state-0000000013" in states  # written at the boundary after the signal
    stop = json.loads((maps / "maps.json").read_text())["calls"][-1]["stop"]
    assert stop == {"by": "trainbus.signal", "reason": f"received {name}", "resumable": True}
    run_job(maps, out, "--resume", "--epochs", str(EPOCHS))
    assert_same_training(uninterrupted(False), outcome(maps, out))
