"""The NVML reader, against a stand-in ``pynvml`` module (this machine has no GPU)."""

from __future__ import annotations

import sys
import types
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pytest

from trainbus.handlers.gpu import GpuReading, NvmlReader, nvml_device

GiB = 2**30


class FakeNVMLError(Exception):
    """Stands for ``pynvml.NVMLError`` (what every failing NVML call raises)."""


class FakeNvml:
    """A ``pynvml`` stand-in that records its calls.

    ``fail`` maps a function name to how many calls succeed before it starts raising
    :class:`FakeNVMLError` (0: it always raises). Readings cycle through ``used`` and
    ``utilization``.
    """

    def __init__(
        self,
        *,
        fail: Mapping[str, int] | None = None,
        used: Sequence[int] = (1 * GiB, 3 * GiB, 2 * GiB),
        utilization: Sequence[int] = (40, 90, 60),
        total: int = 16 * GiB,
        name: str | bytes = b"Fake H100",
    ) -> None:
        self.fail = dict(fail or {})
        self.used = list(used)
        self.utilization = list(utilization)
        self.total = total
        self.name = name
        self.calls: list[tuple[str, tuple[Any, ...]]] = []

    def count(self, function: str) -> int:
        return sum(1 for name, _ in self.calls if name == function)

    def arguments(self, function: str) -> list[tuple[Any, ...]]:
        return [args for name, args in self.calls if name == function]

    def module(self) -> types.ModuleType:
        module = types.ModuleType("pynvml")
        module.NVMLError = FakeNVMLError  # type: ignore[attr-defined]
        functions: dict[str, Callable[..., Any]] = {
            "nvmlInit": lambda: None,
            "nvmlShutdown": lambda: None,
            "nvmlDeviceGetHandleByIndex": lambda index: ("handle", index),
            "nvmlDeviceGetHandleByUUID": lambda uuid: ("handle", uuid),
            "nvmlDeviceGetName": lambda handle: self.name,
            "nvmlDeviceGetMemoryInfo": self._memory,
            "nvmlDeviceGetUtilizationRates": self._rates,
        }
        for function, implementation in functions.items():
            setattr(module, function, self._recorded(function, implementation))
        return module

    def install(self, monkeypatch: pytest.MonkeyPatch) -> FakeNvml:
        monkeypatch.setitem(sys.modules, "pynvml", self.module())
        return self

    def _recorded(self, function: str, implementation: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any) -> Any:
            self.calls.append((function, args))
            allowed = self.fail.get(function)
            if allowed is not None and self.count(function) > allowed:
                raise FakeNVMLError("Driver Not Loaded")
            return implementation(*args)

        return call

    def _memory(self, handle: object) -> types.SimpleNamespace:
        used = self.used[(self.count("nvmlDeviceGetMemoryInfo") - 1) % len(self.used)]
        return types.SimpleNamespace(used=used, total=self.total, free=self.total - used)

    def _rates(self, handle: object) -> types.SimpleNamespace:
        calls = self.count("nvmlDeviceGetUtilizationRates")
        rate = self.utilization[(calls - 1) % len(self.utilization)]
        return types.SimpleNamespace(gpu=rate, memory=rate // 2)


@pytest.mark.parametrize(
    ("cuda_index", "visible", "expected"),
    [
        (0, None, 0),
        (1, "", 1),
        (0, "2,3", 2),
        (1, " 2, 3 ", 3),
        (0, "GPU-5c1a-77", "GPU-5c1a-77"),
        (1, "0,MIG-9f2e", "MIG-9f2e"),
        (3, "0,1", 3),
    ],
)
def test_nvml_device_follows_cuda_visible_devices(
    cuda_index: int, visible: str | None, expected: int | str
) -> None:
    assert nvml_device(cuda_index, visible) == expected


def test_reader_opens_reads_and_shuts_down(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeNvml().install(monkeypatch)
    reader = NvmlReader(2)
    assert (reader.available, reader.reason) == (False, "NVML was not opened")
    assert reader.open()
    assert reader.available
    assert reader.reason is None
    assert reader.name == "Fake H100"
    readings = [reader.read(), reader.read()]
    assert readings == [
        GpuReading(1 * GiB, 16 * GiB, utilization_percent=40, memory_utilization_percent=20),
        GpuReading(3 * GiB, 16 * GiB, utilization_percent=90, memory_utilization_percent=45),
    ]
    assert reader.open()  # already open: NVML is not initialised twice
    reader.close()
    reader.close()
    assert (reader.available, reader.read()) == (False, None)
    assert fake.arguments("nvmlDeviceGetHandleByIndex") == [(2,)]
    assert (fake.count("nvmlInit"), fake.count("nvmlShutdown")) == (1, 1)


def test_reader_finds_a_device_given_by_uuid(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeNvml(name="Fake A100").install(monkeypatch)
    reader = NvmlReader("GPU-5c1a-77")
    assert reader.open()
    assert reader.name == "Fake A100"
    assert fake.arguments("nvmlDeviceGetHandleByUUID") == [("GPU-5c1a-77",)]
    assert fake.count("nvmlDeviceGetHandleByIndex") == 0


@pytest.mark.parametrize(
    ("failing", "reason", "shutdowns"),
    [
        ("nvmlInit", "NVML cannot be initialised (FakeNVMLError: Driver Not Loaded)", 0),
        ("nvmlDeviceGetHandleByIndex", "NVML has no device 0 (FakeNVMLError", 1),
    ],
)
def test_a_failing_open_gives_a_reason_and_releases_nvml(
    monkeypatch: pytest.MonkeyPatch, failing: str, reason: str, shutdowns: int
) -> None:
    fake = FakeNvml(fail={failing: 0}).install(monkeypatch)
    reader = NvmlReader(0)
    assert not reader.open()
    assert not reader.available
    assert reader.reason is not None
    assert reason in reader.reason
    assert reader.read() is None
    assert fake.count("nvmlShutdown") == shutdowns


def test_a_missing_pynvml_gives_a_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)
    reader = NvmlReader(0)
    assert not reader.open()
    assert reader.reason is not None
    assert "install nvidia-ml-py" in reader.reason


def test_a_failing_read_closes_the_reader_once(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeNvml(fail={"nvmlDeviceGetMemoryInfo": 1}).install(monkeypatch)
    reader = NvmlReader(0)
    assert reader.open()
    assert reader.read() is not None
    assert reader.read() is None
    assert not reader.available
    assert reader.reason is not None
    assert reader.reason.startswith("reading the memory of GPU 0 failed (FakeNVMLError")
    assert reader.read() is None
    reader.close()
    assert fake.count("nvmlDeviceGetMemoryInfo") == 2
    assert fake.count("nvmlShutdown") == 1


def test_unsupported_utilisation_is_none_and_not_asked_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake = FakeNvml(fail={"nvmlDeviceGetUtilizationRates": 0}).install(monkeypatch)
    reader = NvmlReader(0)
    assert reader.open()
    readings = [reader.read() for _ in range(3)]
    assert [r.memory_used_bytes if r else None for r in readings] == [GiB, 3 * GiB, 2 * GiB]
    assert all(r is not None and r.utilization_percent is None for r in readings)
    assert reader.available
    assert fake.count("nvmlDeviceGetUtilizationRates") == 1


def test_a_failing_shutdown_does_not_raise(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeNvml(fail={"nvmlShutdown": 0}).install(monkeypatch)
    reader = NvmlReader(0)
    assert reader.open()
    reader.close()
    assert not reader.available
    assert fake.count("nvmlShutdown") == 1
