"""A real full disk: the MAPS lives on a 4 MiB tmpfs that a callback fills during training.

No error is injected: every write that needs a new page gets ENOSPC from the kernel. The run
must fail naming what could not be written and why, leave the newest training state whole
and verifiable, release the MAPS, and resume exactly once space is freed.
"""

from __future__ import annotations

import io
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.conftest import make_loader, make_model
from trainbus import (
    Callback,
    LoggerCallback,
    Trainer,
    TrainerState,
    TrainingCheckpointCallback,
    load_weights,
)
from trainbus.engine import checkpoint
from trainbus.engine.maps import Maps
from trainbus.errors import CheckpointError, TrainbusWarning
from trainbus.handlers import priorities

DISK_SIZE = 4 * 1024 * 1024
NO_SPACE = "No space left on device"
FIRST_STATE = "state-0000000006-epoch-end"
"""The state written at the end of epoch 0 (6 batches of 8 samples per epoch)."""
FAILED_STATE = "state-0000000012-epoch-end"
"""The state the end of epoch 1 tries to write on the full disk."""
EPOCHS = 3
STEPS = EPOCHS * 6


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs mounted for the test (needs root and mount(8); skipped otherwise)."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    command = ["mount", "-t", "tmpfs", "-o", f"size={DISK_SIZE}", "tmpfs", str(mount_point)]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"cannot run mount to create a small disk: {exc}")
    if result.returncode != 0:
        pytest.skip(
            f"cannot mount a {DISK_SIZE}-byte tmpfs (root and mount(8) are needed): "
            f"{(result.stderr or result.stdout).strip()}"
        )
    try:
        disk = os.statvfs(mount_point)
        assert disk.f_blocks * disk.f_frsize == DISK_SIZE, "the mount is not the small tmpfs"
        yield mount_point
    finally:
        unmounted = subprocess.run(["umount", str(mount_point)], capture_output=True, check=False)
        if unmounted.returncode != 0:
            # Still busy (an open file of a failed test): detach now, freed once released.
            subprocess.run(["umount", "-l", str(mount_point)], capture_output=True, check=False)


class DiskFiller(Callback):
    """At the end of epoch ``at_epoch`` (0-based), fill the disk until less than a page is free.

    It runs before every checkpoint writer of ``epoch_end`` (and the Trainer writes the
    requested checkpoints only after the dispatch), so those writes meet the full disk.
    """

    priority = priorities.DEFAULT

    def __init__(self, filler: Path, at_epoch: int = 1) -> None:
        self.filler = filler
        self.at_epoch = at_epoch
        self.free_after: int | None = None

    def on_epoch_end(self, *, state: TrainerState) -> None:
        if state.current_epoch != self.at_epoch or self.free_after is not None:
            return
        block = b"\0" * (64 * 1024)
        # Unbuffered: the ENOSPC that ends the loop is the kernel's, not a buffer's on close.
        descriptor = os.open(self.filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            while True:
                os.write(descriptor, block)
        except OSError as exc:
            if exc.strerror != NO_SPACE:
                raise
        finally:
            os.close(descriptor)
        disk = os.statvfs(self.filler)
        self.free_after = disk.f_bavail * disk.f_frsize


def messages(error: BaseException) -> str:
    """The text of ``error`` and of every error it was raised from or during."""
    texts: list[str] = []
    seen: BaseException | None = error
    while seen is not None and len(texts) < 10:
        texts.append(f"{type(seen).__name__}: {seen}")
        texts.extend(getattr(seen, "__notes__", ()))
        seen = seen.__cause__ or seen.__context__
    return "\n".join(texts)


def staged(directory: Path) -> list[str]:
    """Entries a write left half-done: staging, replaced or deleted checkpoint directories."""
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def page_size(path: Path) -> int:
    return os.statvfs(path).f_frsize


def fill_during_training(disk: Path, *, defaults: bool) -> tuple[Path, DiskFiller, BaseException]:
    """Train 3 epochs on ``disk``; the disk fills at the end of epoch 1. Returns the error."""
    maps = disk / "maps"
    filler = DiskFiller(disk / "filler")
    callbacks: list[Callback] = [filler]
    if defaults:
        callbacks.append(LoggerCallback(stream=io.StringIO()))
    else:
        callbacks.append(TrainingCheckpointCallback())
    trainer = Trainer(
        maps, make_model(), callbacks=callbacks, default_callbacks=defaults, max_epochs=EPOCHS
    )
    with pytest.raises(Exception) as caught:  # noqa: PT011  # which class is under test below
        trainer.train(make_loader(shuffle=True), make_loader(16) if defaults else None)
    assert filler.free_after is not None and filler.free_after < page_size(disk)
    return maps, filler, caught.value


def assert_recoverable(maps: Path) -> None:
    """The epoch-0 state is the newest, verifies, and nothing is half-written or locked."""
    handle = Maps(maps)
    found = checkpoint.find_training_state(handle)
    assert found is not None
    assert found.path.name == FIRST_STATE and found.skipped == ()
    assert checkpoint.read_manifest(found.path)["metadata"]["epoch"] == 0
    assert [p.name for p in checkpoint.training_states(handle)] == [FIRST_STATE]
    assert (maps / "training" / "latest").read_text().strip() == FIRST_STATE
    assert staged(maps / "training") == []
    assert staged(maps / "checkpoints") == []
    assert not [p.name for p in maps.iterdir() if p.name.startswith(".maps.json")]
    handle.check_unlocked()  # raises MapsLockedError while the failed run still holds it


def reference_run(path: Path, *, defaults: bool) -> Trainer:
    """The same job, uninterrupted, on an ordinary disk."""
    callbacks: list[Callback] = (
        [LoggerCallback(stream=io.StringIO())] if defaults else [TrainingCheckpointCallback()]
    )
    trainer = Trainer(
        path, make_model(), callbacks=callbacks, default_callbacks=defaults, max_epochs=EPOCHS
    )
    trainer.train(make_loader(shuffle=True), make_loader(16) if defaults else None)
    return trainer


def assert_same_weights(resumed: Trainer, reference: Trainer) -> None:
    mine = resumed.model.state_dict()
    theirs = reference.model.state_dict()
    assert mine.keys() == theirs.keys()
    for name, tensor in theirs.items():
        assert torch.equal(mine[name], tensor), name


@pytest.mark.fault(
    "A full disk (a real 4 MiB tmpfs)",
    outcome=(
        "the run fails with ENOSPC; the previous training state verifies, no staging "
        "directory is left, the MAPS is unlocked, and the resume once space is freed ends "
        "with weights equal to an uninterrupted run's"
    ),
)
def test_a_disk_filled_during_training_keeps_the_last_state_and_resumes_exactly(
    small_disk: Path, tmp_path: Path
) -> None:
    maps, filler, error = fill_during_training(small_disk, defaults=False)
    assert NO_SPACE in messages(error)
    assert_recoverable(maps)

    filler.filler.unlink()
    # The filler is not passed again: its (empty) saved state is reported as unused.
    resumed = Trainer.from_maps(maps, make_model(), callbacks=[TrainingCheckpointCallback()])
    with pytest.warns(TrainbusWarning, match=r"the saved state of \['DiskFiller'\] is not used"):
        state = resumed.train(make_loader(shuffle=True))
    assert state.global_step == STEPS and state.current_epoch == EPOCHS - 1
    assert state.stopped_by is None
    found = checkpoint.find_training_state(Maps(maps))
    assert found is not None and found.path.name == f"state-{STEPS:010d}-epoch-end"
    assert_same_weights(resumed, reference_run(tmp_path / "reference", defaults=False))


@pytest.mark.fault(
    "A full disk (a real 4 MiB tmpfs)",
    outcome="a CheckpointError names the training state, its directory and ENOSPC",
)
def test_a_disk_filled_during_training_reports_a_checkpoint_error_naming_the_state(
    small_disk: Path,
) -> None:
    maps, _, error = fill_during_training(small_disk, defaults=False)
    assert isinstance(error, CheckpointError), messages(error)
    assert str(error).startswith(
        f"cannot write checkpoint {FAILED_STATE!r} under {maps / 'training'}: "
    )
    assert NO_SPACE in str(error)
    assert "the previous checkpoint with this name, if any, is intact" in str(error)


@pytest.mark.fault(
    "A full disk (a real 4 MiB tmpfs)",
    outcome=(
        "with logs, metrics.tsv and model checkpoints competing for space: the newest "
        "training state and the last weights verify, the MAPS is unlocked, and the resume "
        "gives the uninterrupted run's weights and exactly its metrics and loss rows"
    ),
)
def test_a_full_disk_with_every_default_writer_resumes_without_duplicate_rows(
    small_disk: Path, tmp_path: Path
) -> None:
    maps, filler, error = fill_during_training(small_disk, defaults=True)
    assert NO_SPACE in messages(error)
    assert_recoverable(maps)
    manifest = load_weights(maps, make_model(), tag="last")
    assert manifest["metadata"]["epoch"] == 0

    filler.filler.unlink()
    resumed = Trainer.from_maps(
        maps, make_model(), callbacks=[LoggerCallback(stream=io.StringIO())]
    )
    with pytest.warns(TrainbusWarning, match=r"the saved state of \['DiskFiller'\] is not used"):
        state = resumed.train(make_loader(shuffle=True), make_loader(16))
    assert state.global_step == STEPS

    rows = Maps(maps).read_rows("metrics.tsv")
    assert [(row["stage"], row["epoch"]) for row in rows] == [
        ("validation", str(epoch)) for epoch in range(EPOCHS)
    ]
    reference = reference_run(tmp_path / "reference", defaults=True)
    assert rows == reference.maps.read_rows("metrics.tsv")
    assert Maps(maps).read_rows("training_loss.tsv") == reference.maps.read_rows(
        "training_loss.tsv"
    )
    assert_same_weights(resumed, reference)


@pytest.mark.fault(
    "A full disk (a real 4 MiB tmpfs)",
    outcome=(
        "with every default writer on, the error that reaches the user is the first failed "
        "write, naming its path and ENOSPC, not a later failure of the error handling"
    ),
)
def test_a_full_disk_with_every_default_writer_reports_the_first_failed_write(
    small_disk: Path,
) -> None:
    maps, _, error = fill_during_training(small_disk, defaults=True)
    assert isinstance(error, CheckpointError), messages(error)
    assert str(maps) in str(error) and NO_SPACE in str(error)
