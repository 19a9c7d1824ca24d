"""``trainbus report --watch``: the page follows a training running in another process."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def wait_for(condition: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def running(maps: Path) -> bool:
    try:
        calls = json.loads((maps / "maps.json").read_text())["calls"]
    except (OSError, ValueError, KeyError):
        return False
    return bool(calls) and calls[-1]["status"] == "running"


def test_watch_rewrites_the_page_while_training_and_stops_when_it_ends(tmp_path: Path) -> None:
    maps = tmp_path / "live"
    training = subprocess.Popen(
        [sys.executable, "-m", "tests.report.making", str(maps), "0.15"],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: running(maps), 60, "the training to start")
        watch = subprocess.Popen(
            [sys.executable, "-m", "trainbus.cli", "report", str(maps), "--watch", "0.5"],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        page = maps / "report.html"
        seen_live: list[str] = []

        def live_page_seen() -> bool:
            if watch.poll() is not None:
                return True
            text = page.read_text() if page.exists() else ""
            if 'http-equiv="refresh" content="1"' in text and "status-running" in text:
                seen_live.append(text)
            return bool(seen_live)

        wait_for(live_page_seen, 60, "a page written while training runs")
        assert seen_live, "the watch ended before writing a page during training"
        assert training.poll() is None or not running(maps)
        _, err = watch.communicate(timeout=90)
    finally:
        training.wait(timeout=90)
    assert watch.returncode == 0, err
    assert "watching" in err and "live: completed" in err
    final = page.read_text()
    assert 'http-equiv="refresh"' not in final
    assert "status-completed" in final and "4 of 4" in final
    assert not [p.name for p in maps.iterdir() if p.name.endswith(".tmp")]
    assert training.returncode == 0
