"""Run naming: ``maps="runs/digits/v{version}"`` takes the next free number, or the newest one.

``{version}`` stands for a number in the last component of a MAPS path. A new run gets one more
than the highest number of the directories already there that match the pattern (1 when there
is none: ``v1``, ``v2``, ...). The chosen directory is created empty at once: creating a
directory is atomic, so it is the lock that reserves the number, and of two runs started at the
same moment (in two processes, or on two machines sharing the directory) each gets its own.
:meth:`~trainbus.Trainer.from_maps` takes the newest existing one instead.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal

from trainbus.errors import ConfigurationError, MapsError

VERSION = "{version}"


def choose(
    path: str | os.PathLike[str], *, overwrite: bool, version: Literal["next", "latest"]
) -> str | os.PathLike[str]:
    """``path`` itself, or the directory its ``{version}`` names (printed on stdout).

    ``version="next"``: a new directory, reserved now; ``"latest"``: the newest existing one.
    A pattern with ``overwrite=True`` is refused: it always names a new directory.
    """
    if version not in ("next", "latest"):
        raise ConfigurationError(
            f"version={version!r} is not 'next' or 'latest'; it says which number {VERSION} "
            "in the MAPS path stands for: a new run's, or the newest existing run's"
        )
    text = os.fspath(path)
    if not isinstance(text, str) or ("{" not in text and "}" not in text):
        return path
    if overwrite:
        raise ConfigurationError(
            f"maps={text!r} with overwrite=True: {VERSION} always names a directory that does "
            "not exist yet, so there is nothing to replace; drop overwrite=True, or name the "
            "directory to replace"
        )
    chosen = resolve(text, latest=version == "latest")
    print(f"trainbus: MAPS {chosen}", flush=True)
    return chosen


def resolve(pattern: str, *, latest: bool) -> str:
    """The directory ``pattern`` names: a new one reserved now, or (``latest``) the newest.

    Returns the pattern with the number in place of ``{version}``. Raises
    :class:`ConfigurationError` for a pattern it cannot use, and :class:`MapsError` when
    the directory cannot be created or (``latest``) none exists yet.
    """
    parent, prefix, suffix = _split(pattern)
    matcher = re.compile(re.escape(prefix) + r"(\d+)" + re.escape(suffix))
    if not latest:
        _check_one_process(pattern)
    try:
        folder = Path(parent or ".")
        if not latest:
            folder.mkdir(parents=True, exist_ok=True)
        numbers = [
            int(found.group(1))
            for entry in (os.listdir(folder) if folder.is_dir() else [])
            if (found := matcher.fullmatch(entry)) and (not latest or (folder / entry).is_dir())
        ]
        if latest:
            if not numbers:
                raise MapsError(
                    f"maps={pattern!r} asks for the newest run, but no directory in "
                    f"{str(folder.absolute())!r} matches it; train one first, or pass "
                    "the path of the MAPS"
                )
            return _named(parent, prefix, max(numbers), suffix)
        number = max(numbers, default=0) + 1
        while True:
            chosen = _named(parent, prefix, number, suffix)
            try:
                os.mkdir(chosen)
            except FileExistsError:  # another run took this number first
                number += 1
                continue
            return chosen
    except OSError as exc:
        raise MapsError(
            f"cannot choose a directory for maps={pattern!r} in {str(Path(parent or '.'))!r}: "
            f"{exc.strerror or exc}; check that the directory exists or can be created, and "
            "is writable"
        ) from exc


def _check_one_process(pattern: str) -> None:
    """Refuse a new number under torchrun: each rank would reserve a directory of its own."""
    try:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        world_size = 1  # the Trainer's placement check reports a malformed WORLD_SIZE
    if world_size > 1:
        raise ConfigurationError(
            f"maps={pattern!r} takes a new number in each process, but this run has "
            f"WORLD_SIZE={world_size} processes, which must share one MAPS; choose the "
            "directory before launching torchrun (e.g. pass it to the script as an argument)"
        )


def _named(parent: str, prefix: str, number: int, suffix: str) -> str:
    name = f"{prefix}{number}{suffix}"
    return os.path.join(parent, name) if parent else name


def _split(pattern: str) -> tuple[str, str, str]:
    """The parent directory, and the text before and after ``{version}`` in the last part."""
    problem = None
    if pattern.count(VERSION) != 1:
        problem = f"it holds {VERSION} {pattern.count(VERSION)} times"
    elif pattern.replace(VERSION, "").count("{") or pattern.replace(VERSION, "").count("}"):
        problem = "it holds braces other than {version}"
    parent, name = os.path.split(pattern)
    if problem is None and VERSION not in name:
        problem = "{version} is not in its last component"
    if problem is not None:
        raise ConfigurationError(
            f"maps={pattern!r} cannot be used: {problem}; a MAPS path may hold {VERSION} "
            "once, in its last component (e.g. maps='runs/digits/v{version}'), and no other "
            "braces"
        )
    prefix, suffix = name.split(VERSION)
    return parent, prefix, suffix
