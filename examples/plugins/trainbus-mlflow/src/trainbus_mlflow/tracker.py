"""The MLflow store a run logs to, behind a guard: its first failure warns once, then nothing."""

from __future__ import annotations

import socket
import warnings
from collections.abc import Callable
from typing import TypeVar
from urllib.parse import urlsplit, urlunsplit

from mlflow.tracking import MlflowClient

from trainbus.errors import TrainbusWarning

T = TypeVar("T")

PROBE_SECONDS = 5.0
"""How long the first call waits for an HTTP(S) tracking server to accept a connection."""

_DETAIL_CHARS = 300


class MlflowTrackingWarning(TrainbusWarning):
    """The MLflow store failed; training goes on and logs nothing more to MLflow."""


def redacted(uri: str) -> str:
    """``uri`` with the password of its user info hidden (``http://user:***@host``)."""
    try:
        parts = urlsplit(uri)
        password, host, port = parts.password, parts.hostname, parts.port
    except ValueError:  # not a URL with a valid port: nothing to hide in it
        return uri
    if password is None:
        return uri
    host = f"[{host}]" if host and ":" in host else host or ""
    address = host if port is None else f"{host}:{port}"
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{address}"))


def probe(uri: str) -> None:
    """Raise ``OSError`` at once when nothing accepts connections at an HTTP(S) store.

    MLflow's client retries a refused connection with exponential backoff for minutes; a
    tracking server that is not there at all should cost a run seconds, not minutes.
    """
    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return
    port = parts.port or (443 if parts.scheme == "https" else 80)
    socket.create_connection((parts.hostname, port), timeout=PROBE_SECONDS).close()


class Tracker:
    """An :class:`~mlflow.tracking.MlflowClient` for one tracking URI, guarded.

    :meth:`call` runs an action on the client and returns its result. The first exception,
    from the action or from reaching the store, gives one :class:`MlflowTrackingWarning`
    naming the URI (password hidden) and the error; from then on :attr:`failed` is true and
    every call returns None without doing anything.
    """

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.failed = False
        self._client: MlflowClient | None = None

    def call(self, action: Callable[[MlflowClient], T]) -> T | None:
        """``action(client)``, or None once the store has failed."""
        if self.failed:
            return None
        try:
            if self._client is None:
                probe(self.uri)
                self._client = MlflowClient(tracking_uri=self.uri)
            return action(self._client)
        except Exception as error:  # whatever the store raises, training must go on
            self._fail(error)
            return None

    def _fail(self, error: Exception) -> None:
        self.failed = True
        lines = str(error).strip().splitlines()
        detail = lines[0] if lines else ""
        if len(detail) > _DETAIL_CHARS:
            detail = detail[:_DETAIL_CHARS] + "..."
        warnings.warn(
            f"MLflow tracking at {redacted(self.uri)} failed ({type(error).__name__}: "
            f"{detail}); training goes on, and nothing more of this run is logged to MLflow",
            MlflowTrackingWarning,
            stacklevel=3,
        )
