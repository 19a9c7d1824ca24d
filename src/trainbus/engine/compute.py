"""Where and how the numbers are computed: device, precision, batch transfer, seeding."""

from __future__ import annotations

import contextlib
import math
import os
import random
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from trainbus.errors import ConfigurationError, ConfigurationTypeError

PRECISIONS = {"32": None, "bf16": torch.bfloat16, "16": torch.float16}


DEVICE_NAMES = "'auto', 'cpu', 'cuda' or 'cuda:N'"


def finite_number(value: float) -> bool:
    """Whether ``value`` is finite; an int too large for a float counts as not finite."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` picks CUDA when available, else the CPU; anything else is checked.

    Only CPU and CUDA devices are accepted: torch parses names such as ``'meta'`` or ``'mps'``
    whether or not it can train on them, and a wrong one would otherwise fail at the first
    batch, after the MAPS exists.
    """
    if isinstance(device, torch.device):
        resolved = device
    elif isinstance(device, str):
        if device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            resolved = torch.device(device)
        except RuntimeError as exc:
            raise ConfigurationError(
                f"device={device!r} is not a device name; use {DEVICE_NAMES}"
            ) from exc
    else:
        raise ConfigurationTypeError(
            f"device={device!r} is not a string or torch.device; use {DEVICE_NAMES}"
        )
    if resolved.type not in ("cpu", "cuda"):
        raise ConfigurationError(
            f"device={device!r} is a {resolved.type!r} device, which trainbus does not train "
            f"on; use {DEVICE_NAMES}"
        )
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigurationError(
                f"device={device!r} asks for CUDA, which is not available on this machine; "
                "use device='auto' or 'cpu'"
            )
        count = torch.cuda.device_count()
        if resolved.index is not None and resolved.index >= count:
            raise ConfigurationError(
                f"device={device!r} asks for CUDA device {resolved.index}, but this machine "
                f"has {count} (numbered 0 to {count - 1}); use 'cuda' or 'cuda:N' with N < {count}"
            )
    return resolved


@dataclass(frozen=True, slots=True)
class Precision:
    """Autocast dtype and loss scaling for one device."""

    name: str
    dtype: torch.dtype | None
    device_type: str

    @property
    def scales_loss(self) -> bool:
        """fp16 needs loss scaling to keep small gradients from flushing to zero."""
        return self.dtype is torch.float16

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """The autocast context of this precision (a no-op for full precision)."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def grad_scaler(self) -> torch.amp.GradScaler | None:
        """A GradScaler for fp16, else None."""
        if not self.scales_loss:
            return None
        return torch.amp.GradScaler(self.device_type)


def resolve_precision(precision: str, device: torch.device) -> Precision:
    """Check ``precision`` ('32', 'bf16' or '16') against the device."""
    if not isinstance(precision, str) or precision not in PRECISIONS:
        raise ConfigurationError(
            f"precision={precision!r} is not one of {sorted(PRECISIONS)}; use '32' for full "
            "precision, 'bf16' or '16' for mixed precision"
        )
    if precision == "16" and device.type != "cuda":
        raise ConfigurationError(
            f"precision='16' needs a CUDA device (the device is {device}); use precision='bf16' "
            "for mixed precision on the CPU"
        )
    return Precision(precision, PRECISIONS[precision], device.type)


def move_to(batch: Any, device: torch.device) -> Any:
    """Move every tensor of a (nested) batch to ``device`` (non-blocking from pinned memory)."""
    if isinstance(batch, torch.Tensor):
        if (batch.is_cpu and device.type == "cpu") or batch.device == device:
            return batch
        return batch.to(device, non_blocking=batch.is_pinned())
    if isinstance(batch, Mapping):
        return {key: move_to(value, device) for key, value in batch.items()}
    if isinstance(batch, list | tuple):
        moved = [move_to(value, device) for value in batch]
        if all(new is old for new, old in zip(moved, batch, strict=True)):
            return batch  # already there: no new container per step
        if isinstance(batch, tuple) and hasattr(batch, "_fields"):
            return type(batch)(*moved)
        return type(batch)(moved)
    return batch


def batch_size(batch: Any) -> int:
    """Samples in a batch: the first dimension of its first tensor (host-side, no sync)."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.ndim else 1
    if type(batch) is tuple or type(batch) is list:  # the common case, without ABC checks
        first = batch[0] if batch else None
        if type(first) is torch.Tensor and first.ndim:
            return int(first.shape[0])
        for value in batch:
            size = batch_size(value)
            if size:
                return size
        return 1
    if isinstance(batch, Mapping):
        values: Iterable[Any] = batch.values()
    elif isinstance(batch, Sequence) and not isinstance(batch, str):
        values = batch
    else:
        return 1
    for value in values:
        size = batch_size(value)
        if size:
            return size
    return 1


def with_last(iterable: Iterable[Any]) -> Iterator[tuple[Any, bool]]:
    """Yield ``(item, is_last)`` with one item of lookahead (loaders without ``len`` too)."""
    iterator = iter(iterable)
    try:
        current = next(iterator)
    except StopIteration:
        return
    for upcoming in iterator:
        yield current, False
        current = upcoming
    yield current, True


@dataclass(slots=True)
class Seeding:
    """This process's last :func:`seed_everything` call, and the calls a Trainer claimed."""

    seed: int | None = None
    calls: int = 0
    claimed: int = 0


# Plain bookkeeping, created at import without touching any generator.
LAST_SEEDING = Seeding()


def seed_everything(seed: int) -> int:
    """Seed Python's, NumPy's and torch's global generators (CUDA included); returns the seed.

    Call it at the top of a script, before building the model: the model's initial weights
    are drawn when it is built, so ``Trainer(seed=...)``, built after the model, cannot seed
    them. A ``Trainer(seed=seed)`` built next records ``"initial_weights_seeded": true`` in
    ``maps.json``; without this call it records false and warns.
    """
    _seed_generators(seed)
    LAST_SEEDING.seed = seed
    LAST_SEEDING.calls += 1
    return seed


def claim_seeding(seed: int | None) -> bool:
    """Seed the generators for a new Trainer (with ``seed``, unless None); whether its model
    was built after an unclaimed ``seed_everything(seed)``.

    Every Trainer claims the seedings made before it, so a model built for a second Trainer
    after the same ``seed_everything`` call does not count as seeded.
    """
    if seed is not None:
        _seed_generators(seed)
    last = LAST_SEEDING
    covered = seed is not None and last.seed == seed and last.calls > last.claimed
    last.claimed = last.calls
    return covered


def _seed_generators(seed: int) -> None:
    if type(seed) is not int or not 0 <= seed < 2**32:
        raise ConfigurationError(f"seed={seed!r} is not an int in [0, 2**32); pass e.g. seed=42")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class DeterministicMode:
    """Turn on deterministic algorithms for the duration of a call and restore the settings."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._previous: tuple[bool, bool, bool] | None = None

    def __enter__(self) -> None:
        if not self.enabled:
            return
        self._previous = (
            torch.are_deterministic_algorithms_enabled(),
            torch.backends.cudnn.deterministic,
            torch.backends.cudnn.benchmark,
        )
        if torch.cuda.is_available():
            # cuBLAS needs a fixed workspace to be deterministic; read when CUDA initialises.
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False

    def __exit__(self, *_: object) -> None:
        if self._previous is None:
            return
        algorithms, cudnn_deterministic, cudnn_benchmark = self._previous
        torch.use_deterministic_algorithms(algorithms)
        torch.backends.cudnn.deterministic = cudnn_deterministic
        torch.backends.cudnn.benchmark = cudnn_benchmark
        self._previous = None
