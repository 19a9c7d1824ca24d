"""Training states on disk: commit, verification with fallback, rotation, hostile files, and the
Trainer's resume entry points (``train(resume=True)`` and ``Trainer.from_maps``)."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import make_loader, make_model
from trainbus import (
    SaveTrainingState,
    Stop,
    Trainer,
    TrainerState,
    TrainingCheckpointCallback,
    load_weights,
)
from trainbus.engine import checkpoint
from trainbus.engine.maps import Maps
from trainbus.errors import (
    CheckpointError,
    CorruptCheckpointError,
    MapsError,
    TrainbusWarning,
)


def trained(path: Path, *, epochs: int = 3, **options: Any) -> Trainer:
    trainer = Trainer(
        path,
        make_model(),
        callbacks=[TrainingCheckpointCallback(keep=10)],
        default_callbacks=False,
        max_epochs=epochs,
        **options,
    )
    trainer.train(make_loader(shuffle=True))
    return trainer


def states(path: Path) -> list[str]:
    return [p.name for p in checkpoint.training_states(Maps(path))]


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_each_epoch_commits_a_verified_state_and_moves_the_latest_pointer(maps_path: Path) -> None:
    trained(maps_path)
    assert states(maps_path) == [
        "state-0000000018-epoch-end",
        "state-0000000012-epoch-end",
        "state-0000000006-epoch-end",
    ]
    assert (maps_path / "training" / "latest").read_text().strip() == states(maps_path)[0]
    found = checkpoint.find_training_state(Maps(maps_path))
    assert found is not None and found.skipped == ()
    assert set(found.manifest["files"]) == {"model.safetensors", "trainer.pt", "state.json"}
    assert found.manifest["metadata"]["requested_by"] == ("TrainingCheckpointCallback.on_epoch_end")
    document = json.loads((found.path / "state.json").read_text())
    assert document["position"] == {"epoch": 3, "batches_done": 0, "in_epoch": False}
    assert document["state"]["global_step"] == 18
    assert not [p for p in (maps_path / "training").iterdir() if p.name.startswith(".")]


DAMAGE = {
    "flipped-byte": lambda d: flip_byte(d / "model.safetensors"),
    "truncated": lambda d: (d / "trainer.pt").write_bytes((d / "trainer.pt").read_bytes()[:50]),
    "missing-file": lambda d: (d / "state.json").unlink(),
    "missing-manifest": lambda d: (d / "manifest.json").unlink(),
    "garbled-manifest": lambda d: (d / "manifest.json").write_text("{not json"),
}


@pytest.mark.fault(
    (
        "A damaged newest training state: flipped byte, truncated or missing file, missing or"
        " garbled manifest"
    ),
    outcome="reported as corrupt, by name; the newest valid state is used",
)
@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_newest_state_is_named_corrupt_and_passed_over(
    maps_path: Path, damage: str
) -> None:
    trained(maps_path)
    newest, previous = states(maps_path)[:2]
    DAMAGE[damage](maps_path / "training" / newest)
    found = checkpoint.find_training_state(Maps(maps_path))
    assert found is not None
    assert found.path.name == previous
    assert newest in found.skipped[0] and "corrupt" in found.skipped[0]


@pytest.mark.fault(
    "A missing, stale or garbage latest pointer",
    outcome="the newest valid state is used",
)
@pytest.mark.parametrize("pointer", ["missing", "stale", "garbage"])
def test_the_latest_pointer_never_decides_alone(maps_path: Path, pointer: str) -> None:
    trained(maps_path)
    latest = maps_path / "training" / "latest"
    if pointer == "missing":
        latest.unlink()
    else:
        latest.write_text("state-0000000006-epoch-end\n" if pointer == "stale" else "\x00../x")
    found = checkpoint.find_training_state(Maps(maps_path))
    assert found is not None and found.path.name == "state-0000000018-epoch-end"
    assert bool(found.skipped) == (pointer != "missing")


@pytest.mark.fault(
    "Every training state corrupt",
    outcome="an error naming each of them; nothing resumed",
)
def test_when_every_state_is_corrupt_the_error_names_them_all(maps_path: Path) -> None:
    trained(maps_path, epochs=2)
    for name in states(maps_path):
        flip_byte(maps_path / "training" / name / "trainer.pt")
    with pytest.raises(CorruptCheckpointError, match="every training state") as caught:
        checkpoint.find_training_state(Maps(maps_path))
    assert all(name in str(caught.value) for name in states(maps_path))


def test_rotation_keeps_the_newest_and_never_a_protected_one(maps_path: Path) -> None:
    trained(maps_path, epochs=4)
    oldest = maps_path / "training" / "state-0000000006-epoch-end"
    removed = checkpoint.rotate_training_states(Maps(maps_path), 1, protect=[oldest])
    assert [p.name for p in removed] == ["state-0000000018-epoch-end", "state-0000000012-epoch-end"]
    assert states(maps_path) == ["state-0000000024-epoch-end", "state-0000000006-epoch-end"]


class Exploit:
    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, ("touch pwned",))


@pytest.mark.fault(
    "A malicious pickle in a training state, with TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1",
    outcome="refused naming the offending global; nothing executed",
)
def test_a_malicious_pickle_is_refused_even_when_the_environment_forces_unsafe_loading(
    maps_path: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    trained(maps_path, epochs=1)
    directory = maps_path / "training" / states(maps_path)[0]
    (directory / "trainer.pt").write_bytes(pickle.dumps({"optimizers": Exploit()}, protocol=2))
    manifest = json.loads((directory / "manifest.json").read_text())
    manifest["files"]["trainer.pt"] = checkpoint._digest(directory / "trainer.pt")
    (directory / "manifest.json").write_text(json.dumps(manifest))  # a consistent forgery
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match=r"refused to load .*trainer\.pt.*system"):
        checkpoint.load_training_state(directory)
    assert not (tmp_path / "pwned").exists()


# ------------------------------------------------------------------ Trainer entry points
def test_resume_true_without_a_maps_starts_afresh(maps_path: Path) -> None:
    trainer = Trainer(maps_path, make_model(), default_callbacks=False, max_epochs=1)
    state = trainer.train(make_loader(), resume=True)
    assert state.global_step == 6
    assert "resumed_from" not in trainer.maps.read_json("maps.json")["calls"][-1]


def test_resume_true_on_a_maps_without_states_is_refused_and_changes_nothing(
    maps_path: Path,
) -> None:
    Trainer(maps_path, make_model(), default_callbacks=False, max_epochs=1).train(make_loader())
    before = {p: p.read_bytes() for p in maps_path.rglob("*") if p.is_file()}
    again = Trainer(maps_path, make_model(), default_callbacks=False, max_epochs=2)
    with pytest.raises(CheckpointError, match=r"no training state to resume from.*overwrite=True"):
        again.train(make_loader(), resume=True)
    assert {p: p.read_bytes() for p in maps_path.rglob("*") if p.is_file()} == before


def test_resume_quarantines_a_corrupt_newer_state_with_a_warning(maps_path: Path) -> None:
    trained(maps_path, epochs=2)
    flip_byte(maps_path / "training" / "state-0000000012-epoch-end" / "model.safetensors")
    trainer = Trainer.from_maps(
        maps_path,
        make_model(),
        callbacks=[TrainingCheckpointCallback(keep=10)],
        default_callbacks=False,
    )
    with pytest.warns(TrainbusWarning, match="state-0000000012-epoch-end.*corrupt"):
        trainer.train(make_loader(shuffle=True))
    assert (maps_path / "training" / "corrupt-state-0000000012-epoch-end").is_dir()
    record = trainer.maps.read_json("maps.json")["calls"][-1]["resumed_from"]
    assert record["state"] == "state-0000000006-epoch-end"
    assert trainer.state.global_step == 12


def test_from_maps_reuses_the_recorded_settings_and_accepts_overrides(maps_path: Path) -> None:
    with pytest.warns(TrainbusWarning, match="initial weights were not seeded"):
        trained(maps_path, epochs=2, log_every_n_batches=2, accumulate_grad_batches=2, seed=3)
    trainer = Trainer.from_maps(
        maps_path,
        make_model(),
        callbacks=[TrainingCheckpointCallback()],
        default_callbacks=False,
        max_epochs=3,
    )
    assert (trainer.max_epochs, trainer.log_every_n_batches) == (3, 2)
    assert (trainer.accumulate_grad_batches, trainer.seed) == (2, 3)
    state = trainer.train(make_loader(shuffle=True))
    assert (state.current_epoch, state.global_step) == (2, 9)
    calls = trainer.maps.read_json("maps.json")["calls"]
    assert [c["call"] for c in calls] == ["train", "train"]
    assert calls[-1]["resumed_from"]["state"] == "state-0000000012-epoch-end"


def test_from_maps_keeps_the_default_callbacks_the_run_had(maps_path: Path) -> None:
    trained(maps_path, epochs=1)
    trainer = Trainer.from_maps(maps_path, make_model(), callbacks=[TrainingCheckpointCallback()])
    assert [type(c) for c in trainer.callbacks] == [TrainingCheckpointCallback]


def test_from_maps_refuses_a_directory_that_is_not_a_maps(tmp_path: Path) -> None:
    with pytest.raises(MapsError, match="not a trainbus MAPS"):
        Trainer.from_maps(tmp_path, make_model())


def test_resuming_a_finished_run_trains_no_further(maps_path: Path) -> None:
    trained(maps_path, epochs=2)
    trainer = Trainer.from_maps(
        maps_path, make_model(), callbacks=[TrainingCheckpointCallback()], default_callbacks=False
    )
    seen: list[str] = []
    for event in ("train_start", "resume", "epoch_start", "train_end"):
        trainer.on(event)(lambda event=event: seen.append(event))
    state = trainer.train(make_loader(shuffle=True))
    assert seen == ["train_start", "resume", "train_end"]
    assert state.global_step == 12


def test_a_mid_epoch_state_is_refused_for_a_loader_of_another_length(maps_path: Path) -> None:
    class InterruptError(Exception):
        pass

    trainer = Trainer(
        maps_path,
        make_model(),
        callbacks=[TrainingCheckpointCallback(every_n_steps=4)],
        default_callbacks=False,
        max_epochs=2,
    )

    @trainer.on("checkpoint")
    def interrupt(*, kind: str) -> None:
        if kind == "training":
            raise InterruptError

    with pytest.raises(InterruptError):
        trainer.train(make_loader())
    resumed = Trainer.from_maps(maps_path, make_model(), default_callbacks=False)
    with pytest.raises(CheckpointError, match=r"stopped after batch 4 of an epoch of 6.* has 3"):
        resumed.train(make_loader(batch_size=16))


def test_callbacks_that_differ_from_the_saved_ones_are_named_in_a_warning(
    maps_path: Path,
) -> None:
    trained(maps_path, epochs=1)
    trainer = Trainer.from_maps(maps_path, make_model(), default_callbacks=False, max_epochs=2)
    with pytest.warns(
        TrainbusWarning, match=r"the saved state of \['TrainingCheckpointCallback'\]"
    ):
        trainer.train(make_loader(shuffle=True))


def test_a_handler_may_ask_for_a_training_state_and_one_is_written_per_boundary(
    maps_path: Path,
) -> None:
    trainer = Trainer(maps_path, make_model(), default_callbacks=False, max_epochs=1)
    written: list[str] = []

    @trainer.on("batch_end")
    def twice(*, state: TrainerState) -> list[SaveTrainingState] | None:
        return [SaveTrainingState("a"), SaveTrainingState("b")] if state.iteration == 2 else None

    @trainer.on("checkpoint")
    def record(*, tag: str, kind: str) -> None:
        written.append(f"{kind}:{tag}")

    trainer.train(make_loader())
    assert written == ["training:state-0000000002"]


def test_with_accumulation_a_state_waits_for_the_end_of_the_group(maps_path: Path) -> None:
    trainer = Trainer(
        maps_path, make_model(), default_callbacks=False, max_epochs=1, accumulate_grad_batches=4
    )

    @trainer.on("batch_end")
    def ask(*, state: TrainerState) -> SaveTrainingState | None:
        return SaveTrainingState() if state.iteration == 2 else None

    trainer.train(make_loader())
    assert states(maps_path) == ["state-0000000004"]


# ------------------------------------------------------------------ inference
INFERENCE = """
import sys, torch
from torch import nn
import trainbus
network = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
trainbus.load_weights(sys.argv[1], network, tag=sys.argv[2])
network.eval()
with torch.no_grad():
    print(network(torch.ones(3, 4)).tolist())
"""


@pytest.mark.parametrize("tag", ["best-loss", "last"])
def test_weights_load_for_inference_in_a_fresh_process_from_the_maps_path(
    maps_path: Path, tag: str
) -> None:
    from trainbus import ModelCheckpointCallback

    model = make_model()
    trainer = Trainer(
        maps_path,
        model,
        callbacks=[ModelCheckpointCallback("loss")],
        default_callbacks=False,
        max_epochs=3,
    )
    trainer.train(make_loader(), make_loader(seed=1))
    reference = make_model()
    load_weights(maps_path / "checkpoints" / tag, reference)
    with torch.no_grad():
        expected = reference.network(torch.ones(3, 4)).tolist()
    completed = subprocess.run(
        [sys.executable, "-c", INFERENCE, str(maps_path), tag],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    assert json.loads(completed.stdout) == expected


# ------------------------------------------------------------------ stops and rows
def stop_at(iteration: int, *, resumable: bool) -> Callable[..., Stop | None]:
    def stop(*, state: TrainerState) -> Stop | None:
        return (
            Stop("wall-clock limit", resumable=resumable) if state.iteration == iteration else None
        )

    return stop


@pytest.mark.parametrize("resumable", [True, False])
def test_a_stop_in_the_middle_of_an_epoch_is_resumed_only_when_resumable(
    tmp_path: Path, resumable: bool
) -> None:
    straight = Trainer(tmp_path / "straight", make_model(), default_callbacks=False, max_epochs=3)
    straight.train(make_loader(shuffle=True))
    first = Trainer(
        tmp_path / "maps",
        make_model(),
        callbacks=[TrainingCheckpointCallback()],
        default_callbacks=False,
        max_epochs=3,
    )
    first.on("batch_end")(stop_at(9, resumable=resumable))
    stopped = first.train(make_loader(shuffle=True))
    assert (stopped.global_step, stopped.stop_resumable) == (9, resumable)
    assert states(tmp_path / "maps")[0] == "state-0000000009"  # inside epoch 1, not its end
    resumed = Trainer.from_maps(
        tmp_path / "maps", make_model(), callbacks=[TrainingCheckpointCallback()]
    )
    final = resumed.train(make_loader(shuffle=True))
    if resumable:
        assert (final.global_step, final.stopped_by) == (18, None)
        for name, tensor in straight.model.state_dict().items():
            assert torch.equal(tensor, resumed.model.state_dict()[name]), name
    else:
        assert (final.global_step, final.stop_reason) == (9, "wall-clock limit")


class InterruptError(Exception):
    """Raised by a test handler to end a run the way a crash would."""


def interrupt_at(iteration: int) -> Callable[..., None]:
    def interrupt(*, state: TrainerState) -> None:
        if state.iteration == iteration:
            raise InterruptError

    return interrupt


def test_rows_written_before_the_first_counted_row_are_not_duplicated(maps_path: Path) -> None:
    from trainbus import MetricsWriterCallback

    def build() -> Trainer:
        return Trainer(
            maps_path,
            make_model(),
            callbacks=[MetricsWriterCallback(), TrainingCheckpointCallback(every_n_steps=1)],
            default_callbacks=False,
            max_epochs=1,
            log_every_n_batches=4,
        )

    first = build()
    first.on("batch_end", priority=-(10**6))(interrupt_at(4))
    with pytest.raises(InterruptError):
        first.train(make_loader())
    Trainer.from_maps(
        maps_path,
        make_model(),
        callbacks=[MetricsWriterCallback(), TrainingCheckpointCallback(every_n_steps=1)],
    ).train(make_loader())
    rows = Maps(maps_path).read_rows("training_loss.tsv")
    assert [row["iteration"] for row in rows] == ["4", "6"]


def test_a_resume_keeps_the_rows_of_test_calls_made_after_the_state(maps_path: Path) -> None:
    from trainbus import MetricsWriterCallback

    def callbacks() -> list[Any]:
        return [MetricsWriterCallback(), TrainingCheckpointCallback()]

    trainer = Trainer(
        maps_path, make_model(), callbacks=callbacks(), default_callbacks=False, max_epochs=1
    )
    trainer.train(make_loader(), make_loader(seed=1))
    trainer.test(make_loader(seed=2))
    resumed = Trainer.from_maps(maps_path, make_model(), callbacks=callbacks(), max_epochs=2)
    resumed.train(make_loader(), make_loader(seed=1))
    stages = [row["stage"] for row in Maps(maps_path).read_rows("metrics.tsv")]
    assert stages == ["validation", "test", "validation"]


def test_two_training_checkpoint_callbacks_rotate_only_their_own_states(
    maps_path: Path,
) -> None:
    frequent = TrainingCheckpointCallback(
        every_n_steps=2, every_n_epochs=None, save_on_train_end=False, keep=5
    )
    daily = TrainingCheckpointCallback(every_n_epochs=1, keep=1)
    trainer = Trainer(
        maps_path, make_model(), callbacks=[frequent, daily], default_callbacks=False, max_epochs=2
    )
    trainer.train(make_loader())
    assert states(maps_path) == [
        "state-0000000012-epoch-end",
        "state-0000000012",
        "state-0000000010",
        "state-0000000008",
        "state-0000000006",
        "state-0000000004",
    ]


@pytest.mark.fault(
    "A full disk (ENOSPC) while a training state is written",
    outcome=(
        "an error naming the path and the cause; the previous state intact, nothing "
        "half-written left, and the run resumes from it"
    ),
)
def test_a_full_disk_during_a_save_names_the_path_and_keeps_the_previous_state(
    maps_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    real_save = checkpoint._torch_save
    calls = [0]

    def save_until_the_disk_is_full(value: Any, target: Path) -> None:
        calls[0] += 1
        if calls[0] == 2:  # the second training state
            target.write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(value, target)

    monkeypatch.setattr(checkpoint, "_torch_save", save_until_the_disk_is_full)
    trainer = Trainer(
        maps_path,
        make_model(),
        callbacks=[TrainingCheckpointCallback()],
        default_callbacks=False,
        max_epochs=3,
    )
    with pytest.raises(
        CheckpointError,
        match=(
            r"cannot write checkpoint 'state-0000000012-epoch-end' under .*training: "
            r"No space left on device; the previous"
        ),
    ):
        trainer.train(make_loader(shuffle=True))
    monkeypatch.setattr(checkpoint, "_torch_save", real_save)
    assert states(maps_path) == ["state-0000000006-epoch-end"]
    assert not [p for p in (maps_path / "training").iterdir() if p.name.startswith(".")]
    resumed = Trainer.from_maps(maps_path, make_model(), callbacks=[TrainingCheckpointCallback()])
    assert resumed.train(make_loader(shuffle=True)).global_step == 18
