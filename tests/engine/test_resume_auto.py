"""``train(resume="auto")``: a script run again until it succeeds resumes, or starts afresh.

Each run is a real process running ``auto_job.py`` (the same script every time, as a user
reruns it): it fails or is killed, then runs again. A run again after a failure before the
first training state must train exactly as if the failure never happened; one after a
training state must resume bit-identically.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import make_loader, make_model
from trainbus import Trainer, TrainerState, TrainingCheckpointCallback
from trainbus.errors import CheckpointError

JOB = Path(__file__).with_name("auto_job.py")
ROOT = Path(__file__).parents[2]


def run_job(maps: Path, out: Path, *options: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(JOB), str(maps), str(out), *options],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )


def succeed(maps: Path, out: Path, *options: str) -> dict[str, torch.Tensor]:
    done = run_job(maps, out, *options)
    assert done.returncode == 0, done.stderr
    weights: dict[str, torch.Tensor] = torch.load(out, weights_only=True)
    return weights


def calls(maps: Path) -> list[dict[str, object]]:
    document = json.loads((maps / "maps.json").read_text())
    return list(document["calls"])


def assert_identical(left: dict[str, torch.Tensor], right: dict[str, torch.Tensor]) -> None:
    assert left.keys() == right.keys()
    for name in left:
        assert torch.equal(left[name], right[name]), name


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A run that was never interrupted: what every rerun must end with."""
    root = tmp_path_factory.mktemp("reference")
    return root / "maps", succeed(root / "maps", root / "final.pt")


@pytest.mark.parametrize(
    ("crash", "status"),
    [("--fail-at-iteration", "failed"), ("--kill-at-iteration", "running")],
)
def test_a_rerun_after_a_crash_before_the_first_state_starts_afresh_keeping_the_failed_call(
    reference: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path, crash: str, status: str
) -> None:
    maps = tmp_path / "maps"
    crashed = run_job(maps, tmp_path / "unused.pt", crash, "4")
    assert crashed.returncode != 0
    assert [call["status"] for call in calls(maps)] == [status]
    assert not (maps / "training").exists()
    assert (maps / "training_loss.tsv").read_text().count("\n") == 2  # header and one row

    final = succeed(maps, tmp_path / "final.pt")

    assert_identical(final, reference[1])
    history = calls(maps)
    assert [call["status"] for call in history] == [
        "interrupted" if status == "running" else "failed",
        "completed",
    ]
    assert "resumed_from" not in history[-1]
    # Nothing the failed call wrote is mixed into the new run's files.
    for name in ("metrics.tsv", "training_loss.tsv"):
        assert (maps / name).read_text() == (reference[0] / name).read_text(), name


def test_a_rerun_after_a_crash_after_a_state_resumes_bit_identically(
    reference: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path
) -> None:
    maps = tmp_path / "maps"
    killed = run_job(maps, tmp_path / "unused.pt", "--kill-at-iteration", "13")
    assert killed.returncode != 0
    assert (maps / "training" / "latest").read_text().strip().startswith("state-0000000009")

    final = succeed(maps, tmp_path / "final.pt")

    assert_identical(final, reference[1])
    history = calls(maps)
    assert [call["status"] for call in history] == ["interrupted", "completed"]
    resumed = history[-1]["resumed_from"]
    assert isinstance(resumed, dict) and resumed["iteration"] == 9


def test_a_maps_that_does_not_exist_starts_afresh(tmp_path: Path) -> None:
    maps = tmp_path / "new" / "maps"
    trainer = Trainer(maps, make_model(), default_callbacks=False, max_epochs=1)
    state = trainer.train(make_loader(), resume="auto")
    assert state.global_step == 6
    assert [call["status"] for call in calls(maps)] == ["completed"]
    # A second call of the same Trainer goes on from memory, as with the default.
    trainer.max_epochs = 2
    assert trainer.train(make_loader(), resume="auto").global_step == 12


def test_a_maps_whose_calls_did_not_all_fail_is_refused_and_left_untouched(
    tmp_path: Path,
) -> None:
    maps = tmp_path / "maps"
    succeed(maps, tmp_path / "final.pt", "--no-training-states")
    before = {p: p.read_bytes() for p in maps.rglob("*") if p.is_file()}

    rerun = run_job(maps, tmp_path / "again.pt", "--no-training-states")

    assert rerun.returncode != 0
    assert CheckpointError.__name__ in rerun.stderr
    assert "not every earlier call failed: train (completed)" in rerun.stderr
    assert {p: p.read_bytes() for p in maps.rglob("*") if p.is_file()} == before


def test_resume_auto_on_a_trainer_from_maps_starts_afresh_too(tmp_path: Path) -> None:
    maps = tmp_path / "maps"
    first = Trainer(
        maps, make_model(), callbacks=[TrainingCheckpointCallback()], default_callbacks=False
    )
    first.max_epochs = 2

    @first.on("batch_end")
    def crash(*, state: TrainerState) -> None:
        if state.iteration == 2:
            raise RuntimeError("a bug in the script")

    with pytest.raises(RuntimeError, match="a bug in the script"):
        first.train(make_loader())
    (maps / "stray.txt").write_text("written by the failed call")

    again = Trainer.from_maps(maps, make_model(), callbacks=[TrainingCheckpointCallback()])
    state = again.train(make_loader(), resume="auto")

    assert state.global_step == 12
    assert [call["status"] for call in calls(maps)] == ["failed", "completed"]
    assert not (maps / "stray.txt").exists()
