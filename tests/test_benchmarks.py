"""Each benchmark script runs once in quick mode so it cannot rot (no timing is asserted)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.mark.parametrize("script", sorted(p.name for p in BENCHMARKS.glob("*.py")))
def test_benchmark_runs_in_quick_mode(script: str) -> None:
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), "--quick"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip(), "a benchmark prints its figures"


def test_dispatch_benchmark_reports_every_subscriber_count() -> None:
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "dispatch.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    rows = [line.split() for line in result.stdout.splitlines()[2:]]
    assert [row[0] for row in rows] == ["0", "1", "10", "100"]
    assert all(float(row[1]) > 0 for row in rows)
