"""Asynchronous checkpoints: written on a background thread, announced on the training thread.

Real training and real files; a write is held or slowed at a file fsync so that it is still
running when training goes on (the write itself is the real one).
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import make_loader, make_model
from trainbus import (
    Callback,
    ModelCheckpointCallback,
    MonitorCallback,
    Trainer,
    TrainerState,
    TrainingCheckpointCallback,
)
from trainbus.engine import checkpoint
from trainbus.engine.maps import Maps
from trainbus.errors import CheckpointError, TrainingInterrupted
from trainbus.handlers import priorities

from .test_distributed import COMMON, assert_equal_weights, job_command, launch, run_group
from .test_full_disk import (
    FIRST_STATE,
    NO_SPACE,
    DiskFiller,
    assert_recoverable,
    messages,
    small_disk,  # noqa: F401  # the fixture
)
from .test_resume import assert_same_nested

WAIT = 10.0
"""Seconds a held write or a probe waits at most: a failing test ends, it never hangs."""


class Probe(Callback):
    """Records every ``checkpoint`` event: its thread, the iteration, and whether it verifies."""

    priority = priorities.DEFAULT

    def __init__(self, at_batch_end: Callable[[int], None] | None = None) -> None:
        self.events: list[dict[str, Any]] = []
        self.at_batch_end = at_batch_end
        self.iteration = 0

    def on_batch_end(self, *, state: TrainerState) -> None:
        self.iteration = state.iteration
        if self.at_batch_end is not None:
            self.at_batch_end(state.iteration)

    def on_checkpoint(self, *, checkpoint: Path, tag: str, kind: str) -> None:
        manifest = checkpoint_module_read(checkpoint)
        self.events.append(
            {
                "tag": tag,
                "kind": kind,
                "thread": threading.get_ident(),
                "iteration": self.iteration,
                "written_at": manifest["metadata"]["iteration"],
            }
        )


def checkpoint_module_read(path: Path) -> dict[str, Any]:
    return checkpoint.read_manifest(path)  # verifies every file: the commit is done


@pytest.fixture
def fsyncs(monkeypatch: pytest.MonkeyPatch) -> list[Callable[[Path], None]]:
    """Hooks run before the n-th file fsync of a checkpoint write (list index n - 1)."""
    hooks: list[Callable[[Path], None]] = []
    original = checkpoint._fsync_file
    count = [0]

    def fsync(path: Path) -> None:
        count[0] += 1
        if count[0] <= len(hooks):
            hooks[count[0] - 1](path)
        original(path)

    monkeypatch.setattr(checkpoint, "_fsync_file", fsync)
    return hooks


def states(maps: Path) -> list[str]:
    return sorted(p.name for p in checkpoint.training_states(Maps(maps)))


def writer_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "trainbus-checkpoint" and t.is_alive()]


def train_states(
    maps: Path,
    *,
    asynchronous: bool,
    probe: Probe | None = None,
    extra: list[Callback] | None = None,
    **options: Any,
) -> Trainer:
    callback = TrainingCheckpointCallback(
        every_n_epochs=None, every_n_steps=2, keep=2, asynchronous=asynchronous
    )
    callbacks: list[Callback] = [callback] + ([probe] if probe else []) + (extra or [])
    trainer = Trainer(maps, make_model(), callbacks=callbacks, default_callbacks=False, **options)
    trainer.train(make_loader(shuffle=True))
    return trainer


def test_training_goes_on_while_a_state_is_written_and_its_event_follows_the_commit(
    tmp_path: Path, fsyncs: list[Callable[[Path], None]]
) -> None:
    entered, release = threading.Event(), threading.Event()
    seen: dict[str, Any] = {}

    def hold(path: Path) -> None:
        entered.set()
        seen["released"] = release.wait(WAIT)  # False if training waited for this write

    def at_batch_end(iteration: int) -> None:
        if iteration == 3:  # the state of step 2 was asked for one step earlier
            seen["entered"] = entered.wait(WAIT)
            seen["committed"] = (tmp_path / "async" / "training" / "state-0000000002").exists()
            release.set()

    fsyncs.append(hold)
    probe = Probe(at_batch_end)
    trainer = train_states(tmp_path / "async", asynchronous=True, probe=probe, max_epochs=2)
    assert seen == {"entered": True, "committed": False, "released": True}
    assert not writer_threads()
    main = threading.get_ident()
    assert all(event["thread"] == main for event in probe.events)
    first = probe.events[0]
    assert first["tag"] == "state-0000000002" and first["iteration"] >= 3
    # Every state asked for was committed and announced once, in order, before train() ended.
    written = [event["written_at"] for event in probe.events]
    assert written == sorted(written) and written[-1] == trainer.state.iteration == 12
    assert [e["tag"] for e in probe.events].count("state-0000000012-epoch-end") == 1

    reference = train_states(tmp_path / "sync", asynchronous=False, probe=Probe(), max_epochs=2)
    assert states(tmp_path / "async") == states(tmp_path / "sync")
    latest = (tmp_path / "async" / "training" / "latest").read_text()
    assert latest == (tmp_path / "sync" / "training" / "latest").read_text()
    for name in states(tmp_path / "sync"):
        mine, theirs = (
            checkpoint.load_training_state(root / "training" / name)
            for root in (tmp_path / "async", tmp_path / "sync")
        )
        assert_same_nested(theirs[0], mine[0])  # weights
        assert_same_nested(theirs[1], mine[1])  # optimizers, random states, callbacks
        assert mine[2]["state"] == theirs[2]["state"]
        assert mine[2]["position"] == theirs[2]["position"]
    for name, tensor in reference.model.state_dict().items():
        assert torch.equal(trainer.model.state_dict()[name], tensor), name


def test_a_save_asked_while_the_previous_is_written_waits_and_the_wait_is_counted(
    tmp_path: Path, fsyncs: list[Callable[[Path], None]]
) -> None:
    fsyncs.append(lambda path: time.sleep(0.3))  # far longer than the 2 steps to the next
    trainer = train_states(tmp_path / "maps", asynchronous=True, max_epochs=1)
    writer = trainer._saver.background
    assert writer.waits >= 1 and writer.wait_seconds >= 0.1
    assert states(tmp_path / "maps") == ["state-0000000006", "state-0000000006-epoch-end"]

    fsyncs.clear()
    synchronous = train_states(tmp_path / "sync", asynchronous=False, max_epochs=1)
    assert synchronous._saver.background.waits == 0


def test_the_monitor_reports_the_saves_that_waited_for_the_previous_write(
    tmp_path: Path, fsyncs: list[Callable[[Path], None]]
) -> None:
    fsyncs.append(lambda path: time.sleep(0.3))  # far longer than the 2 steps to the next
    payloads: list[float] = []

    class Waits(Callback):
        def on_checkpoint(self, *, waited: float) -> None:
            payloads.append(waited)

    table = io.StringIO()
    trainer = train_states(
        tmp_path / "maps",
        asynchronous=True,
        probe=None,
        extra=[Waits(), MonitorCallback(stream=table)],
        max_epochs=1,
    )
    writer = trainer._saver.background
    assert writer.waits >= 1
    # The save that waited says so in its `checkpoint` event, the others carry 0.0.
    assert sum(1 for w in payloads if w > 0) == writer.waits
    assert sum(payloads) == pytest.approx(writer.wait_seconds)
    report = json.loads((tmp_path / "maps" / "monitor.json").read_text())
    assert report["checkpoint_waits"]["count"] == writer.waits
    assert report["checkpoint_waits"]["seconds"] == pytest.approx(writer.wait_seconds, abs=1e-5)
    assert f"{writer.waits} waited" in table.getvalue()
    assert "for the previous background write" in table.getvalue()


def test_a_stop_signal_finishes_the_background_write_then_writes_its_own_state(
    tmp_path: Path, fsyncs: list[Callable[[Path], None]]
) -> None:
    # The state of step 4 is still being written when the signal's boundary comes.
    fsyncs.extend([lambda path: None] * 3 + [lambda path: time.sleep(0.5)])

    def at_batch_end(iteration: int) -> None:
        if iteration == 5:
            os.kill(os.getpid(), signal.SIGTERM)

    probe = Probe(at_batch_end)
    with pytest.raises((SystemExit, TrainingInterrupted)):
        train_states(tmp_path / "maps", asynchronous=True, probe=probe, max_epochs=2)
    assert not writer_threads()
    tags = [event["tag"] for event in probe.events]
    # The in-flight state is announced first; train_end asks for the signal's state again.
    assert tags[:3] == ["state-0000000002", "state-0000000004", "state-0000000005"]
    assert set(tags[3:]) <= {"state-0000000005"}
    assert (tmp_path / "maps" / "training" / "latest").read_text().strip() == tags[-1]
    found = checkpoint.find_training_state(Maps(tmp_path / "maps"))
    assert found is not None and found.path.name == tags[-1] and found.skipped == ()


def test_asynchronous_weights_keep_the_same_ranking_and_files_as_synchronous_ones(
    tmp_path: Path, fsyncs: list[Callable[[Path], None]]
) -> None:
    kept: dict[bool, ModelCheckpointCallback] = {}
    for asynchronous in (True, False):
        # Slow writes: each epoch's saves are asked while the previous epoch's run.
        fsyncs[:] = [lambda path: time.sleep(0.05)] * (200 if asynchronous else 0)
        callback = ModelCheckpointCallback("loss", top_k=2, asynchronous=asynchronous)
        kept[asynchronous] = callback
        trainer = Trainer(
            tmp_path / str(asynchronous),
            make_model(),
            callbacks=[callback],
            default_callbacks=False,
            max_epochs=5,
        )
        trainer.train(make_loader(shuffle=True), make_loader(16, seed=3))
    assert kept[True].state_dict() == kept[False].state_dict()
    assert kept[True].state_dict()["pending"] == []
    roots = [tmp_path / str(asynchronous) / "checkpoints" for asynchronous in (True, False)]
    names = [sorted(p.name for p in root.iterdir()) for root in roots]
    assert names[0] == names[1] and len(names[0]) == 4  # 2 ranked, best, last
    for name in names[0]:
        mine, theirs = ((root / name / checkpoint.WEIGHTS).read_bytes() for root in roots)
        assert mine == theirs, name


class FillerAfterCommit(DiskFiller):
    """Fills the disk once the previous background write is done: only the next one fails.

    On a loaded machine the state of epoch 0 can still be in flight at the end of epoch 1;
    filling then would fail that write instead of the one under test.
    """

    def __init__(self, filler: Path, committed: str = FIRST_STATE) -> None:
        super().__init__(filler)
        self.committed = committed
        """The state ``training/latest`` names once the previous write is done."""

    def on_epoch_end(self, *, state: TrainerState) -> None:
        if state.current_epoch == self.at_epoch:
            latest = self.filler.parent / "maps" / "training" / "latest"
            deadline = time.monotonic() + WAIT
            while time.monotonic() < deadline and not (
                latest.is_file() and latest.read_text().strip() == self.committed
            ):
                time.sleep(0.01)
        super().on_epoch_end(state=state)


@pytest.mark.fault(
    "A full disk during an asynchronous training-state write (a real 4 MiB tmpfs)",
    outcome="the error (ENOSPC, named) is raised at the next boundary (the next epoch's end) "
    "and stops training there; the previous state verifies, nothing is half-written, the MAPS "
    "is unlocked",
)
def test_a_failed_background_write_stops_training_at_the_next_boundary(
    small_disk: Path,  # noqa: F811  # the fixture imported above
) -> None:
    maps = small_disk / "maps"
    filler = FillerAfterCommit(small_disk / "filler")
    trainer = Trainer(
        maps,
        make_model(),
        callbacks=[filler, TrainingCheckpointCallback(asynchronous=True)],
        default_callbacks=False,
        max_epochs=4,
    )
    with pytest.raises(CheckpointError) as caught:
        trainer.train(make_loader(shuffle=True))
    assert NO_SPACE in messages(caught.value)
    assert "cannot write checkpoint 'state-0000000012-epoch-end'" in str(caught.value)
    assert "written in the background" in messages(caught.value)
    assert trainer.state.global_step == 18  # the end of the next epoch: no further epoch
    assert not writer_threads()
    assert_recoverable(maps)


@pytest.mark.slow
@pytest.mark.fault(
    "A full disk during a background save under torchrun (2 processes)",
    outcome=(
        "every rank fails with ENOSPC naming the state; the previous training state verifies, "
        "no staging directory is left, the MAPS is unlocked, and the resume under torchrun "
        "once space is freed ends with weights equal to an uninterrupted run's"
    ),
)
def test_a_full_disk_under_torchrun_fails_every_rank_and_resumes_exactly(
    small_disk: Path,  # noqa: F811  # the fixture imported above
    tmp_path: Path,
) -> None:
    # 128 samples, 8 per rank and step: 8 steps an epoch. Rank 0 fills the disk at the end
    # of epoch 1, once the writes of epoch 0 are committed: the weights and the state of
    # epoch 1, written in the background, meet the full disk; the ranks learn it together.
    options = (
        *COMMON, "--shuffle", "--dropout", "0.3", "--rank-seeds", "--asynchronous",
        "--best-weights",
    )  # fmt: skip
    straight = launch(tmp_path, *options, name="straight")
    maps, filler = small_disk / "maps", small_disk / "filler"
    fill = ("--fill-disk", str(filler), "--fill-after", "state-0000000008-epoch-end")
    returncode, output = run_group(job_command(maps, tmp_path / "failed", *options, *fill))
    assert returncode != 0
    for rank in (0, 1):
        failed = re.search(rf"\[rank{rank}\]: trainbus.errors.CheckpointError: (.*)", output)
        assert failed is not None, output[-6000:]
        assert re.match(
            r"cannot write checkpoint '(best-loss|last|state-0000000016-epoch-end)' .*"
            r"No space left on device",
            failed.group(1),
        )
    assert "written in the background (asynchronous=True)" in output
    found = checkpoint.find_training_state(Maps(maps))
    assert found is not None and found.path.name == "state-0000000008-epoch-end"
    for folder in ("training", "checkpoints"):
        assert not [p.name for p in (maps / folder).iterdir() if p.name.startswith(".")]
    Maps(maps).check_unlocked()
    filler.unlink()
    resumed = tmp_path / "resumed"
    returncode, output = run_group(job_command(maps, resumed, *options, "--resume"))
    assert returncode == 0, output[-6000:]
    recorded = json.loads((maps / "maps.json").read_text())
    resumed_from = [c["resumed_from"]["state"] for c in recorded["calls"] if "resumed_from" in c]
    assert resumed_from == ["state-0000000008-epoch-end"]
    for rank in (0, 1):
        weights = torch.load(resumed / f"rank{rank}.pt")
        assert_equal_weights(weights, straight.weights(rank))
