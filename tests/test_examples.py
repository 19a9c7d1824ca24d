"""Every script in examples/ runs as a user would run it, in a fresh directory."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_example(name: str, cwd: Path, *arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(EXAMPLES / name), *arguments],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )


def test_every_example_is_covered_here() -> None:
    scripts = {path.name for path in EXAMPLES.glob("*.py")}
    assert scripts == {"seed_chapter.py", "resume_training.py", "data_parallel.py"}


def test_seed_chapter_runs_as_printed(tmp_path: Path) -> None:
    result = run_example("seed_chapter.py", tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    epochs = [line for line in lines if line.startswith("Starting epoch ")]
    assert epochs[:3] == ["Starting epoch 0", "Starting epoch 1", "Starting epoch 2"]
    assert "stopped by: EarlyStoppingCallback" in result.stdout
    maps = tmp_path / "maps_directory"
    saved = {path.name for path in (maps / "checkpoints").iterdir()}
    assert {"best-loss", "epoch-1", "last"} <= saved
    assert all(name in {"best-loss", "last"} or name.startswith("epoch-") for name in saved)
    expected_epochs = {f"epoch-{n}" for n in range(1, len(epochs), 10)}
    assert {name for name in saved if name.startswith("epoch-")} == expected_epochs
    assert (maps / "metrics.tsv").read_text().count("\n") == len(epochs) + 1


def test_seed_chapter_refuses_to_overwrite_its_maps(tmp_path: Path) -> None:
    (tmp_path / "maps_directory").mkdir()
    (tmp_path / "maps_directory" / "notes.txt").write_text("precious")
    result = run_example("seed_chapter.py", tmp_path)
    assert result.returncode != 0
    assert "already exists" in result.stderr
    assert (tmp_path / "maps_directory" / "notes.txt").read_text() == "precious"


@pytest.mark.parametrize("script", sorted(p.name for p in EXAMPLES.glob("*.py")))
def test_examples_are_documented(script: str) -> None:
    text = (EXAMPLES / script).read_text()
    assert text.startswith('"""'), f"{script} starts with a docstring saying what it shows"


def test_resume_training_continues_where_the_first_run_stopped(tmp_path: Path) -> None:
    maps = "runs/resume-example"
    first = run_example("resume_training.py", tmp_path, maps, "--epochs", "3")
    assert first.returncode == 0, first.stderr
    assert "resumed from" not in first.stdout
    assert "finished: 3 epochs, 39 optimizer steps" in first.stdout
    second = run_example("resume_training.py", tmp_path, maps, "--epochs", "5")
    assert second.returncode == 0, second.stderr
    assert "state-0000000039-epoch-end after 39 optimizer steps" in second.stdout
    assert "finished: 5 epochs, 65 optimizer steps" in second.stdout


@pytest.mark.slow
def test_data_parallel_runs_alone_and_under_torchrun_with_the_same_samples(
    tmp_path: Path,
) -> None:
    alone = run_example("data_parallel.py", tmp_path, "runs/alone")
    assert alone.returncode == 0, alone.stderr
    assert "rank 0 of 1: 64 steps, 2048 samples" in alone.stdout
    environment = {
        k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")
    }
    losses = {}
    for strategy in ("ddp", "fsdp"):
        parallel = subprocess.run(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc-per-node=2",
                str(EXAMPLES / "data_parallel.py"),
                f"runs/{strategy}",
                "--strategy",
                strategy,
            ],
            cwd=tmp_path,
            env=environment,
            capture_output=True,
            text=True,
            timeout=240,
            check=False,
        )
        assert parallel.returncode == 0, parallel.stderr[-4000:]
        # Half the steps on each of 2 ranks, the same samples; printed once, by rank 0.
        assert parallel.stdout.count("rank 0 of 2: 32 steps, 2048 samples") == 1
        assert "rank 1" not in parallel.stdout
        maps = tmp_path / "runs" / strategy
        rows = (maps / "metrics.tsv").read_text().splitlines()
        assert len(rows) == 4 + 1
        losses[strategy] = float(parallel.stdout.split("validation loss ")[1].split()[0])
    # The same maths replicated or sharded, the StepLR schedule included.
    assert losses["fsdp"] == pytest.approx(losses["ddp"], abs=1e-4)
