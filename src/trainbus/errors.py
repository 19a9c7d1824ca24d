"""Every exception and warning trainbus raises.

One hierarchy, rooted at :class:`TrainbusError`, so ``except TrainbusError`` catches everything
the engine raises on purpose. Classes that signal bad input also derive from the matching
built-in (``ValueError``, ``TypeError``, ``FileExistsError``) so generic handlers keep working.
A message says what failed (with the offending value), what was expected, and how to fix it.
"""

from __future__ import annotations


class TrainbusError(Exception):
    """Base class of every error raised by trainbus."""


class ConfigurationError(TrainbusError, ValueError):
    """An argument has a wrong value: the message names it and says what is accepted."""


class ConfigurationTypeError(TrainbusError, TypeError):
    """An argument has a wrong type: the message names it and says what is accepted."""


class UnknownEventError(ConfigurationError):
    """An event name is not in the catalogue (the message suggests the closest names)."""


class SubscriptionError(ConfigurationError):
    """A handler cannot be subscribed: bad signature, bad filter or a duplicate id."""


class CommandError(TrainbusError):
    """A handler returned something the loop cannot carry out at that event."""


class CallInProgressError(TrainbusError, RuntimeError):
    """A Trainer call was made while another call of the same Trainer is running."""


class ModelContractError(TrainbusError, TypeError):
    """A :class:`~trainbus.Model` method returned something outside its contract."""


class DataError(TrainbusError, ValueError):
    """A data loader cannot be used: empty, or yielding something the loop cannot move."""


class MissingDependencyError(TrainbusError, ImportError):
    """An optional dependency a feature needs is not installed (the message names the extra)."""


class MapsError(TrainbusError):
    """The experiment directory (MAPS) cannot be created, read or written."""


class MapsExistsError(MapsError, FileExistsError):
    """The experiment directory already exists and overwriting was not asked for."""


class MapsLockedError(MapsError):
    """Another live process is using the experiment directory (the message names it)."""


class UnsafePathError(MapsError, ValueError):
    """A name written into the MAPS would escape it (``..``, absolute path, separator)."""


class CheckpointError(TrainbusError):
    """A checkpoint cannot be written or read."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint file does not match its manifest (size, hash, missing or unreadable)."""


class PluginError(TrainbusError):
    """A plugin could not be loaded: the message names its distribution, version and entry point."""


class TrainingInterrupted(KeyboardInterrupt):
    """Training was stopped by a signal in an interactive session (a notebook, a REPL).

    A script exits with status 128 + the signal number instead, as a shell expects.
    ``signal`` is the signal's number; ``training_state`` the state written, if any.
    """

    def __init__(self, message: str, *, signal: int, training_state: str | None) -> None:
        super().__init__(message)
        self.signal = signal
        self.training_state = training_state


class TrainbusWarning(UserWarning):
    """Base class of every warning emitted by trainbus."""


class HandlerFailureWarning(TrainbusWarning):
    """A handler subscribed with ``on_error="log"`` raised; training went on."""
