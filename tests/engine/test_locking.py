"""The MAPS lock is filelock's descriptor lock on every platform, with its owner record.

``flock`` on POSIX and ``LockFileEx`` on Windows (which locks byte 0 against other readers:
the owner record starts after a padding byte). The same code runs on Linux and Windows, so
these tests exercise the path Windows takes, through the system's real locks.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from trainbus import Maps
from trainbus.engine import files
from trainbus.engine import maps as maps_module
from trainbus.errors import MapsLockedError

ROOT = Path(__file__).parents[2]

HOLDER = """
import sys, time
from trainbus import Maps
maps = Maps(sys.argv[1])
maps.create()
maps.lock()
maps.write_json({"calls": []}, "maps.json")
print("locked", flush=True)
time.sleep(120)
"""


def test_the_maps_module_locks_without_fcntl() -> None:
    source = Path(maps_module.__file__).read_text()
    assert "fcntl" not in source  # a platform without it must not go unlocked


def test_two_handles_in_one_process_contend_and_the_record_names_the_owner(
    tmp_path: Path,
) -> None:
    first = Maps(tmp_path / "maps")
    first.create()
    assert first.lock() is None
    first.write_json({"calls": []}, "maps.json")
    second = Maps(tmp_path / "maps")
    second.adopt()
    with pytest.raises(MapsLockedError, match=rf"in use by process {os.getpid()} on "):
        second.lock()
    with pytest.raises(MapsLockedError, match=rf"in use by process {os.getpid()} on "):
        second.check_unlocked()
    raw = (tmp_path / "maps" / ".lock").read_bytes()
    assert raw.startswith(b"\n{")  # byte 0, which Windows locks, holds no part of the record
    first.unlock()
    assert json.loads(raw)["pid"] == os.getpid()
    assert second.lock() is None  # released: taken, and no dead owner to report
    second.unlock()


def test_another_process_holding_the_maps_is_named_and_its_death_releases_it(
    tmp_path: Path,
) -> None:
    path = tmp_path / "maps"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(path)], stdout=subprocess.PIPE, text=True, cwd=ROOT
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        contender = Maps(path)
        contender.adopt()
        with pytest.raises(MapsLockedError, match=rf"in use by process {holder.pid} on "):
            contender.lock()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    stale = contender.lock()
    assert stale is not None and stale["pid"] == holder.pid  # the dead owner, reported
    contender.unlock()


def test_an_owner_record_without_the_padding_byte_is_still_read(tmp_path: Path) -> None:
    lock = tmp_path / ".lock"
    lock.write_text(json.dumps({"pid": 12, "host": "old"}) + "\n")
    descriptor = files.open_lock_file(lock, create=False)
    try:
        assert files.read_owner(descriptor) == {"pid": 12, "host": "old"}
    finally:
        os.close(descriptor)
