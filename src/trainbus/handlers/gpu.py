"""GPU memory and utilisation read through NVML (the ``nvidia-ml-py`` package, ``pynvml``).

``pynvml`` is imported by :meth:`NvmlReader.open`, never when this module is imported, so a
machine without a GPU (or without the package) pays nothing. Every NVML call costs a few
microseconds and does not synchronise with CUDA streams, but it is still meant for log
intervals and epoch ends, not for every step. Failures never raise: the reader records a
``reason`` and reports itself unavailable, so training goes on without GPU statistics.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

_NOT_OPEN = "NVML was not opened"


@dataclass(frozen=True, slots=True)
class GpuReading:
    """One NVML reading of one device.

    ``utilization_percent`` is the share of the last sample period in which a kernel ran;
    ``memory_utilization_percent`` the share in which device memory was read or written. Both
    are ``None`` where the device does not report them (MIG instances, some virtual GPUs).
    """

    memory_used_bytes: int
    memory_total_bytes: int
    utilization_percent: int | None
    memory_utilization_percent: int | None


def nvml_device(cuda_index: int, visible_devices: str | None) -> int | str:
    """The NVML index (or UUID) of CUDA device ``cuda_index``.

    CUDA numbers only the devices listed in ``CUDA_VISIBLE_DEVICES`` (``visible_devices``),
    while NVML sees every device: ``cuda:0`` with ``CUDA_VISIBLE_DEVICES=2,3`` is NVML device
    2. An entry given as a UUID (``GPU-...``, ``MIG-...``) is returned as that string.
    """
    if not visible_devices or not visible_devices.strip():
        return cuda_index
    entries = [entry.strip() for entry in visible_devices.split(",") if entry.strip()]
    if cuda_index >= len(entries):
        return cuda_index
    entry = entries[cuda_index]
    try:
        return int(entry)
    except ValueError:
        return entry


class NvmlReader:
    """Read memory and utilisation of one GPU through NVML; degrade instead of raising.

    ``device`` is an NVML index or a device UUID (see :func:`nvml_device`). After a failed
    :meth:`open` or :meth:`read`, :attr:`reason` says why and :attr:`available` is False;
    :meth:`close` shuts NVML down again (NVML counts its initialisations, so other users of
    NVML in the process are unaffected).
    """

    def __init__(self, device: int | str) -> None:
        self.device = device
        self.name: str | None = None
        self.reason: str | None = _NOT_OPEN
        self._nvml: Any = None
        self._handle: Any = None
        self._utilization_supported = True

    @property
    def available(self) -> bool:
        """Whether NVML is open and the last call succeeded."""
        return self._handle is not None

    def open(self) -> bool:
        """Import ``pynvml``, initialise NVML and find the device; False (with a reason) if not."""
        if self._handle is not None:
            return True
        try:
            import pynvml
        except ImportError as exc:
            self.reason = (
                f"pynvml cannot be imported ({exc}); install nvidia-ml-py to record GPU "
                "memory and utilisation"
            )
            return False
        error = _error_type(pynvml)
        try:
            pynvml.nvmlInit()
        except error as exc:
            self.reason = f"NVML cannot be initialised ({_describe(exc)}); is a GPU driver present?"
            return False
        self._nvml = pynvml
        try:
            if isinstance(self.device, str):
                handle = pynvml.nvmlDeviceGetHandleByUUID(self.device)
            else:
                handle = pynvml.nvmlDeviceGetHandleByIndex(self.device)
        except error as exc:
            self.reason = f"NVML has no device {self.device!r} ({_describe(exc)})"
            self.close()
            return False
        self._handle = handle
        self.reason = None
        self.name = self._device_name(error)
        return True

    def read(self) -> GpuReading | None:
        """One reading, or None (with :attr:`reason` set, NVML closed) when NVML fails."""
        if self._handle is None:
            return None
        nvml = self._nvml
        error = _error_type(nvml)
        try:
            memory = nvml.nvmlDeviceGetMemoryInfo(self._handle)
        except error as exc:
            self.close()
            self.reason = f"reading the memory of GPU {self.device!r} failed ({_describe(exc)})"
            return None
        utilization: int | None = None
        memory_utilization: int | None = None
        if self._utilization_supported:
            try:
                rates = nvml.nvmlDeviceGetUtilizationRates(self._handle)
            except error:
                # Not supported on this device (MIG, some vGPUs): it will not start to be.
                self._utilization_supported = False
            else:
                utilization, memory_utilization = int(rates.gpu), int(rates.memory)
        return GpuReading(
            memory_used_bytes=int(memory.used),
            memory_total_bytes=int(memory.total),
            utilization_percent=utilization,
            memory_utilization_percent=memory_utilization,
        )

    def close(self) -> None:
        """Shut NVML down if this reader initialised it; the reader can be opened again."""
        nvml, self._nvml, self._handle = self._nvml, None, None
        if self.reason is None:
            self.reason = _NOT_OPEN
        if nvml is None:
            return
        try:
            nvml.nvmlShutdown()
        except _error_type(nvml):
            pass  # nothing left to release: a failed shutdown must not fail the run

    def _device_name(self, error: type[BaseException] | tuple[type[BaseException], ...]) -> str:
        get_name = getattr(self._nvml, "nvmlDeviceGetName", None)
        if get_name is None:
            return str(self.device)
        try:
            name = get_name(self._handle)
        except error:
            return str(self.device)
        return name.decode() if isinstance(name, bytes) else str(name)


def visible_devices() -> str | None:
    """The ``CUDA_VISIBLE_DEVICES`` of this process (None when unset)."""
    return os.environ.get("CUDA_VISIBLE_DEVICES")


def _error_type(nvml: Any) -> type[BaseException] | tuple[type[BaseException], ...]:
    """What NVML calls raise: ``pynvml.NVMLError`` (and OSError from the library loader)."""
    error = getattr(nvml, "NVMLError", None)
    if isinstance(error, type) and issubclass(error, BaseException):
        return (error, OSError)
    return Exception


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
