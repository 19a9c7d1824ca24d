"""The loop's settings: validated once, recorded in ``maps.json``, compared at a resume."""

from __future__ import annotations

import datetime
import inspect
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch

from trainbus.engine.compute import finite_number
from trainbus.engine.maps import MAPS_FILE, Maps
from trainbus.errors import ConfigurationError, ConfigurationTypeError, MapsError

ClipAlgorithm = Literal["norm", "value"]
NonfiniteLoss = Literal["stop", "skip"]


@dataclass(frozen=True, slots=True)
class LoopSettings:
    """How the loop runs: lengths, accumulation, clipping, compilation and loss checks."""

    max_epochs: int = 100
    val_every_n_epochs: int = 1
    log_every_n_batches: int = 50
    accumulate_grad_batches: int = 1
    gradient_clip_val: float | None = None
    gradient_clip_algorithm: ClipAlgorithm = "norm"
    compile_options: Mapping[str, Any] | None = field(default=None)
    deterministic: bool = False
    nonfinite_loss: NonfiniteLoss = "stop"
    max_steps: int | None = None
    max_time: float | None = None
    limit_train_batches: int | float = 1.0
    limit_val_batches: int | float = 1.0
    val_check_interval: int | float | None = None
    validate_last_epoch: bool = True
    fast_dev_run: bool = False

    def record(self) -> dict[str, Any]:
        """The settings as ``maps.json`` records them (``compile`` for the compile options)."""
        values = asdict(self)
        options = values.pop("compile_options")
        values["compile"] = None if options is None else dict(options)
        return values


REUSED_SETTINGS = (
    "max_epochs",
    "val_every_n_epochs",
    "log_every_n_batches",
    "accumulate_grad_batches",
    "gradient_clip_val",
    "gradient_clip_algorithm",
    "precision",
    "strategy",
    "deterministic",
    "nonfinite_loss",
    "max_steps",
    "max_time",
    "limit_train_batches",
    "limit_val_batches",
    "val_check_interval",
    "validate_last_epoch",
)
"""Settings ``Trainer.from_maps`` reads back from ``maps.json``.

Only plain values that the Trainer validates again: nothing read back from a MAPS may choose
code, an executable or an import path, so ``compile`` (its options can name a compiler) and
the device are always taken from the caller's arguments.
"""

EXACTNESS_SETTINGS = tuple(
    s for s in REUSED_SETTINGS if s not in ("max_epochs", "max_steps", "max_time")
)
"""Settings that, changed at a resume, make it differ from the interrupted run."""


def recorded_settings(maps: Maps) -> dict[str, Any]:
    """The settings ``maps.json`` records that ``Trainer.from_maps`` reuses, with the seed.

    ``default_callbacks`` comes back as the list of names recorded; the values are validated
    again by the Trainer, as if given by the caller.
    """
    if not maps.is_maps():
        raise MapsError(
            f"{str(maps.path)!r} is not a trainbus MAPS (no {MAPS_FILE}); pass the directory a "
            "Trainer wrote"
        )
    try:
        recorded = maps.read_json(MAPS_FILE)
        settings = dict(recorded["trainer"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise MapsError(
            f"{maps.file(MAPS_FILE)} cannot be read ({exc}); it is needed to rebuild the Trainer"
        ) from exc
    reused = {
        key: settings[key] for key in (*REUSED_SETTINGS, "default_callbacks") if key in settings
    }
    if recorded.get("seed") is not None:
        reused["seed"] = recorded["seed"]
    return reused


def loop_settings(
    *,
    max_epochs: object,
    val_every_n_epochs: object,
    log_every_n_batches: object,
    accumulate_grad_batches: object,
    gradient_clip_val: object,
    gradient_clip_algorithm: object,
    compile: object,
    deterministic: object,
    nonfinite_loss: object,
    max_steps: object = None,
    max_time: object = None,
    limit_train_batches: object = 1.0,
    limit_val_batches: object = 1.0,
    val_check_interval: object = None,
    validate_last_epoch: object = True,
    fast_dev_run: object = False,
) -> LoopSettings:
    """Validate the Trainer's loop keywords; each error names the keyword and the fix.

    ``fast_dev_run=True`` replaces the lengths: one epoch of one training batch, one
    validation batch, no step or time limit and no validation inside the epoch.
    """
    for name, flag in (
        ("validate_last_epoch", validate_last_epoch),
        ("fast_dev_run", fast_dev_run),
    ):
        if not isinstance(flag, bool):
            raise ConfigurationTypeError(f"{name}={flag!r} is not a bool; pass True or False")
    if gradient_clip_val is not None and (
        isinstance(gradient_clip_val, bool)
        or not isinstance(gradient_clip_val, int | float)
        or not gradient_clip_val > 0
        or not finite_number(gradient_clip_val)
    ):
        raise ConfigurationError(
            f"gradient_clip_val={gradient_clip_val!r} is not a positive finite number; "
            "pass e.g. gradient_clip_val=1.0, or None to disable clipping"
        )
    if gradient_clip_algorithm not in ("norm", "value"):
        raise ConfigurationError(
            f"gradient_clip_algorithm={gradient_clip_algorithm!r} is not 'norm' or 'value'"
        )
    if not isinstance(deterministic, bool):
        raise ConfigurationTypeError(f"deterministic={deterministic!r} is not a bool")
    if nonfinite_loss not in ("stop", "skip"):
        raise ConfigurationError(
            f"nonfinite_loss={nonfinite_loss!r} is not 'stop' or 'skip'; 'stop' ends training "
            "at the log interval where a NaN or infinite loss shows, 'skip' checks every "
            "step (a host-device sync per step) and skips the optimizer update of such a batch"
        )
    epochs = positive_int("max_epochs", max_epochs)
    steps = None if max_steps is None else positive_int("max_steps", max_steps)
    seconds = time_limit(max_time)
    train_limit = batch_limit("limit_train_batches", limit_train_batches)
    val_limit = batch_limit("limit_val_batches", limit_val_batches, zero=True)
    interval = check_interval(val_check_interval)
    if fast_dev_run:
        epochs, steps, seconds, train_limit, val_limit, interval = 1, None, None, 1, 1, None
    return LoopSettings(
        max_epochs=epochs,
        val_every_n_epochs=positive_int("val_every_n_epochs", val_every_n_epochs),
        log_every_n_batches=positive_int("log_every_n_batches", log_every_n_batches),
        accumulate_grad_batches=positive_int("accumulate_grad_batches", accumulate_grad_batches),
        gradient_clip_val=gradient_clip_val,
        gradient_clip_algorithm=gradient_clip_algorithm,
        compile_options=compile_options(compile),
        deterministic=deterministic,
        nonfinite_loss=nonfinite_loss,
        max_steps=steps,
        max_time=seconds,
        limit_train_batches=train_limit,
        limit_val_batches=val_limit,
        val_check_interval=interval,
        validate_last_epoch=validate_last_epoch is True,
        fast_dev_run=fast_dev_run is True,
    )


def compile_options(compile: object) -> dict[str, Any] | None:
    """``torch.compile`` keyword arguments for ``compile=``, or None when it is off."""
    if not isinstance(compile, bool | Mapping):
        raise ConfigurationTypeError(
            f"compile={compile!r} is not a bool or a dict of torch.compile arguments"
        )
    if isinstance(compile, bool):
        return {} if compile else None
    accepted = set(inspect.signature(torch.compile).parameters) - {"model"}
    unknown = sorted(str(key) for key in compile if key not in accepted)
    if unknown:
        raise ConfigurationError(
            f"compile={dict(compile)!r} has keywords {unknown} that torch.compile does "
            f"not take; it takes {sorted(accepted)}"
        )
    return dict(compile)


def positive_int(name: str, value: object) -> int:
    """``value`` when it is an int >= 1 (a bool is not); else an error naming ``name``."""
    if type(value) is not int or value < 1:
        raise ConfigurationError(f"{name}={value!r} is not a positive integer; pass e.g. {name}=1")
    return value


def time_limit(value: object) -> float | None:
    """``max_time`` in seconds: a positive number of seconds or a timedelta, or None."""
    if value is None:
        return None
    seconds = value.total_seconds() if isinstance(value, datetime.timedelta) else value
    if (
        isinstance(seconds, bool)
        or not isinstance(seconds, int | float)
        or not finite_number(seconds)
        or seconds <= 0
    ):
        raise ConfigurationError(
            f"max_time={value!r} is not a positive number of seconds or a positive "
            "datetime.timedelta; pass e.g. max_time=3600 or max_time=timedelta(hours=3)"
        )
    return float(seconds)


def batch_limit(name: str, value: object, *, zero: bool = False) -> int | float:
    """A ``limit_*_batches`` value: a count of batches (int) or a fraction of them (float)."""
    lowest = 0 if zero else 1
    if type(value) is int and value >= lowest:
        return value
    if type(value) is float and (0.0 <= value <= 1.0 if zero else 0.0 < value <= 1.0):
        return value
    fraction = "[0.0, 1.0]" if zero else "(0.0, 1.0]"
    raise ConfigurationError(
        f"{name}={value!r} is neither a number of batches (an int >= {lowest}) nor a fraction "
        f"of the loader's batches (a float in {fraction}); pass e.g. {name}=10 or {name}=0.25"
    )


def check_interval(value: object) -> int | float | None:
    """``val_check_interval``: validate every N training batches (int) or fraction of an epoch."""
    if value is None:
        return None
    if type(value) is int and value >= 1:
        return value
    if type(value) is float and 0.0 < value <= 1.0:
        return value
    raise ConfigurationError(
        f"val_check_interval={value!r} is neither a number of training batches (an int >= 1) "
        "nor a fraction of an epoch (a float in (0.0, 1.0]); pass e.g. val_check_interval=500 "
        "or val_check_interval=0.25, or None to validate at epoch ends only"
    )
