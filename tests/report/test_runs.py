"""``trainbus runs``: one line per MAPS under a folder, sortable, as text or JSON."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import pytest

from tests.report.making import HOSTILE_REASON, trainbus
from trainbus.cli import main


def listing(capsys: pytest.CaptureFixture[str], *arguments: str) -> tuple[int, str, str]:
    status = main(["runs", *arguments])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_one_line_per_run_with_status_epochs_and_best(
    trained: Mapping[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    root = trained["early"].parent
    status, out, _ = listing(capsys, str(root))
    assert status == 0
    lines = out.splitlines()
    assert lines[0].split() == ["run", "epochs", "best", "started", "duration", "status"]
    by_name = {line.split()[0]: line for line in lines[1:]}
    assert set(by_name) >= {"crashed", "early", "resumed", "unmonitored"}
    assert len(lines) == 1 + 5
    assert "failed: RuntimeError: boom in the first epoch" in by_name["crashed"]
    assert "stopped: loss did not improve" in by_name["early"]
    assert " 3/20 " in by_name["early"] and "loss 0.2919 (epoch 3)" in by_name["early"]
    assert " 4/4 " in by_name["resumed"] and by_name["resumed"].endswith("completed")
    assert by_name["unmonitored"].endswith("completed")


def test_sorted_best_first_by_a_metric_in_its_direction(
    trained: Mapping[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    root = trained["early"].parent
    _, out, _ = listing(capsys, str(root), "--sort", "loss", "--json")
    rows = json.loads(out)
    with_loss = [row for row in rows if row["best"] is not None]
    values = [row["best"] for row in with_loss]
    assert values == sorted(values), "loss: lower is better, so ascending"
    assert rows[0]["name"] == "early"
    assert {row["name"] for row in rows[len(with_loss) :]} == {"crashed", "unmonitored"}
    hostile = next(row for row in rows if row["status"] == "stopped" and row["name"] != "early")
    assert hostile["status_line"] == f"stopped: {HOSTILE_REASON}"
    assert set(rows[0]) >= {"name", "status", "epochs", "metric", "best", "started", "seconds"}


def test_an_unknown_sort_metric_is_refused_naming_the_known_ones(
    trained: Mapping[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    status, _, err = listing(capsys, str(trained["early"].parent), "--sort", "acuracy")
    assert status == 2
    assert "'acuracy'" in err and "'loss'" in err


def test_symbolic_links_are_not_followed(trained: Mapping[str, Path], tmp_path: Path) -> None:
    os.symlink(trained["early"], tmp_path / "link-to-early")
    os.symlink(trained["early"].parent, tmp_path / "link-to-all")
    (tmp_path / "nested" / "deeper").mkdir(parents=True)
    os.symlink(trained["resumed"], tmp_path / "nested" / "deeper" / "r")
    result = trainbus("runs", str(tmp_path), "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == []
    assert result.stdout.strip() == "[]"


def test_a_missing_directory_is_one_line_and_status_2(tmp_path: Path) -> None:
    result = trainbus("runs", "absent", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "not a directory" in result.stderr
