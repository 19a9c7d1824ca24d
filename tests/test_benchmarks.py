"""Each benchmark script runs once in quick mode so it cannot rot (no timing is asserted)."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def run_quick(script: str, *arguments: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a benchmark script in ``--quick`` mode, as a user would."""
    return subprocess.run(
        [sys.executable, str(BENCHMARKS / script), "--quick", *arguments],
        capture_output=True,
        text=True,
        timeout=300,
        check=check,
    )


@pytest.mark.parametrize("script", sorted(p.name for p in BENCHMARKS.glob("*.py")))
def test_benchmark_runs_in_quick_mode(script: str) -> None:
    result = run_quick(script, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip(), "a benchmark prints its figures"


def test_dispatch_benchmark_reports_every_subscriber_count() -> None:
    result = run_quick("dispatch.py")
    lines = result.stdout.splitlines()
    rows = [line.split() for line in lines[2:6]]
    assert [row[0] for row in rows] == ["0", "1", "10", "100"]
    assert all(float(row[1]) > 0 for row in rows)
    assert lines[6].startswith("snapshot: ")
    assert [line.split(",")[1].split()[0] for line in lines[7:9]] == ["every=", "when="]


def test_compare_reports_every_contender_or_says_why_it_is_skipped() -> None:
    result = run_quick("compare.py", "--subscribers", "3")
    lines = result.stdout.splitlines()
    assert any("lockstep: 60 steps in turns of 20" in line for line in lines), result.stdout
    rows = {line.split()[0]: line.split() for line in lines if line[:1].isalpha()}
    for name in ("raw", "raw+3", "design+3", "trainbus", "trainbus+3", "trainbus-defaults"):
        assert name in rows, result.stdout
        assert math.isfinite(float(rows[name][1]))  # a smoke run: no timing is asserted
        low, high = (float(q) for q in rows[name][3].split("-"))
        assert low <= float(rows[name][2]) <= high  # the median lies between the quartiles
    assert float(rows["raw"][2]) == 1.0 and float(rows["raw"][4]) == 0.0
    for peer, contenders in (("ignite", ("ignite+3", "ignite")), ("lightning", ("lightning+3",))):
        skipped = any(line.startswith(f"{peer}: not installed") for line in lines)
        assert skipped or all(name in rows for name in contenders), result.stdout


def test_compare_keeps_the_whole_fit_mode() -> None:
    result = run_quick("compare.py", "--subscribers", "2", "--mode", "whole")
    rows = {
        line.split()[0]: line.split() for line in result.stdout.splitlines() if line[:1].isalpha()
    }
    assert float(rows["raw"][3]) == 1.0
    assert math.isfinite(float(rows["trainbus+2"][5]))  # the fixed cost column


def test_gpu_check_trains_under_torchrun_with_a_process_group() -> None:
    result = run_quick("gpu_check.py")
    lines = result.stdout.splitlines()
    # Without CUDA: gloo on the CPU (the device machine prints nccl and cuda:0).
    ddp = next(line for line in lines if line.startswith("torchrun (ddp, 1 processes)"))
    assert "exit status 0 in " in ddp, result.stdout
    assert "rank 0 of 1: " in ddp and "(process group: gloo, device: cpu, strategy: ddp)" in ddp
    fsdp = next(line for line in lines if line.startswith("torchrun (fsdp, 2 processes)"))
    assert "exit status 0 in " in fsdp and "rank 0 of 2: " in fsdp, result.stdout
    assert "strategy: fsdp)" in fsdp
    # The asynchronous-checkpoint benchmark ran on the device and printed its table.
    assert "asynchronous checkpoints (cpu): exit status 0" in result.stdout
    assert any(line.startswith("asynchronous ") and "." in line for line in lines[-3:])
