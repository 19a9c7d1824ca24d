"""The figures of ``monitor.json``: totals over the epochs, memory, GPU and subscriber rows.

:class:`~trainbus.handlers.monitor.MonitorCallback` measures; the functions here fold what it
measured into the report it writes (time in parts that add up to the total: training,
validation, checkpoints and the rest).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from trainbus.handlers.monitor_records import GpuStats, Run, SubscriberTotals, process_memory


def time_and_memory(
    epochs: Sequence[Mapping[str, Any]],
    *,
    total: float,
    outside_checkpoints: int,
    outside_checkpoint_seconds: float,
) -> dict[str, Any]:
    """Time per phase, saves, throughput and memory over ``epochs`` and ``total`` seconds.

    ``outside_checkpoints`` are the saves of no epoch (at ``train_start``, ``train_end``).
    """

    def summed(key: str) -> float:
        return round(sum(float(entry[key]) for entry in epochs), 6)

    train_seconds = summed("train_seconds")
    validation_seconds = summed("validation_seconds")
    checkpoint_seconds = round(summed("checkpoint_seconds") + outside_checkpoint_seconds, 6)
    checkpoints = outside_checkpoints + sum(int(entry.get("checkpoints", 0)) for entry in epochs)
    samples = sum(int(entry["samples"]) for entry in epochs)
    rss, peak_rss = process_memory()
    peak_rss = max([peak_rss, *(int(e["peak_rss_bytes"]) for e in epochs)])
    memory: dict[str, Any] = {"rss_bytes": rss, "peak_rss_bytes": peak_rss}
    cuda_peaks = [
        int(e["peak_cuda_allocated_bytes"]) for e in epochs if "peak_cuda_allocated_bytes" in e
    ]
    if cuda_peaks:
        memory["peak_cuda_allocated_bytes"] = max(cuda_peaks)
    parts = train_seconds + validation_seconds + checkpoint_seconds
    return {
        "total_seconds": round(total, 6),
        "train_seconds": train_seconds,
        "validation_seconds": validation_seconds,
        "data_seconds": summed("data_seconds"),
        "compute_seconds": summed("compute_seconds"),
        "checkpoint_seconds": checkpoint_seconds,
        "checkpoints": checkpoints,
        "other_seconds": round(max(total - parts, 0.0), 6),
        "batches": sum(int(entry["batches"]) for entry in epochs),
        "samples": samples,
        "samples_per_second": round(samples / train_seconds, 3) if train_seconds else None,
        "memory": memory,
    }


def gpu_section(run: Run | None, epochs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The NVML readings of every epoch folded together, or why there are none."""
    if run is None:
        return {"available": False, "reason": "training has not started"}
    reader = run.reader
    if reader is None or run.gpu_reason is not None:
        return {"available": False, "reason": run.gpu_reason or "NVML was not opened"}
    stats = GpuStats()
    for entry in epochs:
        gpu = entry.get("gpu")
        if isinstance(gpu, Mapping):
            stats.merge(gpu)
    return {"available": True, "device": reader.device, "name": reader.name, **stats.as_dict()}


def subscriber_rows(totals: Mapping[tuple[str, str], SubscriberTotals]) -> list[dict[str, Any]]:
    """One row per (event, subscriber) that ran: calls, timed calls, mean and estimated total."""
    rows: list[dict[str, Any]] = []
    for (event, subscriber), measured in totals.items():
        if measured.calls <= 0:
            continue
        mean = measured.seconds / measured.timed_calls if measured.timed_calls else None
        rows.append(
            {
                "id": subscriber,
                "event": event,
                "calls": measured.calls,
                "timed_calls": measured.timed_calls,
                "mean_seconds": None if mean is None else round(mean, 9),
                "estimated_total_seconds": (
                    None if mean is None else round(mean * measured.calls, 6)
                ),
            }
        )
    return rows
