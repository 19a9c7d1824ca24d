"""Low-level file operations of a MAPS: fsync, the lock file's owner record, directory checks."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from trainbus.errors import MapsError, UnsafePathError
from trainbus.events.text import escape_control

_OWNER_FIELD_LENGTH = 200


def read_owner(descriptor: int) -> dict[str, Any] | None:
    """The owner record of an open lock file; ``None`` when it is empty or unreadable."""
    try:
        os.lseek(descriptor, 0, os.SEEK_SET)
        data = os.read(descriptor, 4096)
        owner = json.loads(data) if data else None
    except (OSError, ValueError, RecursionError):
        return None
    return owner if isinstance(owner, dict) else None


def write_owner(descriptor: int, record: Mapping[str, Any]) -> None:
    """Replace the owner record of an open lock file, durably."""
    os.ftruncate(descriptor, 0)
    os.lseek(descriptor, 0, os.SEEK_SET)
    os.write(descriptor, (json.dumps(record) + "\n").encode())
    os.fsync(descriptor)


def describe_owner(owner: Mapping[str, Any] | None) -> str:
    """The owner of a lock for an error message, every field escaped for a terminal."""
    if not owner:
        return "another process (its record is unreadable)"
    pid, host, since, command = (
        _owner_field(owner.get(key)) for key in ("pid", "host", "since", "command")
    )
    return f"process {pid} on {host} since {since} ('{command}')"


def _owner_field(value: object) -> str:
    """One field of a lock file's record, as text safe to print: anyone can write that file."""
    text = str(value)
    if len(text) > _OWNER_FIELD_LENGTH:
        text = text[:_OWNER_FIELD_LENGTH] + "..."
    return escape_control(text)


def check_real_directory(path: Path) -> None:
    """Raise unless ``path`` is a directory itself, not a symbolic link to one (nor a file)."""
    if path.is_symlink():
        raise UnsafePathError(
            f"{path} is a symbolic link (to {os.path.realpath(path)!r}); trainbus never makes "
            "one inside a MAPS, so it was tampered with: refusing to write, read or delete "
            "through it. Replace the link with a real directory"
        )
    if not path.is_dir():
        raise MapsError(
            f"{path} is not a directory; the MAPS needs a directory there: move that file away"
        )


def sync_file(path: Path) -> None:
    """fsync a file if it exists (what was written to it survives a power loss)."""
    _fsync(path, best_effort=False)


def fsync_directory(path: Path) -> None:
    """fsync a directory so a rename inside it survives a crash (no-op where unsupported)."""
    _fsync(path, best_effort=True)


def _fsync(path: Path, *, best_effort: bool) -> None:
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return
    except OSError:
        if best_effort:
            return
        raise
    try:
        os.fsync(descriptor)
    except OSError:
        if not best_effort:
            raise
    finally:
        os.close(descriptor)
