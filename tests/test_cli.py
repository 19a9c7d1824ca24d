"""The ``trainbus`` command: the demo (the main job) and the dispatch plan."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from trainbus.cli import main


def trainbus(*arguments: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "trainbus.cli", *arguments],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


@pytest.fixture(scope="module")
def demo_run(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, subprocess.CompletedProcess[str]]:
    workdir = tmp_path_factory.mktemp("demo")
    return workdir, trainbus("demo", "--maps", "digits", cwd=workdir)


def test_demo_trains_to_at_least_95_percent_and_summarises(
    demo_run: tuple[Path, subprocess.CompletedProcess[str]],
) -> None:
    workdir, result = demo_run
    assert result.returncode == 0, result.stderr
    maps = workdir / "digits"
    with (maps / "metrics.tsv").open() as stream:
        rows = list(csv.DictReader(stream, delimiter="\t"))
    best = max(float(row["accuracy"]) for row in rows)
    assert best >= 0.95
    assert f"trainbus: training summary ({maps})" in result.stdout
    assert f"validation accuracy {best:.2%} (best epoch " in result.stdout
    assert str(maps) in result.stdout
    assert f"trainbus report {maps}" in result.stdout


def test_demo_writes_a_complete_maps(
    demo_run: tuple[Path, subprocess.CompletedProcess[str]],
) -> None:
    workdir, _ = demo_run
    maps = workdir / "digits"
    config = json.loads((maps / "maps.json").read_text())
    assert config["seed"] == 0
    assert config["calls"][-1]["status"] in {"completed", "stopped"}
    assert {entry["event"] for entry in config["plan"]} >= {"epoch_end", "validation_end"}
    for name in ("environment.json", "training_loss.tsv", "monitor.json", "logs/train.jsonl"):
        assert (maps / name).is_file(), name
    assert (maps / "checkpoints" / "best-accuracy" / "model.safetensors").is_file()
    assert (maps / "checkpoints" / "last" / "manifest.json").is_file()


def test_demo_progress_is_plain_lines_when_not_a_terminal(
    demo_run: tuple[Path, subprocess.CompletedProcess[str]],
) -> None:
    _, result = demo_run
    assert "\r" not in result.stderr
    assert "train_loss" in result.stderr
    assert len(result.stderr.splitlines()) < 200


def test_demo_refuses_an_existing_maps(tmp_path: Path) -> None:
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("x")
    result = trainbus("demo", "--maps", "taken", "--epochs", "1", cwd=tmp_path)
    assert result.returncode == 2
    assert "already exists" in result.stderr
    assert "overwrite=True" in result.stderr
    assert (tmp_path / "taken" / "keep.txt").read_text() == "x"


def test_plan_prints_every_event_block_in_dispatch_order(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["plan"]) == 0
    output = capsys.readouterr().out
    assert "epoch_end" in output
    block = output.split("\nepoch_end\n", 1)[1].split("\n\n", 1)[0]
    order = [line.split()[1] for line in block.splitlines()[1:]]
    assert order == [
        "ModelCheckpointCallback.on_epoch_end",
        "TrainingCheckpointCallback.on_epoch_end",
        "MonitorCallback.on_epoch_end",
        "LoggerCallback.on_epoch_end",
    ]


def test_plan_shows_the_loop_settings(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    script = tmp_path / "job.py"
    script.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(Path(__file__).parents[1])!r})\n"
        "from tests.conftest import make_loader, make_model\n"
        "from trainbus import Trainer\n"
        f"trainer = Trainer({str(tmp_path / 'maps')!r}, make_model(), max_steps=500, "
        "limit_val_batches=0.25, val_check_interval=100, validate_last_epoch=False)\n"
        "trainer.train(make_loader())\n"
    )
    assert main(["plan", str(script)]) == 0
    output = capsys.readouterr().out
    settings = output.split("\nloop settings\n", 1)[1].split("\n\n", 1)[0].splitlines()
    shown = dict(line.split(maxsplit=1) for line in settings)
    assert shown["max_steps"] == "500"
    assert shown["limit_val_batches"] == "0.25"
    assert shown["val_check_interval"] == "100"
    assert shown["validate_last_epoch"] == "False"
    assert shown["max_time"] == "None"
    assert not (tmp_path / "maps").exists()


def test_plan_json_for_one_event(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--event", "validation_end", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [row["id"] for row in rows] == [
        "EarlyStoppingCallback.on_validation_end",
        "ModelCheckpointCallback.on_validation_end",
        "MonitorCallback.on_validation_end",
    ]
    assert [row["priority"] for row in rows] == [0, -500, -900]


def test_plan_of_an_unknown_event_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--event", "epoch_ends"]) == 2
    assert "did you mean 'epoch_end'" in capsys.readouterr().err.lower()


def closed_early(*arguments: str, cwd: Path, read_first_line: bool) -> tuple[int, str, str]:
    """Run the command with its output closed early, as ``trainbus ... | head -1`` does.

    The reader goes away before the command writes (or after its first line): its next
    write fails for certain, whatever the size of the output.
    """
    process = subprocess.Popen(
        [sys.executable, "-m", "trainbus.cli", *arguments],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None and process.stderr is not None
    first = process.stdout.readline() if read_first_line else ""
    process.stdout.close()
    try:
        errors = process.stderr.read()
        status = process.wait(timeout=300)
    finally:
        process.kill()
        process.wait()
    return status, first, errors


@pytest.mark.parametrize(
    "arguments",
    [("plan",), ("plan", "--json"), ("plugins",)],
    ids=["plan", "plan-json", "plugins"],
)
def test_a_command_whose_reader_goes_away_exits_quietly(
    tmp_path: Path, arguments: tuple[str, ...]
) -> None:
    status, _, errors = closed_early(*arguments, cwd=tmp_path, read_first_line=False)
    assert "Traceback" not in errors
    assert "BrokenPipeError" not in errors
    assert "Exception ignored" not in errors
    assert status == 141  # 128 + SIGPIPE, as for `yes | head`


def test_the_demo_piped_into_head_trains_then_exits_quietly(tmp_path: Path) -> None:
    status, first, errors = closed_early(
        "demo", "--maps", "digits", "--epochs", "1", cwd=tmp_path, read_first_line=True
    )
    assert first.startswith("trainbus demo: training a small CNN")
    assert "Traceback" not in errors
    assert "BrokenPipeError" not in errors
    assert status == 141
    # The summary is what failed to print: the training before it was complete.
    config = json.loads((tmp_path / "digits" / "maps.json").read_text())
    assert config["calls"][-1]["status"] == "completed"
