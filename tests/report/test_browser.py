"""The report in a real browser: headless Chromium opens it from disk, offline."""

from __future__ import annotations

import html
import re
from collections.abc import Mapping
from pathlib import Path

import pytest

from tests.browsing import chromium, console, needs_chromium
from tests.report.making import HOSTILE_METRIC, HOSTILE_RUN, data_paths, figure
from trainbus.cli import main

pytestmark = needs_chromium


def title(dom: str) -> str:
    found = re.search(r"<title>(.*?)</title>", dom, re.DOTALL)
    return html.unescape(found.group(1)) if found else ""


def test_the_checks_see_a_script_that_runs(tmp_path: Path) -> None:
    control = tmp_path / "control.html"
    control.write_text(
        "<!DOCTYPE html><html><head><title>before</title></head><body>"
        "<script>console.error('seen'); document.title = 'pwned'</script></body></html>"
    )
    result = chromium(control, "--dump-dom")
    assert result.returncode == 0, result.stderr
    assert title(result.stdout) == "pwned"
    assert any('"seen"' in line for line in console(result))


def test_several_runs_render_with_every_figure_and_nothing_executes(
    trained: Mapping[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    names = ("early", "resumed", "crashed", "hostile")
    page = tmp_path / "report.html"
    assert main(["report", *(str(trained[n]) for n in names), "-o", str(page)]) == 0
    capsys.readouterr()
    result = chromium(page, "--dump-dom")
    assert result.returncode == 0, result.stderr
    assert console(result) == []
    dom = result.stdout
    assert title(dom) == "trainbus: 4 runs"
    assert "<script" not in dom and "<img" not in dom
    for key in ("training-loss", "validation", "learning-rates", "throughput", "time-split"):
        assert data_paths(figure(dom, key)) > 0, key
    legend = figure(dom, "training-loss")
    for name in ("early", "resumed", "crashed", HOSTILE_RUN):
        assert f">{html.escape(name, quote=False)}<" in legend, name
    assert html.escape(HOSTILE_METRIC, quote=False) in figure(dom, "validation")

    shot = tmp_path / "report.png"
    result = chromium(page, f"--screenshot={shot}", "--window-size=1100,1800")
    assert result.returncode == 0, result.stderr
    assert console(result) == []
    assert shot.stat().st_size > 20_000  # a blank page is a few kilobytes


def test_one_hostile_run_renders_and_nothing_executes(
    trained: Mapping[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    page = tmp_path / "hostile.html"
    assert main(["report", str(trained["hostile"]), "-o", str(page)]) == 0
    capsys.readouterr()
    result = chromium(page, "--dump-dom")
    assert result.returncode == 0, result.stderr
    assert console(result) == []
    dom = result.stdout
    assert title(dom) == f"trainbus: {HOSTILE_RUN}"
    assert "<script" not in dom and "<img" not in dom
    for key in ("training-loss", "validation", "subscribers"):
        assert data_paths(figure(dom, key)) > 0, key
