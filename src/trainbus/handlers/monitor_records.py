"""What MonitorCallback keeps while it measures: epoch accumulators, GPU and subscriber totals.

An epoch's accumulators are saved as durations (clock readings of one process mean nothing in
the next), so they survive a resume. Also here: the process's resident memory (now and its
peak), the per-subscriber counts and times read off the bus, and the CUDA device of a model.
"""

from __future__ import annotations

import os
import resource
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from trainbus.events.bus import EventBus
from trainbus.handlers.gpu import GpuReading, NvmlReader


def peak_rss_bytes() -> int:
    """Peak resident memory of this process (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def current_rss_bytes() -> int | None:
    """Resident memory of this process now, from ``/proc/self/statm``; None where absent."""
    try:
        with open("/proc/self/statm", encoding="ascii") as statm:
            resident_pages = int(statm.read().split()[1])
        return resident_pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


@dataclass(slots=True)
class GpuStats:
    """NVML readings folded into peaks and sums (one per epoch)."""

    readings: int = 0
    peak_memory_used_bytes: int = 0
    memory_total_bytes: int = 0
    utilization_readings: int = 0
    utilization_sum: float = 0.0
    max_utilization_percent: int | None = None

    def add(self, reading: GpuReading) -> None:
        self.readings += 1
        self.peak_memory_used_bytes = max(self.peak_memory_used_bytes, reading.memory_used_bytes)
        self.memory_total_bytes = reading.memory_total_bytes
        if reading.utilization_percent is not None:
            self.utilization_readings += 1
            self.utilization_sum += reading.utilization_percent
            self.max_utilization_percent = max(
                self.max_utilization_percent or 0, reading.utilization_percent
            )

    def merge(self, summary: Mapping[str, Any]) -> None:
        """Fold in an epoch's :meth:`as_dict` (means weighted by their readings)."""
        self.readings += int(summary["readings"])
        self.peak_memory_used_bytes = max(
            self.peak_memory_used_bytes, int(summary["peak_memory_used_bytes"])
        )
        self.memory_total_bytes = int(summary["memory_total_bytes"]) or self.memory_total_bytes
        mean = summary["mean_utilization_percent"]
        if mean is not None:
            count = int(summary["utilization_readings"])
            self.utilization_readings += count
            self.utilization_sum += float(mean) * count
            self.max_utilization_percent = max(
                self.max_utilization_percent or 0, int(summary["max_utilization_percent"])
            )

    @classmethod
    def restored(cls, saved: Mapping[str, Any]) -> GpuStats:
        maximum = saved["max_utilization_percent"]
        return cls(
            readings=int(saved["readings"]),
            peak_memory_used_bytes=int(saved["peak_memory_used_bytes"]),
            memory_total_bytes=int(saved["memory_total_bytes"]),
            utilization_readings=int(saved["utilization_readings"]),
            utilization_sum=float(saved["utilization_sum"]),
            max_utilization_percent=None if maximum is None else int(maximum),
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "readings": self.readings,
            "utilization_readings": self.utilization_readings,
            "peak_memory_used_bytes": self.peak_memory_used_bytes,
            "memory_total_bytes": self.memory_total_bytes,
            "mean_utilization_percent": (
                self.utilization_sum / self.utilization_readings
                if self.utilization_readings
                else None
            ),
            "max_utilization_percent": self.max_utilization_percent,
        }


@dataclass(slots=True)
class Epoch:
    """Accumulators of the running epoch; durations only, so they survive a new process."""

    epoch: int
    samples_at_start: int
    started: float
    carried_seconds: float = 0.0
    validation_seconds: float = 0.0
    data_seconds: float = 0.0
    compute_seconds: float = 0.0
    checkpoint_seconds: float = 0.0
    checkpoints: int = 0
    batches: int = 0
    resumed: bool = False
    gpu: GpuStats | None = None
    validation_started: float | None = None

    def elapsed(self, now: float) -> float:
        return self.carried_seconds + now - self.started

    def saved(self, now: float) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "samples_at_start": self.samples_at_start,
            "carried_seconds": self.elapsed(now),
            "validation_seconds": self.validation_seconds,
            "data_seconds": self.data_seconds,
            "compute_seconds": self.compute_seconds,
            "checkpoint_seconds": self.checkpoint_seconds,
            "checkpoints": self.checkpoints,
            "batches": self.batches,
            "gpu": None if self.gpu is None else asdict(self.gpu),
        }


@dataclass(slots=True)
class SubscriberTotals:
    calls: int = 0
    timed_calls: int = 0
    seconds: float = 0.0


@dataclass(slots=True)
class Run:
    """What one ``train()`` call in this process measures."""

    started: float
    bus: EventBus
    baseline: dict[tuple[str, str], SubscriberTotals] = field(default_factory=dict)
    cuda_device: torch.device | None = None
    reader: NvmlReader | None = None
    gpu_reason: str | None = None
    ended: float | None = None
    final_totals: dict[tuple[str, str], SubscriberTotals] | None = None

    def seconds(self, now: float) -> float:
        return (self.ended if self.ended is not None else now) - self.started


def process_memory() -> tuple[int | None, int]:
    """Resident memory now and the peak; ru_maxrss is updated lazily, so it may lag behind."""
    rss = current_rss_bytes()
    return rss, max(peak_rss_bytes(), rss or 0)


def bus_totals(
    bus: EventBus, skip_event: str | None = None
) -> dict[tuple[str, str], SubscriberTotals]:
    """Calls, timed calls and seconds per (event, subscriber id), as the bus counts them now."""
    return {
        (subscription.event, subscription.id): SubscriberTotals(
            subscription.calls, subscription.timed_calls, subscription.seconds
        )
        for subscription in bus.subscriptions()
        if subscription.event != skip_event
    }


def release(run: Run) -> None:
    """Stop timing the bus and close NVML: what a run holds until it ends."""
    run.bus.measure_time(0)
    if run.reader is not None:
        run.reader.close()


def cuda_device(model: torch.nn.Module) -> torch.device | None:
    """The CUDA device of the model's parameters; None when they are not on CUDA."""
    parameter = next(model.parameters(), None)
    if parameter is None or not parameter.is_cuda:
        return None
    return parameter.device
