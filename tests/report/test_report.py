"""``trainbus report``: one self-contained HTML page per run, or for several runs together."""

from __future__ import annotations

import html
import os
import re
import shutil
import sys
from collections.abc import Mapping
from pathlib import Path

import pytest

from tests.report.making import HOSTILE_METRIC, HOSTILE_REASON, data_paths, figure, trainbus
from trainbus.cli import main

CURVES = ("training-loss", "validation", "learning-rates", "throughput", "time-split")


def report(capsys: pytest.CaptureFixture[str], *arguments: str) -> str:
    assert main(["report", *arguments]) == 0
    return capsys.readouterr().err


def test_one_run_has_its_outcome_curves_and_tables_in_order(
    trained: Mapping[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    maps = trained["early"]
    message = report(capsys, str(maps))
    page = (maps / "report.html").read_text()
    assert f"wrote {maps / 'report.html'}" in message
    assert "stopped: loss did not improve for 1 validations" in html.unescape(page)
    assert "EarlyStoppingCallback.on_validation_end" in page
    assert "best</th><td>loss 0.2919 at epoch 3" in page
    assert html.escape(str(maps / "checkpoints" / "last")) in page
    for key in CURVES:
        assert data_paths(figure(page, key)) > 0, key
    assert "best (epoch 3)" in figure(page, "validation")
    lrs = figure(page, "learning-rates")
    assert ">group 0<" in lrs
    subscribers = figure(page, "subscribers")
    assert data_paths(subscribers) > 0 and "Callback.on_" in subscribers
    order = [
        page.index(marker)
        for marker in (
            'id="summary"',
            'id="fig-training-loss"',
            'id="fig-validation"',
            'id="fig-learning-rates"',
            'id="fig-throughput"',
            'id="fig-time-split"',
            'id="fig-subscribers"',
            'id="fig-gpu"',
            'id="plan"',
            'id="settings"',
            'id="environment"',
        )
    ]
    assert order == sorted(order)
    assert "ModelCheckpointCallback.on_validation_end" in page  # the dispatch plan
    assert "trainer.max_epochs" in page and "torch" in page
    assert 'http-equiv="refresh"' not in page
    assert re.search(r"<(script|link|iframe)\b", page) is None
    addresses = set(re.findall(r"https?://[^\"]+", page))
    assert addresses == {"http://www.w3.org/1999/xlink", "http://www.w3.org/2000/svg"}


def test_a_run_that_crashed_in_its_first_epoch(
    trained: Mapping[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    maps = trained["crashed"]
    report(capsys, str(maps))
    page = (maps / "report.html").read_text()
    assert "failed: RuntimeError: boom in the first epoch" in page
    assert "No validation metrics recorded" in page
    assert "No Monitor records" in page
    assert data_paths(figure(page, "training-loss")) == 0  # one logged loss: a single point
    assert "<svg" in figure(page, "training-loss")


def test_a_resumed_run_marks_where_it_resumed(
    trained: Mapping[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    maps = trained["resumed"]
    report(capsys, str(maps))
    page = (maps / "report.html").read_text()
    assert "from state-0000000012-epoch-end" in page
    for key in ("training-loss", "validation"):
        assert ">resumed<" in figure(page, key), key
    assert "4 of 4" in page


def test_a_run_without_monitor_or_validation(
    trained: Mapping[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    maps = trained["unmonitored"]
    report(capsys, str(maps))
    page = (maps / "report.html").read_text()
    assert "completed" in page
    assert "No Monitor records" in figure(page, "throughput")
    assert "No validation metrics recorded" in figure(page, "validation")
    assert data_paths(figure(page, "training-loss")) > 0


def test_several_runs_overlay_their_curves_and_show_the_settings_that_differ(
    trained: Mapping[str, Path], tmp_path: Path
) -> None:
    names = ("early", "resumed", "unmonitored")
    result = trainbus("report", *(str(trained[n]) for n in names), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    page = (tmp_path / "report.html").read_text()
    for name in names:
        assert f">{name}<" in figure(page, "training-loss"), name
    assert ">early<" in figure(page, "validation") and ">resumed<" in figure(page, "validation")
    differing = re.search(r'<table id="settings-diff">.*?</table>', page, re.DOTALL)
    assert differing is not None
    assert "trainer.max_epochs" in differing.group(0)
    assert "callback.EarlyStoppingCallback.min_delta" in differing.group(0)
    assert "trainer.device" not in differing.group(0)  # the same in every run
    assert 'id="fig-subscribers"' not in page


def test_extra_columns_and_a_half_written_line_are_tolerated(
    trained: Mapping[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    maps = shutil.copytree(trained["early"], tmp_path / "copy")
    with (maps / "training_loss.tsv").open("a") as stream:
        stream.write("3\t1\t20\t20\t16")  # a row still being written: no newline yet
    with (maps / "metrics.tsv").open("a") as stream:
        stream.write("validation\t3\t")
    report(capsys, str(maps), "-o", str(tmp_path / "page.html"))
    page = (tmp_path / "page.html").read_text()
    assert data_paths(figure(page, "training-loss")) > 0
    assert "best</th><td>loss 0.2919 at epoch 3" in page


def test_hostile_names_are_text_not_markup(
    trained: Mapping[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    maps = trained["hostile"]
    report(capsys, str(maps))
    page = (maps / "report.html").read_text()
    assert re.search(r"<script", page, re.IGNORECASE) is None
    assert "<img" not in page
    assert html.escape(HOSTILE_REASON) in page
    assert html.escape(HOSTILE_METRIC, quote=False) in figure(page, "validation")
    assert "<!--" not in page  # no comment a name could close early
    assert 'http-equiv="Content-Security-Policy"' in page


def test_a_directory_that_is_not_a_maps_is_one_line_and_status_2(tmp_path: Path) -> None:
    (tmp_path / "notes").mkdir()
    result = trainbus("report", "notes", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1, result.stderr
    assert "is not a trainbus MAPS: it holds no maps.json" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "notes" / "report.html").exists()


def test_missing_matplotlib_names_the_extra(
    trained: Mapping[str, Path],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what an absent package looks like
    assert main(["report", str(trained["early"]), "-o", str(tmp_path / "r.html")]) == 2
    error = capsys.readouterr().err
    assert "pip install 'trainbus[report]'" in error
    assert not (tmp_path / "r.html").exists()


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o077, 0o600)])
def test_the_page_gets_the_mode_the_umask_gives(
    trained: Mapping[str, Path],
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    umask: int,
    mode: int,
) -> None:
    target = tmp_path / "page.html"
    previous = os.umask(umask)
    try:
        report(capsys, str(trained["early"]), "-o", str(target))
    finally:
        os.umask(previous)
    assert target.stat().st_mode & 0o777 == mode
