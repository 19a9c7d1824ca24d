"""MonitorCallback: wall time per phase, throughput and memory, written to ``monitor.json``."""

from __future__ import annotations

import resource
import sys
import time
from typing import Any

import torch

from trainbus.engine.maps import Maps
from trainbus.engine.state import TrainerState
from trainbus.events.callback import Callback
from trainbus.handlers import priorities

MONITOR_FILE = "monitor.json"


def peak_rss_bytes() -> int:
    """Peak resident memory of this process (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


class MonitorCallback(Callback):
    """Record computational statistics of training: time, throughput and memory per epoch.

    Per epoch: training and validation wall time, samples per second, peak process memory,
    and peak CUDA memory when training on a GPU. Written to ``monitor.json`` at the end of
    training. Timing uses host clocks only: no host-device sync.
    """

    priorities = priorities.framing(priorities.MONITOR_FIRST, priorities.MONITOR_LAST)
    rank_zero_only = True

    def __init__(self) -> None:
        self.epochs: list[dict[str, Any]] = []
        self._train_started = 0.0
        self._epoch_started = 0.0
        self._validation_started = 0.0
        self._validation_seconds = 0.0
        self._samples_at_epoch_start = 0

    def on_train_start(self, *, model: torch.nn.Module) -> None:
        self._train_started = time.perf_counter()
        if _on_cuda(model):
            torch.cuda.reset_peak_memory_stats()

    def on_epoch_start(self, *, state: TrainerState) -> None:
        self._epoch_started = time.perf_counter()
        self._validation_seconds = 0.0
        self._samples_at_epoch_start = state.samples_seen

    def on_validation_start(self) -> None:
        self._validation_started = time.perf_counter()

    def on_validation_end(self) -> None:
        self._validation_seconds += time.perf_counter() - self._validation_started

    def on_epoch_end(self, *, state: TrainerState, model: torch.nn.Module) -> None:
        total = time.perf_counter() - self._epoch_started
        training = total - self._validation_seconds
        samples = state.samples_seen - self._samples_at_epoch_start
        record: dict[str, Any] = {
            "epoch": state.current_epoch,
            "train_seconds": round(training, 6),
            "validation_seconds": round(self._validation_seconds, 6),
            "samples": samples,
            "samples_per_second": round(samples / training, 3) if training > 0 else None,
            "peak_rss_bytes": peak_rss_bytes(),
        }
        if _on_cuda(model):
            record["peak_cuda_allocated_bytes"] = torch.cuda.max_memory_allocated()
        self.epochs.append(record)

    def on_train_end(self, *, maps: Maps, state: TrainerState) -> None:
        seconds = time.perf_counter() - self._train_started
        train_seconds = sum(e["train_seconds"] for e in self.epochs)
        samples = sum(e["samples"] for e in self.epochs)
        maps.write_json(
            {
                "total_seconds": round(seconds, 6),
                "train_seconds": round(train_seconds, 6),
                "validation_seconds": round(sum(e["validation_seconds"] for e in self.epochs), 6),
                "samples": samples,
                "samples_per_second": round(samples / train_seconds, 3) if train_seconds else None,
                "epochs": self.epochs,
            },
            MONITOR_FILE,
        )

    def config(self) -> dict[str, Any]:
        return {}


def _on_cuda(model: torch.nn.Module) -> bool:
    parameter = next(model.parameters(), None)
    return parameter is not None and parameter.is_cuda
