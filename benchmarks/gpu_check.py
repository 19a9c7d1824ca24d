"""GPU check: steps/s of a raw loop versus trainbus with its defaults, and syncs per step.

Run on a machine with a CUDA device: ``python benchmarks/gpu_check.py`` (``--quick`` for a
short smoke run; without a GPU it runs the same comparison on the CPU and says so, so the
script cannot rot). Reports:

- steps/s of a hand-written loop and of trainbus with its default callbacks on a small CNN,
  interleaved over repeats, with the ratio (target: >= 0.99);
- host-device synchronisations per training step, counted with
  ``torch.cuda.set_sync_debug_mode("warn")`` over a run: outside log intervals the target is
  none (the loss is read once per ``log_every_n_batches`` batches);
- NVML readings through the MonitorCallback (memory used, utilisation), and the time one
  NVML reading takes;
- one data-parallel training of ``examples/data_parallel.py`` under ``torchrun`` with one
  process (nccl on the GPU, gloo on the CPU), with its exit status and summary line, and the
  same with ``--strategy fsdp`` (FSDP2 over every GPU of the machine);
- ``benchmarks/checkpoint_async.py`` on the device: the step time around a training-state
  save, blocking against ``asynchronous=True``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainbus import SupervisedModel, Trainer


def network() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(64 * 16, 10),
    )  # fmt: skip


def batches(device: torch.device, steps: int, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [
        (
            torch.randn(size, 3, 32, 32, generator=generator).to(device),
            torch.randint(0, 10, (size,), generator=generator).to(device),
        )
        for _ in range(steps)
    ]


def raw_loop(model: nn.Module, data: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    loss_function = nn.CrossEntropyLoss()
    for inputs, target in data:
        loss = loss_function(model(inputs), target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def trainbus_loop(
    model: nn.Module,
    data: list[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    log_every: int,
    report: dict[str, Any] | None = None,
) -> None:
    supervised = SupervisedModel(
        model, nn.CrossEntropyLoss(), optimizer=functools.partial(torch.optim.SGD, lr=0.01)
    )
    with tempfile.TemporaryDirectory() as scratch, contextlib.redirect_stderr(io.StringIO()):
        trainer = Trainer(
            Path(scratch) / "maps",
            supervised,
            device=device,
            max_epochs=1,
            plugins=False,
            log_every_n_batches=log_every,
        )
        trainer.train(data)
        if report is not None:
            report.update(json.loads((Path(scratch) / "maps" / "monitor.json").read_text()))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def steps_per_second(run: Any, device: torch.device, data: list[Any]) -> float:
    """Steady steps/s: runs over a third and over all of ``data``; per-run costs cancel."""
    times = []
    for part in (data[: len(data) // 3], data):
        synchronize(device)
        started = time.perf_counter()
        run(part)
        synchronize(device)
        times.append(time.perf_counter() - started)
    return (len(data) - len(data) // 3) / (times[1] - times[0])


def count_syncs(device: torch.device, data: list[Any], log_every: int) -> int:
    """Synchronisations flagged by torch during one trainbus epoch over ``data``."""
    if device.type != "cuda":
        return -1
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            trainbus_loop(network().to(device), data, device, log_every)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message).lower() for w in caught)


def nvml_read_seconds() -> float | None:
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return None
    try:
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        started = time.perf_counter()
        for _ in range(100):
            pynvml.nvmlDeviceGetMemoryInfo(handle)
            pynvml.nvmlDeviceGetUtilizationRates(handle)
        return (time.perf_counter() - started) / 100
    finally:
        pynvml.nvmlShutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--batch", type=int, default=128)
    arguments = parser.parse_args()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    steps = arguments.steps or (8 if arguments.quick else 300)
    repeats = arguments.repeats or (1 if arguments.quick else 5)
    size = arguments.batch if cuda else min(arguments.batch, 16)
    log_every = 50
    name = torch.cuda.get_device_name(device) if cuda else "no CUDA device: CPU run"
    print(f"device {name}; torch {torch.__version__}; python {platform.python_version()}")
    data = batches(device, 3 * steps, size)
    raw_loop(network().to(device), data[:3])  # warm-up: kernels, allocator
    trainbus_loop(network().to(device), data[:3], device, log_every)
    rates: dict[str, list[float]] = {"raw": [], "trainbus-defaults": []}
    for _ in range(repeats):
        rates["raw"].append(
            steps_per_second(lambda part: raw_loop(network().to(device), part), device, data)
        )
        rates["trainbus-defaults"].append(
            steps_per_second(
                lambda part: trainbus_loop(network().to(device), part, device, log_every),
                device,
                data,
            )
        )
    raw_rate = statistics.median(rates["raw"])
    for contender, values in rates.items():
        median = statistics.median(values)
        print(
            f"{contender:<18} {median:9.1f} steps/s  (spread {min(values):.1f}-{max(values):.1f})"
            f"  x raw {median / raw_rate:.3f}"
        )
    syncs = count_syncs(device, data[:steps], log_every)
    if syncs >= 0:
        logs = -(-steps // log_every)
        print(
            f"synchronisations flagged over {steps} steps: {syncs} "
            f"({logs} log intervals; outside them: {max(syncs - logs, 0)})"
        )
    report: dict[str, Any] = {}
    trainbus_loop(network().to(device), data[:steps], device, log_every, report)
    print(f"monitor: gpu {json.dumps(report.get('gpu'))}")
    print(f"monitor: memory {json.dumps(report.get('memory'))}")
    seconds = nvml_read_seconds()
    if seconds is not None:
        print(f"nvml: one memory + utilisation reading {seconds * 1e6:.1f} us")
    torchrun_check("ddp", processes=1)
    torchrun_check("fsdp", processes=max(torch.cuda.device_count(), 1) if cuda else 2)
    asynchronous_check(device, arguments.quick)


def torchrun_check(strategy: str, processes: int) -> None:
    """Train the data-parallel example under torchrun with ``strategy``; print its outcome."""
    example = Path(__file__).resolve().parents[1] / "examples" / "data_parallel.py"
    with tempfile.TemporaryDirectory() as scratch:
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={processes}",
            str(example),
            str(Path(scratch) / "maps"),
            "--epochs",
            "2",
            "--strategy",
            strategy,
        ]
        started = time.perf_counter()
        result = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
        seconds = time.perf_counter() - started
    summary = [line for line in result.stdout.splitlines() if line.startswith("rank ")]
    print(
        f"torchrun ({strategy}, {processes} processes): exit status {result.returncode} in "
        f"{seconds:.1f} s; "
        + (summary[-1] if summary else "no summary line: " + result.stderr[-500:])
    )


def asynchronous_check(device: torch.device, quick: bool) -> None:
    """Run the asynchronous-checkpoint benchmark on ``device``; print its table."""
    script = Path(__file__).with_name("checkpoint_async.py")
    command = [sys.executable, str(script), "--device", device.type]
    command += ["--quick"] if quick else ["--steps", "30", "--every", "10", "--rounds", "1"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    print(f"asynchronous checkpoints ({device.type}): exit status {result.returncode}")
    print(result.stdout.rstrip() if result.returncode == 0 else result.stderr[-1500:])


if __name__ == "__main__":
    sys.exit(main())
