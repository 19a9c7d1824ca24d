"""Low-level file operations of a MAPS: creation, locks and their owner record, fsync, checks.

Everything trainbus creates gets the mode an ordinary ``open()`` or ``mkdir()`` gives under the
process's umask (0644 and 0755 under umask 022): temporary files and directories, renamed into
place, are created here with that mode, never with :mod:`tempfile`'s private 0600/0700.

Locks are :mod:`filelock`'s descriptor locks: ``flock`` on POSIX, ``LockFileEx`` on Windows,
both released by the system when the holder dies.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import filelock

from trainbus.errors import MapsError, UnsafePathError
from trainbus.events.text import escape_control

_OWNER_FIELD_LENGTH = 200
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)  # a forged link must not redirect what is written
_BINARY = getattr(os, "O_BINARY", 0)  # Windows opens descriptors in text mode otherwise
_ATTEMPTS = 100


def create_file(directory: Path, prefix: str) -> tuple[int, Path]:
    """Create a new file with a random name in ``directory``; its descriptor and path.

    Mode 0666 less the umask, as ``open()`` gives, and never through an existing name or link.
    """
    for _ in range(_ATTEMPTS):
        path = directory / f"{prefix}{secrets.token_hex(4)}"
        try:
            flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _BINARY
            return os.open(path, flags, 0o666), path
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name {prefix}* in {directory}")


def create_directory(directory: Path, prefix: str) -> Path:
    """Create a new directory with a random name in ``directory``, mode 0777 less the umask."""
    for _ in range(_ATTEMPTS):
        path = directory / f"{prefix}{secrets.token_hex(4)}"
        try:
            path.mkdir()
        except FileExistsError:
            continue
        return path
    raise FileExistsError(f"no free temporary name {prefix}* in {directory}")


def open_lock_file(path: Path, *, create: bool) -> int:
    """Open a lock file for :func:`try_lock` (created with the mode ``open()`` gives)."""
    if create:
        return os.open(path, os.O_RDWR | os.O_CREAT | _NOFOLLOW | _BINARY, 0o666)
    return os.open(path, os.O_RDONLY | _BINARY)


def try_lock(descriptor: int) -> bool:
    """Lock an open lock file for this process; ``False`` if another one holds it."""
    return filelock.lock_descriptor(descriptor, blocking=False)


def unlock(descriptor: int) -> None:
    """Release a lock taken by :func:`try_lock` (the descriptor stays open)."""
    filelock.unlock_descriptor(descriptor)


def read_owner(descriptor: int) -> dict[str, Any] | None:
    """The owner record of an open lock file; ``None`` when it is empty or unreadable."""
    owner = None
    # Windows locks byte 0 of a held lock against other readers: the record starts after it.
    for start in (0, 1):
        try:
            os.lseek(descriptor, start, os.SEEK_SET)
            data = os.read(descriptor, 4096)
            owner = json.loads(data) if data.strip() else None
        except OSError:
            continue
        except (ValueError, RecursionError):
            return None
        break
    return owner if isinstance(owner, dict) else None


def write_owner(descriptor: int, record: Mapping[str, Any]) -> None:
    """Replace the owner record of an open lock file, durably (after a padding byte 0)."""
    os.ftruncate(descriptor, 0)
    os.lseek(descriptor, 0, os.SEEK_SET)
    os.write(descriptor, ("\n" + json.dumps(record) + "\n").encode())
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


def check_name(name: str) -> str:
    """Return ``name`` if it is one safe path component, else raise :class:`UnsafePathError`."""
    if (
        not isinstance(name, str)
        or not name
        or name in {".", ".."}
        or "/" in name
        or "\\" in name
        or "\x00" in name
        or any(ord(c) < 32 for c in name)
    ):
        raise UnsafePathError(
            f"name {name!r} cannot be written into a MAPS: it must be one path component "
            "without separators, control characters, '.' or '..'"
        )
    return name


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
