"""The experiment directory (MAPS): one directory per run, created once, written atomically.

Layout (every name below is relative to the MAPS root)::

    maps.json            versions, seed, configuration, dispatch plan, outcome of each call
    environment.json     installed distributions and versions (importlib.metadata)
    metrics.tsv          one row per validation / test pass
    training_loss.tsv    mean training loss at each log interval
    logs/train.jsonl     structured logs, one JSON object per line
    checkpoints/<tag>/   model weights (safetensors) with a manifest
    training/state-*/    training states for an exact resume; training/latest names the newest

A MAPS that exists is never silently reused: pass ``overwrite=True`` to replace it (only a
directory that is a trainbus MAPS, or empty, is ever deleted, never through a symbolic link,
and only while holding its lock). Every name written is checked, so nothing lands outside the
directory; a directory of the MAPS that is a symbolic link is refused, and a MAPS deleted or
moved while a run writes into it is reported at the next write instead of being recreated.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as _dt
import io
import json
import math
import os
import shutil
import socket
import sys
from collections.abc import Callable, Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

from trainbus.engine import naming
from trainbus.engine.files import (
    check_name,
    check_real_directory,
    create_file,
    describe_owner,
    fsync_directory,
    open_lock_file,
    read_owner,
    sync_file,
    try_lock,
    unlock,
    write_owner,
)
from trainbus.errors import (
    ConfigurationTypeError,
    MapsError,
    MapsExistsError,
    MapsLockedError,
)

__all__ = [
    "CHECKPOINTS_DIR",
    "ENVIRONMENT_FILE",
    "LOCK_FILE",
    "LOGS_DIR",
    "MAPS_FILE",
    "METRICS_FILE",
    "TRAINING_DIR",
    "TRAINING_LOSS_FILE",
    "Maps",
    "check_name",
    "check_real_directory",
    "environment",
    "fsync_directory",
    "sync_file",
]

MAPS_FILE = "maps.json"
ENVIRONMENT_FILE = "environment.json"
METRICS_FILE = "metrics.tsv"
TRAINING_LOSS_FILE = "training_loss.tsv"
LOGS_DIR = "logs"
CHECKPOINTS_DIR = "checkpoints"
TRAINING_DIR = "training"
LOCK_FILE = ".lock"

_SKELETON = frozenset({LOCK_FILE, LOGS_DIR, CHECKPOINTS_DIR, ENVIRONMENT_FILE})
"""What :meth:`Maps.create` leaves before the run writes ``maps.json``: still a trainbus MAPS."""


class Maps:
    """Handle on an experiment directory; the directory is created by :meth:`create`.

    A ``{version}`` in the path's last component is replaced by a number (see
    :mod:`trainbus.engine.naming`): ``version="next"`` takes one more than the highest existing
    one and reserves it at once (the directory is created empty, so two runs started together
    never share it); ``version="latest"`` takes the highest existing one. The chosen path is
    printed (``trainbus: MAPS runs/v3``). ``overwrite=True`` with ``{version}`` is refused.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        overwrite: bool = False,
        version: Literal["next", "latest"] = "next",
    ) -> None:
        if not isinstance(path, str | os.PathLike):
            raise ConfigurationTypeError(
                f"maps={path!r} is not a path; pass the directory of the experiment, e.g. "
                "maps='maps_directory'"
            )
        if not isinstance(overwrite, bool):
            raise ConfigurationTypeError(f"overwrite={overwrite!r} is not a bool")
        self.path = Path(naming.choose(path, overwrite=overwrite, version=version)).absolute()
        self.overwrite = overwrite
        self._created = False
        self._lock: int | None = None
        self._stale: dict[str, Any] | None = None
        self._identity: tuple[int, int] | None = None
        if not self.is_maps():
            self.check_available()

    def __repr__(self) -> str:
        return f"Maps({str(self.path)!r})"

    def __fspath__(self) -> str:
        return str(self.path)

    @property
    def created(self) -> bool:
        """Whether this handle created (or took over) the directory."""
        return self._created

    def check_available(self) -> None:
        """Raise :class:`MapsExistsError` if creating the MAPS would overwrite something.

        Raises :class:`MapsLockedError` instead when another live process holds the directory
        (it is creating or replacing it, or training into it).
        """
        if self._created or not self.path.exists():
            return
        if not self.path.is_dir():
            raise MapsExistsError(
                f"MAPS path {str(self.path)!r} exists and is not a directory; choose another "
                "path for the experiment"
            )
        # maps.json is looked for before the listing: an overwrite deletes it last.
        is_maps = self.is_maps()
        names = {entry.name for entry in self.path.iterdir()}
        if not names:
            return
        if not self.overwrite:
            resume = " (or resume=True to continue its training)" if is_maps else ""
            raise MapsExistsError(
                f"MAPS directory {str(self.path)!r} already exists and is not empty; choose a "
                f"new directory, or pass overwrite=True to replace it{resume}"
            )
        if self.path.is_symlink():
            raise MapsExistsError(
                f"MAPS path {str(self.path)!r} is a symbolic link (to "
                f"{os.path.realpath(self.path)!r}); overwrite=True never deletes through a link. "
                "Pass the directory it points to as the MAPS, or remove the link"
            )
        if not is_maps and not (LOCK_FILE in names and names <= _SKELETON):
            self.check_unlocked()  # a live process may be replacing it right now
            raise MapsExistsError(
                f"MAPS directory {str(self.path)!r} is not empty and holds no {MAPS_FILE}, so "
                "it is not a trainbus MAPS; refusing to delete it even with overwrite=True. "
                "Choose another path."
            )

    def is_maps(self) -> bool:
        """Whether the directory exists and is a trainbus MAPS (it holds ``maps.json``)."""
        return (self.path / MAPS_FILE).is_file()

    def adopt(self) -> None:
        """Continue writing into an existing MAPS (resume, or evaluation after training)."""
        if self._created:
            self.check_present()
            return
        if not self.is_maps():
            raise MapsError(
                f"{str(self.path)!r} is not a trainbus MAPS (no {MAPS_FILE}); nothing can be "
                "resumed from it: check the path"
            )
        self._remember()
        self._created = True

    def create(self) -> None:
        """Create the directory (replacing an old MAPS only when ``overwrite=True``).

        Replacing takes the MAPS's lock first and keeps it (as :meth:`lock` would): of two
        processes replacing one MAPS at once, one wins and the other gets
        :class:`MapsLockedError`; the old contents go while the lock is held, ``maps.json``
        last, so an interrupted deletion still leaves a directory recognised as a MAPS.
        """
        if self._created:
            self.check_present()
            return
        self.check_available()
        replacing = self.path.is_dir() and any(self.path.iterdir())
        if replacing:
            self._stale = self.lock()
        try:
            if replacing:
                self.check_available()  # what it holds now, under the lock
                self._clear()
            self.path.mkdir(parents=True, exist_ok=True)
            for sub in (LOGS_DIR, CHECKPOINTS_DIR):
                (self.path / sub).mkdir(exist_ok=True)
            self._remember()
        except OSError as exc:
            self.unlock()
            raise MapsError(
                f"cannot create MAPS directory {str(self.path)!r}: {exc.strerror or exc}; check "
                "the path and its permissions"
            ) from exc
        except BaseException:
            self.unlock()
            raise
        self._created = True

    def _clear(self) -> None:
        """Delete the old MAPS's contents but the lock file (held) and, until the end, maps.json."""
        entries = sorted(self.path.iterdir(), key=lambda entry: entry.name == MAPS_FILE)
        for entry in entries:
            if entry.name == LOCK_FILE:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink(missing_ok=True)
        fsync_directory(self.path)

    # ------------------------------------------------------------- identity
    def _remember(self) -> None:
        status = os.stat(self.path)
        self._identity = (status.st_dev, status.st_ino)

    def check_present(self) -> None:
        """Raise :class:`MapsError` if the MAPS was deleted or moved since it was created.

        Writing on would recreate an empty directory, or write into another one at that path:
        the run's files would be split between two places without anyone noticing.
        """
        if self._identity is None:
            return
        try:
            status = os.stat(self.path)
        except OSError:
            status = None
        if status is None or (status.st_dev, status.st_ino) != self._identity:
            now = "nothing is there now" if status is None else "another directory is there now"
            raise MapsError(
                f"the MAPS {str(self.path)!r} was deleted or moved during the run ({now}); "
                "nothing more is written, so the run's files are not split between two "
                "directories. Put the directory back and resume (Trainer.from_maps), or train "
                "again into a new MAPS"
            )

    # ------------------------------------------------------------- locking
    def lock(self) -> dict[str, Any] | None:
        """Hold the MAPS for this process (an advisory lock on ``.lock``) until :meth:`unlock`.

        Raises :class:`MapsLockedError` naming the owner when another live process holds it.
        A lock left by a process that was killed is released by the system: it is taken over,
        and the dead owner's record is returned so the takeover can be reported (by the first
        call after :meth:`create` when replacing the MAPS took the lock already).
        """
        if self._lock is not None:
            stale, self._stale = self._stale, None
            return stale
        self.check_present()
        try:
            descriptor = open_lock_file(self.path / LOCK_FILE, create=True)
        except OSError as exc:
            raise MapsError(
                f"cannot lock MAPS {str(self.path)!r}: {exc.strerror or exc} "
                f"({self.path / LOCK_FILE}); check that the directory exists and is writable"
            ) from exc
        try:
            self._take(descriptor)
        except BaseException:
            os.close(descriptor)
            raise
        previous = read_owner(descriptor)
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "command": " ".join(sys.argv)[:500],
        }
        write_owner(descriptor, record)
        self._lock = descriptor
        self._stale = None
        if previous and not previous.get("released"):
            return previous
        return None

    def unlock(self) -> None:
        """Release the lock taken by :meth:`lock` (marking the record released)."""
        self._stale = None
        if self._lock is None:
            return
        descriptor, self._lock = self._lock, None
        try:
            record = read_owner(descriptor) or {}
            write_owner(descriptor, {**record, "released": True})
        finally:
            unlock(descriptor)
            os.close(descriptor)

    def check_unlocked(self) -> None:
        """Raise :class:`MapsLockedError` if another live process holds the MAPS now."""
        if self._lock is not None or not (self.path / LOCK_FILE).exists():
            return
        descriptor = open_lock_file(self.path / LOCK_FILE, create=False)
        try:
            self._take(descriptor)
            unlock(descriptor)  # only a probe: the owner record stays
        finally:
            os.close(descriptor)

    def _take(self, descriptor: int) -> None:
        if not try_lock(descriptor):
            owner = read_owner(descriptor)
            raise MapsLockedError(
                f"MAPS {str(self.path)!r} is in use by {describe_owner(owner)}; wait for that "
                "run to end (or stop it), or train into another MAPS"
            )

    def file(self, *parts: str) -> Path:
        """The path of ``parts`` inside the MAPS, each part checked by :func:`check_name`."""
        return self.path.joinpath(*(check_name(part) for part in parts))

    def directory(self, *parts: str) -> Path:
        """The directory ``parts`` inside the MAPS, created if missing, ready to be written into.

        Raises :class:`MapsError` if the MAPS was deleted or moved during the run, and
        :class:`UnsafePathError` if one of the directories is a symbolic link: trainbus never
        makes one, and writing (or rotating) through it would act outside the MAPS.
        """
        for part in parts:
            check_name(part)
        self.check_present()
        current = self.path
        if self._identity is None:
            current.mkdir(parents=True, exist_ok=True)
        for part in parts:
            current = current / part
            with contextlib.suppress(FileExistsError):
                current.mkdir()
            check_real_directory(current)
        return current

    # ------------------------------------------------------------- writing
    def write_bytes(self, data: bytes, *parts: str) -> Path:
        """Write a file atomically: temporary file, fsync, rename, fsync of the directory."""
        target = self.file(*parts)
        self.directory(*parts[:-1])
        handle, temporary = create_file(target.parent, f".{target.name}.")
        try:
            with os.fdopen(handle, "wb") as stream:
                stream.write(data)
                stream.flush()
                os.fsync(stream.fileno())
            os.replace(temporary, target)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)
            raise
        fsync_directory(target.parent)
        return target

    def write_json(self, data: Any, *parts: str) -> Path:
        """Write ``data`` as indented JSON, atomically."""
        text = json.dumps(data, indent=2, sort_keys=False, default=_json_default) + "\n"
        return self.write_bytes(text.encode(), *parts)

    def read_json(self, *parts: str) -> Any:
        """Read a JSON file of the MAPS."""
        with self.file(*parts).open(encoding="utf-8") as stream:
            return json.load(stream)

    def append_row(
        self, columns: Sequence[str], row: Mapping[str, Any], *parts: str, durable: bool = True
    ) -> Path:
        """Append one row to a TSV file, writing the header when the file is new.

        The header of an existing file must list the same columns: a run never mixes layouts.
        The row is handed to the operating system at once, so a killed process loses nothing;
        ``durable=True`` also fsyncs it (a power loss loses nothing either, at ~0.5 ms a row).
        """
        target = self.file(*parts)
        self.directory(*parts[:-1])
        exists = target.exists() and target.stat().st_size > 0
        if exists:
            with target.open(encoding="utf-8", newline="") as stream:
                header = stream.readline().rstrip("\n").split("\t")
            if header != list(columns):
                raise MapsError(
                    f"{target} has columns {header}, but the row has {list(columns)}; a MAPS "
                    "holds one layout per file: start a new MAPS for a different metric set"
                )
        buffer = io.StringIO()
        writer = csv.writer(buffer, delimiter="\t", lineterminator="\n")
        if not exists:
            writer.writerow(columns)
        writer.writerow([_cell(row.get(column)) for column in columns])
        with target.open("a", encoding="utf-8", newline="") as stream:
            stream.write(buffer.getvalue())
            stream.flush()
            if durable:
                os.fsync(stream.fileno())
        return target

    def read_rows(self, *parts: str) -> list[dict[str, str]]:
        """Read a TSV file of the MAPS as a list of dicts (empty if it does not exist)."""
        target = self.file(*parts)
        if not target.exists():
            return []
        with target.open(encoding="utf-8", newline="") as stream:
            return list(csv.DictReader(stream, delimiter="\t"))

    def count_rows(self, *parts: str) -> int:
        """Data rows of a TSV file of the MAPS (0 if it does not exist)."""
        return len(self.read_rows(*parts))

    def drop_rows(
        self,
        keep: int,
        *parts: str,
        when: Callable[[Mapping[str, str]], bool] | None = None,
    ) -> int:
        """Drop the data rows after the first ``keep`` of a TSV file (those ``when`` accepts).

        Used at a resume: training rows written after the training state was saved are
        dropped, as the resumed run writes them again. The file is rewritten atomically.
        Returns how many rows were dropped.
        """
        target = self.file(*parts)
        if not target.exists():
            return 0
        lines = target.read_text(encoding="utf-8").splitlines(keepends=True)
        if len(lines) <= keep + 1:
            return 0
        kept = lines[: keep + 1]
        for line in lines[keep + 1 :]:
            row = next(csv.DictReader([lines[0], line], delimiter="\t"))
            if when is not None and not when(row):
                kept.append(line)
        if len(kept) == len(lines):
            return 0
        self.write_bytes("".join(kept).encode("utf-8"), *parts)
        return len(lines) - len(kept)

    def write_environment(self) -> Path:
        """Write ``environment.json``: Python, platform and every installed distribution."""
        return self.write_json(environment(), ENVIRONMENT_FILE)


def environment() -> dict[str, Any]:
    """Interpreter, platform and installed distributions, read with importlib.metadata."""
    packages: dict[str, str] = {}
    for distribution in metadata.distributions():
        name = distribution.metadata["Name"]
        if name:
            packages[name] = distribution.version
    return {
        "python": sys.version,
        "executable": sys.executable,
        "platform": sys.platform,
        "packages": dict(sorted(packages.items(), key=lambda item: item[0].lower())),
    }


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "nan" if math.isnan(value) else repr(value)
    return str(value).replace("\t", " ").replace("\r", " ").replace("\n", " ")


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    return repr(value)
