"""``maps="runs/v{version}"``: each run gets the next free number, even when started together."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import make_loader, make_model
from trainbus import Maps, Trainer, TrainingCheckpointCallback
from trainbus.errors import ConfigurationError, MapsError

ROOT = Path(__file__).parents[2]


def test_the_next_number_follows_the_highest_matching_sibling_and_is_printed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    runs = tmp_path / "runs" / "digits"
    for name in ("v1", "v5", "v7-old", "w9", "v", "notes.txt"):
        (runs / name).mkdir(parents=True)
    trainer = Trainer(runs / "v{version}", make_model(), default_callbacks=False, max_epochs=1)
    assert trainer.maps.path == runs / "v6"
    assert capsys.readouterr().out == f"trainbus: MAPS {runs / 'v6'}\n"
    trainer.train(make_loader())
    assert (runs / "v6" / "maps.json").is_file()
    assert Maps(runs / "v{version}").path == runs / "v7"


def test_numbering_starts_at_one_and_creates_the_parent(tmp_path: Path) -> None:
    maps = Maps(str(tmp_path / "new" / "run-{version}-cnn"))
    assert maps.path == tmp_path / "new" / "run-1-cnn"
    assert maps.path.is_dir() and not any(maps.path.iterdir())  # reserved, empty


def test_runs_started_together_in_real_processes_get_different_numbers(tmp_path: Path) -> None:
    go = tmp_path / "go"
    script = (
        "import os, sys, time\n"
        "from trainbus import Maps\n"
        "while not os.path.exists(sys.argv[1]): time.sleep(0.001)\n"
        "print('chose', Maps(sys.argv[2]).path.name, flush=True)\n"
    )
    starters = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(go), str(tmp_path / "runs" / "v{version}")],
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        for _ in range(4)
    ]
    time.sleep(3)  # every process has imported trainbus and waits for the start
    go.touch()
    chosen = []
    for starter in starters:
        output, _ = starter.communicate(timeout=120)
        assert starter.returncode == 0
        chosen += [line.split()[1] for line in output.splitlines() if line.startswith("chose")]
    assert sorted(chosen) == ["v1", "v2", "v3", "v4"]


@pytest.mark.parametrize(
    ("pattern", "problem"),
    [
        ("runs/v{version}-{version}", "holds {version} 2 times"),
        ("runs/{name}-v{version}", "braces other than {version}"),
        ("runs/v{version}/maps", "not in its last component"),
        ("runs/v{ version}", "holds {version} 0 times"),
        ("runs/v{0}", "holds {version} 0 times"),
    ],
)
def test_a_pattern_it_cannot_use_is_refused_before_anything_is_created(
    tmp_path: Path, pattern: str, problem: str
) -> None:
    with pytest.raises(ConfigurationError, match=problem) as raised:
        Trainer(tmp_path / pattern, make_model())
    assert repr(str(tmp_path / pattern)) in str(raised.value)
    assert not (tmp_path / "runs").exists()


def test_overwrite_with_a_version_pattern_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="nothing to replace"):
        Trainer(tmp_path / "v{version}", make_model(), overwrite=True)
    assert not any(tmp_path.iterdir())


def test_from_maps_takes_the_newest_existing_run(tmp_path: Path) -> None:
    pattern = tmp_path / "v{version}"
    with pytest.raises(MapsError, match=r"no directory .* matches it"):
        Trainer.from_maps(pattern, make_model())
    states: dict[str, Any] = {
        "callbacks": [TrainingCheckpointCallback()],
        "default_callbacks": False,
    }
    for _ in range(2):
        Trainer(pattern, make_model(), max_epochs=1, **states).train(make_loader())
    rebuilt = Trainer.from_maps(pattern, make_model(), max_epochs=2, **states)
    assert rebuilt.maps.path == tmp_path / "v2"
    assert rebuilt.train(make_loader()).global_step == 12  # resumed v2's first epoch


def test_a_new_number_is_refused_under_torchrun(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigurationError, match="WORLD_SIZE=2 processes"):
        Maps(tmp_path / "v{version}")
    assert not any(tmp_path.iterdir())


def test_version_must_be_next_or_latest(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="version='newest' is not 'next' or 'latest'"):
        Maps(tmp_path / "v{version}", version="newest")  # type: ignore[arg-type]
