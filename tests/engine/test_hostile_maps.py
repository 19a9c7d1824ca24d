"""A hostile or changing MAPS: racing overwrites, a forged lock, links, a deleted directory."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import make_loader, make_model
from trainbus import Callback, Trainer, TrainerState, TrainingCheckpointCallback
from trainbus.engine import checkpoint
from trainbus.engine.maps import Maps
from trainbus.errors import MapsError, MapsExistsError, MapsLockedError, UnsafePathError
from trainbus.handlers import priorities


def old_maps(path: Path, files: int = 0) -> Maps:
    """A finished MAPS as a run leaves it (released lock, maps.json), with ``files`` extra files."""
    maps = Maps(path)
    maps.create()
    maps.lock()
    maps.write_json({"format": "trainbus-maps/1"}, "maps.json")
    maps.unlock()
    for index in range(files):
        maps.write_bytes(b"x", "logs", f"part-{index // 100}", f"{index}.txt")
    return maps


# ------------------------------------------------------------------ racing overwrites
RACER = """
import pathlib, sys, time
from trainbus.engine.maps import Maps
from trainbus.errors import MapsLockedError
path, go, release = sys.argv[1:4]
print("ready", flush=True)
while not pathlib.Path(go).exists():
    time.sleep(0.001)
try:
    maps = Maps(path, overwrite=True)
    maps.create()
    maps.lock()
except MapsLockedError:
    print("locked", flush=True)
    sys.exit(0)
except BaseException as exc:
    print("error", type(exc).__name__, exc, flush=True)
    sys.exit(0)
print("won", flush=True)
deadline = time.monotonic() + 60
while not pathlib.Path(release).exists() and time.monotonic() < deadline:
    time.sleep(0.01)
maps.unlock()
"""


@pytest.mark.fault(
    "Two processes overwriting one MAPS at the same moment",
    outcome="one wins, the other gets MapsLockedError; never a raw FileNotFoundError",
)
@pytest.mark.parametrize("trial", range(2))
def test_two_simultaneous_overwrites_give_one_winner_and_one_maps_locked_error(
    tmp_path: Path, trial: int
) -> None:
    path = tmp_path / "maps"
    old_maps(path, files=600)
    go, release = tmp_path / "go", tmp_path / "release"
    racers = [
        subprocess.Popen(
            [sys.executable, "-c", RACER, str(path), str(go), str(release)],
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    try:
        for racer in racers:
            assert racer.stdout is not None and racer.stdout.readline().strip() == "ready"
        go.touch()
        outcomes = [racer.stdout.readline().strip() for racer in racers if racer.stdout]
        release.touch()
        for racer in racers:
            assert racer.wait(timeout=60) == 0
    finally:
        release.touch()
        for racer in racers:
            if racer.poll() is None:
                racer.kill()
                racer.wait()
    assert sorted(outcomes) == ["locked", "won"], outcomes
    assert sorted(p.name for p in path.iterdir()) == [".lock", "checkpoints", "logs"]
    assert list((path / "logs").iterdir()) == []


def test_an_overwrite_keeps_the_lock_it_took_and_reports_a_dead_owner_once(tmp_path: Path) -> None:
    path = tmp_path / "maps"
    old_maps(path, files=3)
    record = {"pid": 999999, "host": "gone", "since": "then", "command": "train"}
    (path / ".lock").write_text(json.dumps(record))  # killed: never marked released
    maps = Maps(path, overwrite=True)
    maps.create()
    with pytest.raises(MapsLockedError):
        Maps(path, overwrite=True).create()
    assert maps.lock() == record
    assert maps.lock() is None
    maps.unlock()
    assert sorted(p.name for p in path.iterdir()) == [".lock", "checkpoints", "logs"]


def test_an_overwrite_of_a_maps_in_use_deletes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "maps"
    owner = old_maps(path, files=3)
    owner.adopt()
    owner.lock()
    try:
        with pytest.raises(MapsLockedError, match=r"is in use by process \d+"):
            Maps(path, overwrite=True).create()
    finally:
        owner.unlock()
    assert (path / "maps.json").is_file()
    assert len(list((path / "logs").rglob("*.txt"))) == 3


# ------------------------------------------------------------------ a forged lock record
HOSTILE = "\x1b[2J\x1b]0;owned\x07\x9b31m\r\nfake line\u2028\u2029\x85end"


@pytest.fixture
def forged_lock(tmp_path: Path) -> Iterator[Path]:
    """A MAPS whose lock is held (by this test) under a record full of terminal escapes."""
    path = tmp_path / "maps"
    old_maps(path)
    record = {"pid": HOSTILE, "host": HOSTILE, "since": HOSTILE, "command": HOSTILE}
    (path / ".lock").write_text(json.dumps(record))
    descriptor = os.open(path / ".lock", os.O_RDONLY)
    fcntl.flock(descriptor, fcntl.LOCK_EX)
    try:
        yield path
    finally:
        os.close(descriptor)


RAW = ["\x1b", "\x07", "\x9b", "\r", "\n", "\u2028", "\u2029", "\x85"]


@pytest.mark.fault(
    "A forged .lock whose owner fields hold terminal escapes",
    outcome="the MapsLockedError names the owner with every control character escaped",
)
def test_the_owner_fields_of_a_forged_lock_are_escaped_in_the_error(forged_lock: Path) -> None:
    maps = Maps(forged_lock)
    maps.adopt()
    with pytest.raises(MapsLockedError) as caught:
        maps.lock()
    message = str(caught.value)
    assert not [char for char in RAW if char in message], repr(message)
    escaped = r"\x1b[2J\x1b]0;owned\x07\x9b31m\r\nfake line\u2028\u2029\x85end"
    assert message.count(escaped) == 4
    assert "wait for that run to end" in message


def test_a_forged_lock_is_escaped_on_every_path_that_names_its_owner(forged_lock: Path) -> None:
    for attempt in (
        lambda: Maps(forged_lock).check_unlocked(),
        lambda: Maps(forged_lock, overwrite=True).create(),
        lambda: Trainer(forged_lock, make_model(), overwrite=True).train(make_loader()),
    ):
        with pytest.raises(MapsLockedError) as caught:
            attempt()
        assert not [char for char in RAW if char in str(caught.value)]


# ------------------------------------------------------------------ a linked MAPS path
@pytest.mark.fault(
    "overwrite=True through a MAPS path that is a symbolic link",
    outcome="refused with a clear error; nothing deleted through the link",
)
def test_overwrite_through_a_linked_maps_path_is_refused_and_deletes_nothing(
    tmp_path: Path,
) -> None:
    real = tmp_path / "real"
    old_maps(real, files=3)
    link = tmp_path / "link"
    link.symlink_to(real)
    message = r"MAPS path '.*link' is a symbolic link \(to '.*real'\); overwrite=True never"
    with pytest.raises(MapsExistsError, match=message):
        Maps(link, overwrite=True).create()
    trainer = Trainer(link, make_model(), default_callbacks=False, overwrite=True)
    with pytest.raises(MapsExistsError, match=message):
        trainer.train(make_loader())
    assert link.is_symlink()
    assert (real / "maps.json").is_file()
    assert len(list((real / "logs").rglob("*.txt"))) == 3


@pytest.mark.fault(
    "A symlinked checkpoints/, training/ or logs/ inside the MAPS",
    outcome="refused for writing, naming the path; nothing written through the link",
)
@pytest.mark.parametrize("folder", ["checkpoints", "training", "logs"])
def test_a_linked_folder_inside_the_maps_is_refused_for_writing(
    tmp_path: Path, folder: str
) -> None:
    maps = old_maps(tmp_path / "maps")
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.rmtree(maps.path / folder, ignore_errors=True)
    (maps.path / folder).symlink_to(outside)
    message = rf"maps/{folder} is a symbolic link \(to '.*outside'\).*Replace the link"
    with pytest.raises(UnsafePathError, match=message):
        maps.write_bytes(b"x", folder, "file.txt")
    with pytest.raises(UnsafePathError, match=message):
        maps.append_row(["a"], {"a": 1}, folder, "table.tsv")
    with pytest.raises(UnsafePathError, match=message):
        maps.directory(folder)
    assert list(outside.iterdir()) == []


# ------------------------------------------------------------------ a deleted MAPS
DELETED = r"the MAPS '.*maps' was deleted or moved during the run \(nothing is there now\)"
REPLACED = r"the MAPS '.*maps' was deleted or moved during the run \(another directory is there"


@pytest.mark.parametrize("how", ["deleted", "moved-and-replaced"])
def test_every_write_after_the_maps_is_deleted_or_moved_fails_naming_it(
    tmp_path: Path, how: str
) -> None:
    maps = Maps(tmp_path / "maps")
    maps.create()
    maps.write_bytes(b"before", "notes.txt")
    if how == "deleted":
        shutil.rmtree(maps.path)
        message = DELETED
    else:
        maps.path.rename(tmp_path / "elsewhere")
        maps.path.mkdir()
        message = REPLACED
    model = make_model()
    for write in (
        lambda: maps.write_bytes(b"after", "notes.txt"),
        lambda: maps.write_json({"a": 1}, "maps.json"),
        lambda: maps.append_row(["a"], {"a": 1}, "metrics.tsv"),
        lambda: maps.directory("checkpoints"),
        lambda: maps.lock(),
        lambda: maps.create(),
        lambda: checkpoint.save_weights(maps, "last", model, metadata={}),
        lambda: checkpoint.save_training_state(
            maps, "state-0000000001", model, tensors={}, document={}, metadata={}
        ),
    ):
        with pytest.raises(MapsError, match=message):
            write()
    if how == "deleted":
        assert not maps.path.exists()  # never recreated
    else:
        assert list(maps.path.iterdir()) == []


def test_an_adopted_maps_deleted_during_the_run_is_detected_too(tmp_path: Path) -> None:
    maps = Maps(tmp_path / "maps")
    old_maps(maps.path)
    maps.adopt()
    shutil.rmtree(maps.path)
    with pytest.raises(MapsError, match=DELETED):
        maps.write_json({}, "maps.json")
    assert not maps.path.exists()


class DeleteTheMaps(Callback):
    """Deletes the MAPS at the end of the first epoch, before any checkpoint of it is written."""

    priority = priorities.DEFAULT

    def on_epoch_end(self, *, maps: Maps, state: TrainerState) -> None:
        if state.current_epoch == 0:
            shutil.rmtree(maps.path)


@pytest.mark.fault(
    "The MAPS deleted during a training run",
    outcome="detected at the next write: the call fails naming the MAPS; nothing recreated",
)
def test_a_training_whose_maps_is_deleted_fails_at_the_next_write(maps_path: Path) -> None:
    trainer = Trainer(
        maps_path,
        make_model(),
        callbacks=[DeleteTheMaps(), TrainingCheckpointCallback()],
        default_callbacks=False,
        max_epochs=2,
    )
    with pytest.raises(MapsError, match=DELETED):
        trainer.train(make_loader())
    assert not maps_path.exists()
