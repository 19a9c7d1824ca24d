"""MonitorCallback: where the time of a training run goes, and what it costs in memory.

Written to ``monitor.json`` at the end of training (and, optionally, printed as a table)::

    {
      "total_seconds": ..., "train_seconds": ..., "validation_seconds": ...,
      "data_seconds": ..., "compute_seconds": ..., "checkpoint_seconds": ...,
      "checkpoints": ..., "other_seconds": ..., "batches": ..., "samples": ...,
      "samples_per_second": ..., "resumes": 0,
      "memory": {"rss_bytes": ..., "peak_rss_bytes": ..., "peak_cuda_allocated_bytes": ...},
      "gpu": {"available": false, "reason": "..."} or {"available": true, ...},
      "subscribers": {"sample_every": 10, "rows": [{"id", "event", "calls", ...}, ...]},
      "epochs": [{"epoch": 0, "train_seconds": ..., ...}, ...]
    }
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Mapping
from typing import IO, Any

import torch

from trainbus.engine.maps import Maps
from trainbus.engine.state import TrainerState
from trainbus.errors import ConfigurationError, ConfigurationTypeError
from trainbus.events.bus import EventBus
from trainbus.events.callback import Callback
from trainbus.handlers import priorities
from trainbus.handlers.gpu import NvmlReader, nvml_device, visible_devices
from trainbus.handlers.monitor_records import (
    Epoch,
    GpuStats,
    Run,
    SubscriberTotals,
    bus_totals,
    cuda_device,
    current_rss_bytes,
    peak_rss_bytes,
    process_memory,
    release,
)
from trainbus.handlers.monitor_report import gpu_section, subscriber_rows, time_and_memory
from trainbus.handlers.monitor_table import TOP_SUBSCRIBERS, format_report

__all__ = [
    "MONITOR_FILE",
    "TOP_SUBSCRIBERS",
    "MonitorCallback",
    "current_rss_bytes",
    "format_report",
    "peak_rss_bytes",
]

MONITOR_FILE = "monitor.json"

_CPU_MODEL = "the model's parameters are not on a CUDA device"
_GPU_OFF = "GPU statistics are switched off (gpu=False)"


class MonitorCallback(Callback):
    """Record where training time goes, its throughput, memory and the cost of each subscriber.

    Measured with host clocks (``time.perf_counter``), never with a host-device sync:

    - wall time per epoch and in total, in parts that add up: training, validation,
      checkpoints and the rest (setup, the handlers of ``train_start`` and ``train_end``);
    - checkpoints: every save (weights and training states, between batches, at epoch ends,
      at ``train_start`` and ``train_end``) is counted, and timed from the end of the handlers
      that asked for it (the Monitor runs last but the Logger at end events) to its
      ``checkpoint`` event. An epoch's record holds the saves of its batches and of its end;
      the training state written at an epoch's end holds the record before its own write;
    - inside training, *waiting for data* (from the previous ``batch_end``, or from
      ``epoch_start``, to ``batch_start``) and *compute* (``batch_start`` to ``batch_end``,
      every handler of the batch included); saves between batches are neither. Compute
      time is host-side: on a GPU the host queues kernels and runs ahead of them, and the
      device catches up at sync points (the loss read at log intervals, an ``.item()``, a
      copy to the host), so device work is counted where the host waits for it. Summed over
      an epoch the split is meaningful; the time of a single batch is not;
    - throughput (training samples per second of training time, from ``state.samples_seen``);
    - process memory: resident memory now (``/proc/self/statm``, None where it does not
      exist) and the peak (``ru_maxrss``); on CUDA also the peak of torch's allocator per
      epoch;
    - GPU memory used and utilisation through NVML (``nvidia-ml-py``), read at log intervals
      (``loss_logged``) and at epoch ends only;
    - per subscriber of every event: calls during ``train()``, mean time per call (the bus
      times one dispatch in ``time_subscribers`` of each event, so an event that fired fewer
      times has no mean) and the estimated total (mean times calls).

    Arguments:

    - ``time_subscribers``: time one dispatch in this many per event; ``0`` or ``None``
      switches subscriber timing off (calls are still counted).
    - ``gpu``: ``None`` reads NVML when the model's parameters are on CUDA, ``True`` always
      (one notice line on ``stream`` when NVML or the GPU is absent), ``False`` never.
    - ``table``: print a summary table to ``stream`` at the end of training.
    - ``stream``: where the table and the notice go (default ``sys.stderr``, looked up when
      printing).

    Everything lands in ``monitor.json`` at ``teardown`` after ``train_end``, once the last
    saves are written (a run that raises writes none).
    The per-epoch records, the running epoch's accumulators and the subscriber totals are
    part of the training state, so after a resume the file covers the whole training, and
    ``resumes`` counts the restarts.
    """

    priorities = priorities.framing(priorities.MONITOR_FIRST, priorities.MONITOR_LAST)
    rank_zero_only = True

    def __init__(
        self,
        *,
        time_subscribers: int | None = 10,
        gpu: bool | None = None,
        table: bool = True,
        stream: IO[str] | None = None,
    ) -> None:
        if time_subscribers is not None and type(time_subscribers) is not int:
            raise ConfigurationTypeError(
                f"MonitorCallback: time_subscribers={time_subscribers!r} is not an int; pass "
                "the number of dispatches per timed one (e.g. 10), or 0 or None for no timing"
            )
        if time_subscribers is not None and time_subscribers < 0:
            raise ConfigurationError(
                f"MonitorCallback: time_subscribers={time_subscribers!r} is negative; pass "
                "the number of dispatches per timed one (e.g. 10), or 0 or None for no timing"
            )
        if gpu is not None and not isinstance(gpu, bool):
            raise ConfigurationTypeError(
                f"MonitorCallback: gpu={gpu!r} is not True, False or None; None reads the GPU "
                "when the model is on CUDA"
            )
        if not isinstance(table, bool):
            raise ConfigurationTypeError(f"MonitorCallback: table={table!r} is not a bool")
        if stream is not None and not callable(getattr(stream, "write", None)):
            raise ConfigurationTypeError(
                f"MonitorCallback: stream={stream!r} has no write() method; pass a text "
                "stream such as sys.stdout or io.StringIO(), or None for sys.stderr"
            )
        self.time_subscribers = time_subscribers or 0
        self.gpu = gpu
        self.table = table
        self._stream = stream
        self._run: Run | None = None
        self._clear_run()

    def _clear_run(self) -> None:
        """The state before a run starts: nothing measured, restored or open."""
        run = self._run
        if run is not None and run.ended is None:
            release(run)  # a run that never tore down still times its bus and holds NVML
        self.epochs: list[dict[str, Any]] = []
        self._epoch: Epoch | None = None
        self._run = None
        self._restored = False
        self._prior_seconds = 0.0
        self._prior_subscribers: dict[tuple[str, str], SubscriberTotals] = {}
        self._resumes = 0
        self._mark = 0.0
        self._batch_started = 0.0
        # The record of the epoch whose end is being saved; saves outside any epoch (at
        # train_start and train_end) are counted apart.
        self._closed: dict[str, Any] | None = None
        self._outside_checkpoints = 0
        self._outside_checkpoint_seconds = 0.0
        # Asynchronous saves that waited for the previous background write, and how long.
        self._waits: tuple[int, float] = (0, 0.0)
        self._finished = False

    def reset(self) -> None:
        """Forget the earlier run's measurements; :meth:`report` is empty until the next one."""
        self._clear_run()

    @property
    def stream(self) -> IO[str]:
        """Where the table and notices go (resolved late, so redirections apply)."""
        return self._stream if self._stream is not None else sys.stderr

    def config(self) -> dict[str, Any]:
        return {"time_subscribers": self.time_subscribers, "gpu": self.gpu, "table": self.table}

    # ---------------------------------------------------------------- start
    def on_train_start(self, *, model: torch.nn.Module, bus: EventBus) -> None:
        now = time.perf_counter()
        if not self._restored:
            self.epochs = []
            self._epoch = None
            self._prior_seconds = 0.0
            self._prior_subscribers = {}
            self._resumes = 0
            self._outside_checkpoints = 0
            self._outside_checkpoint_seconds = 0.0
            self._waits = (0, 0.0)
        self._restored = False
        self._closed = None
        self._finished = False
        run = Run(started=now, bus=bus, baseline=bus_totals(bus, skip_event="train_start"))
        run.cuda_device = cuda_device(model)
        if run.cuda_device is not None:
            torch.cuda.reset_peak_memory_stats(run.cuda_device)
        self._run = run
        self._mark = now
        bus.measure_time(self.time_subscribers)
        self._open_gpu(run)

    def on_resume(self) -> None:
        # perf_counter values of the interrupted process mean nothing here: restart the clocks.
        now = time.perf_counter()
        self._resumes += 1
        if self._run is not None:
            self._run.started = now
        if self._epoch is not None:
            self._epoch.started = now
            self._epoch.resumed = True
        self._mark = now

    def on_epoch_start(self, *, state: TrainerState) -> None:
        now = time.perf_counter()
        self._closed = None
        self._epoch = Epoch(
            epoch=state.current_epoch,
            samples_at_start=state.samples_seen,
            started=now,
            gpu=GpuStats() if self._reading_gpu() else None,
        )
        run = self._run
        if run is not None and run.cuda_device is not None:
            torch.cuda.reset_peak_memory_stats(run.cuda_device)
        self._mark = now

    # ------------------------------------------------------------ per batch
    def on_batch_start(self) -> None:
        now = time.perf_counter()
        epoch = self._epoch
        if epoch is not None:
            epoch.data_seconds += now - self._mark
        self._batch_started = now

    def on_batch_end(self) -> None:
        now = time.perf_counter()
        epoch = self._epoch
        if epoch is not None:
            epoch.compute_seconds += now - self._batch_started
            epoch.batches += 1
        self._mark = now

    def on_checkpoint(self, *, waited: float) -> None:
        now = time.perf_counter()
        run = self._run
        if run is None or run.ended is not None:
            return  # a validate(), test() or predict() call: not part of training
        if waited > 0:
            self._waits = (self._waits[0] + 1, self._waits[1] + waited)
        seconds = now - self._mark
        self._mark = now
        epoch, closed = self._epoch, self._closed
        if epoch is not None:
            epoch.checkpoints += 1
            if epoch.validation_started is None:
                # Saves asked at batch_end run between that batch and the next: not data.
                epoch.checkpoint_seconds += seconds
        elif closed is not None:
            closed["checkpoints"] += 1
            closed["checkpoint_seconds"] = round(closed["checkpoint_seconds"] + seconds, 6)
        else:
            self._outside_checkpoints += 1
            self._outside_checkpoint_seconds += seconds

    def on_loss_logged(self) -> None:
        self._read_gpu()

    # ----------------------------------------------------------- validation
    def on_validation_start(self) -> None:
        if self._epoch is not None:
            self._epoch.validation_started = time.perf_counter()

    def on_validation_end(self) -> None:
        epoch = self._epoch
        if epoch is not None and epoch.validation_started is not None:
            epoch.validation_seconds += time.perf_counter() - epoch.validation_started
            epoch.validation_started = None

    # ------------------------------------------------------------------ end
    def on_epoch_end(self, *, state: TrainerState) -> None:
        now = time.perf_counter()
        epoch = self._epoch
        if epoch is None:
            return
        self._read_gpu()
        training = epoch.elapsed(now) - epoch.validation_seconds - epoch.checkpoint_seconds
        samples = state.samples_seen - epoch.samples_at_start
        rss, peak_rss = process_memory()
        record: dict[str, Any] = {
            "epoch": epoch.epoch,
            "train_seconds": round(training, 6),
            "validation_seconds": round(epoch.validation_seconds, 6),
            "data_seconds": round(epoch.data_seconds, 6),
            "compute_seconds": round(epoch.compute_seconds, 6),
            "checkpoint_seconds": round(epoch.checkpoint_seconds, 6),
            "checkpoints": epoch.checkpoints,
            "batches": epoch.batches,
            "samples": samples,
            "samples_per_second": round(samples / training, 3) if training > 0 else None,
            "rss_bytes": rss,
            "peak_rss_bytes": peak_rss,
            "resumed": epoch.resumed,
            "gpu": None if epoch.gpu is None else epoch.gpu.as_dict(),
        }
        run = self._run
        if run is not None and run.cuda_device is not None:
            # Allocator statistics live on the host: no device sync.
            record["peak_cuda_allocated_bytes"] = torch.cuda.max_memory_allocated(run.cuda_device)
        self.epochs.append(record)
        self._epoch = None
        self._closed = record
        self._mark = time.perf_counter()

    def on_train_end(self) -> None:
        # The saves asked at train_end come after its handlers: the report waits for them.
        self._closed = None
        self._finished = True
        self._mark = time.perf_counter()

    def on_exception(self) -> None:
        self._finished = False

    def on_teardown(self, *, maps: Maps) -> None:
        run = self._run
        if run is None or run.ended is not None:
            return
        # Frozen here: later validate()/test() calls on the same bus are not part of training.
        run.final_totals = self._subscriber_totals()
        run.ended = time.perf_counter()
        release(run)
        if self._finished:
            report = self.report()
            maps.write_json(report, MONITOR_FILE)
            if self.table:
                self._print(format_report(report))

    # --------------------------------------------------------------- report
    def report(self) -> dict[str, Any]:
        """Everything measured so far, as written to ``monitor.json``."""
        run = self._run
        total = self._prior_seconds + (run.seconds(time.perf_counter()) if run is not None else 0.0)
        epochs = self.epochs
        return {
            **time_and_memory(
                epochs,
                total=total,
                outside_checkpoints=self._outside_checkpoints,
                outside_checkpoint_seconds=self._outside_checkpoint_seconds,
            ),
            "checkpoint_waits": {"count": self._waits[0], "seconds": round(self._waits[1], 6)},
            "resumes": self._resumes,
            "gpu": gpu_section(run, epochs),
            "subscribers": {
                "sample_every": self.time_subscribers,
                "rows": subscriber_rows(self._subscriber_totals()),
            },
            "epochs": [dict(entry) for entry in epochs],
        }

    def _subscriber_totals(self) -> dict[tuple[str, str], SubscriberTotals]:
        """Per (event, subscriber id): what earlier processes measured plus this train()."""
        totals = {
            key: SubscriberTotals(value.calls, value.timed_calls, value.seconds)
            for key, value in self._prior_subscribers.items()
        }
        run = self._run
        if run is not None and run.final_totals is not None:
            return run.final_totals
        if run is not None:
            for key, current in bus_totals(run.bus).items():
                base = run.baseline.get(key, SubscriberTotals())
                merged = totals.setdefault(key, SubscriberTotals())
                merged.calls += current.calls - base.calls
                merged.timed_calls += current.timed_calls - base.timed_calls
                merged.seconds += current.seconds - base.seconds
        return totals

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Per-epoch records, the running epoch, time so far and subscriber totals."""
        now = time.perf_counter()
        run = self._run
        subscribers = [
            {
                "event": event,
                "id": subscriber,
                "calls": totals.calls,
                "timed_calls": totals.timed_calls,
                "seconds": totals.seconds,
            }
            for (event, subscriber), totals in self._subscriber_totals().items()
        ]
        return {
            "epochs": [dict(entry) for entry in self.epochs],
            "epoch": None if self._epoch is None else self._epoch.saved(now),
            "seconds": self._prior_seconds + (run.seconds(now) if run is not None else 0.0),
            "resumes": self._resumes,
            "subscribers": subscribers,
            "outside_checkpoints": {
                "count": self._outside_checkpoints,
                "seconds": self._outside_checkpoint_seconds,
            },
            "checkpoint_waits": list(self._waits),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned; clocks restart at ``resume``."""
        self.epochs = [dict(entry) for entry in state.get("epochs", [])]
        saved = state.get("epoch")
        self._epoch = None
        if saved is not None:
            self._epoch = Epoch(
                epoch=int(saved["epoch"]),
                samples_at_start=int(saved["samples_at_start"]),
                started=time.perf_counter(),
                carried_seconds=float(saved["carried_seconds"]),
                validation_seconds=float(saved["validation_seconds"]),
                data_seconds=float(saved["data_seconds"]),
                compute_seconds=float(saved["compute_seconds"]),
                checkpoint_seconds=float(saved["checkpoint_seconds"]),
                checkpoints=int(saved.get("checkpoints", 0)),
                batches=int(saved["batches"]),
                resumed=True,
                gpu=None if saved.get("gpu") is None else GpuStats.restored(saved["gpu"]),
            )
        self._prior_seconds = float(state.get("seconds", 0.0))
        self._resumes = int(state.get("resumes", 0))
        outside = state.get("outside_checkpoints", {})
        self._outside_checkpoints = int(outside.get("count", 0))
        self._outside_checkpoint_seconds = float(outside.get("seconds", 0.0))
        count, seconds = state.get("checkpoint_waits", (0, 0.0))
        self._waits = (int(count), float(seconds))
        self._prior_subscribers = {
            (str(row["event"]), str(row["id"])): SubscriberTotals(
                calls=int(row["calls"]),
                timed_calls=int(row["timed_calls"]),
                seconds=float(row["seconds"]),
            )
            for row in state.get("subscribers", [])
        }
        self._restored = True

    # ------------------------------------------------------------------ gpu
    def _open_gpu(self, run: Run) -> None:
        if self.gpu is False:
            run.gpu_reason = _GPU_OFF
            return
        if self.gpu is None and run.cuda_device is None:
            run.gpu_reason = _CPU_MODEL
            return
        cuda = run.cuda_device
        index = cuda.index if cuda is not None and cuda.index is not None else 0
        reader = NvmlReader(nvml_device(index, visible_devices()))
        run.reader = reader
        if not reader.open():
            run.gpu_reason = reader.reason
            self._notice(reader.reason)

    def _reading_gpu(self) -> bool:
        run = self._run
        return run is not None and run.reader is not None and run.reader.available

    def _read_gpu(self) -> None:
        run = self._run
        if run is None or run.reader is None or not run.reader.available:
            return
        reading = run.reader.read()
        if reading is None:
            run.gpu_reason = run.reader.reason
            self._notice(run.reader.reason)
            return
        epoch = self._epoch
        if epoch is not None:
            if epoch.gpu is None:
                epoch.gpu = GpuStats()
            epoch.gpu.add(reading)

    def _notice(self, reason: str | None) -> None:
        self._print(
            f"MonitorCallback: no GPU statistics: {reason}; training goes on without them\n"
        )

    def _print(self, text: str) -> None:
        stream = self.stream
        stream.write(text)
        with contextlib.suppress(AttributeError, ValueError, OSError):
            stream.flush()
