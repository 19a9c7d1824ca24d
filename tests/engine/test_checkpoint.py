from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
from torch import nn

from trainbus import Maps, SaveCheckpoint, Trainer, TrainerState, load_weights
from trainbus.engine.checkpoint import read_manifest, save_weights
from trainbus.errors import (
    CheckpointError,
    ConfigurationError,
    CorruptCheckpointError,
    UnsafePathError,
)

from ..conftest import make_loader, make_model


def weights_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def same_weights(left: dict[str, torch.Tensor], right: dict[str, torch.Tensor]) -> bool:
    return left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left)


@pytest.fixture
def saved(quiet_trainer: Callable[..., Trainer]) -> tuple[Trainer, Path]:
    trainer = quiet_trainer(device="cpu", max_epochs=1)

    @trainer.on("train_end", id="saver")
    def save() -> SaveCheckpoint:
        return SaveCheckpoint("final", metadata=(("note", "end of run"),))

    trainer.train(make_loader())
    return trainer, trainer.maps.path / "checkpoints" / "final"


def test_save_checkpoint_writes_weights_and_a_manifest(saved: tuple[Trainer, Path]) -> None:
    trainer, directory = saved
    assert sorted(p.name for p in directory.iterdir()) == ["manifest.json", "model.safetensors"]
    manifest = json.loads((directory / "manifest.json").read_text())
    assert manifest["format_version"] == 1
    assert manifest["tag"] == "final"
    assert manifest["files"]["model.safetensors"]["size"] == (
        (directory / "model.safetensors").stat().st_size
    )
    assert manifest["metadata"]["note"] == "end of run"
    assert manifest["metadata"]["requested_by"] == "saver"
    assert manifest["metadata"]["event"] == "train_end"
    assert manifest["metadata"]["global_step"] == trainer.state.global_step == 6
    assert manifest["versions"]["torch"] == torch.__version__


def test_load_weights_restores_the_trained_weights_into_a_fresh_model(
    saved: tuple[Trainer, Path],
) -> None:
    trainer, directory = saved
    fresh = make_model(seed=99)
    assert not same_weights(weights_of(fresh), weights_of(trainer.model))
    manifest = load_weights(directory, fresh)
    assert same_weights(weights_of(fresh), weights_of(trainer.model))
    assert manifest["tag"] == "final"


def test_the_checkpoint_event_announces_the_committed_directory(
    quiet_trainer: Callable[..., Trainer],
) -> None:
    trainer = quiet_trainer(device="cpu", max_epochs=2)
    announced: list[tuple[str, Path, int]] = []

    @trainer.on("epoch_end")
    def save(*, state: TrainerState) -> SaveCheckpoint:
        return SaveCheckpoint(f"epoch-{state.current_epoch}")

    @trainer.on("checkpoint")
    def record(*, checkpoint: Path, tag: str, state: TrainerState) -> None:
        announced.append((tag, checkpoint, state.current_epoch))
        assert (checkpoint / "manifest.json").is_file()

    trainer.train(make_loader())
    root = trainer.maps.path / "checkpoints"
    assert announced == [("epoch-0", root / "epoch-0", 0), ("epoch-1", root / "epoch-1", 1)]


@pytest.mark.parametrize("position", [0, 100, -1])
def test_a_flipped_byte_is_reported_as_corrupt(saved: tuple[Trainer, Path], position: int) -> None:
    _, directory = saved
    weights = directory / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[position] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError, match=r"model\.safetensors is corrupt"):
        load_weights(directory, make_model())


def test_a_truncated_weights_file_is_reported_as_corrupt(saved: tuple[Trainer, Path]) -> None:
    _, directory = saved
    weights = directory / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-16])
    model = make_model(seed=5)
    before = weights_of(model)
    with pytest.raises(CorruptCheckpointError, match=r"model\.safetensors is corrupt: size"):
        load_weights(directory, model)
    assert same_weights(before, weights_of(model))


def test_a_missing_weights_file_is_reported_as_corrupt(saved: tuple[Trainer, Path]) -> None:
    _, directory = saved
    (directory / "model.safetensors").unlink()
    with pytest.raises(CorruptCheckpointError, match=r"model\.safetensors is corrupt: .*missing"):
        load_weights(directory, make_model())


def test_a_missing_manifest_is_reported_as_corrupt(saved: tuple[Trainer, Path]) -> None:
    _, directory = saved
    (directory / "manifest.json").unlink()
    with pytest.raises(CorruptCheckpointError, match=r"is corrupt: manifest\.json is missing"):
        load_weights(directory, make_model())


def test_an_unreadable_manifest_is_reported_as_corrupt(saved: tuple[Trainer, Path]) -> None:
    _, directory = saved
    (directory / "manifest.json").write_text("{not json")
    with pytest.raises(CorruptCheckpointError, match=r"corrupt: .*manifest\.json cannot be read"):
        read_manifest(directory)


def test_an_unknown_format_version_is_refused(saved: tuple[Trainer, Path]) -> None:
    _, directory = saved
    manifest_path = directory / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["format_version"] = 99
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"format version 99; this trainbus reads version 1"):
        read_manifest(directory)


def test_rewriting_a_tag_replaces_the_directory_without_leftovers(
    quiet_trainer: Callable[..., Trainer],
) -> None:
    trainer = quiet_trainer(device="cpu", max_epochs=3)
    copies: list[dict[str, torch.Tensor]] = []

    @trainer.on("epoch_end")
    def save(*, model: nn.Module) -> SaveCheckpoint:
        copies.append(weights_of(model))
        return SaveCheckpoint("rolling")

    trainer.train(make_loader())
    root = trainer.maps.path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["rolling"]
    assert sorted(p.name for p in (root / "rolling").iterdir()) == [
        "manifest.json",
        "model.safetensors",
    ]
    restored = make_model(seed=1)
    manifest = load_weights(root / "rolling", restored)
    assert same_weights(weights_of(restored), copies[-1])
    assert not same_weights(copies[0], copies[-1])
    assert manifest["metadata"]["epoch"] == 2


def test_a_failed_save_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    maps = Maps(tmp_path / "maps")
    maps.create()
    model = make_model()
    save_weights(maps, "kept", model, metadata={})

    class BrokenModule(nn.Module):
        def state_dict(self, *args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("cannot read weights")

    with pytest.raises(RuntimeError, match="cannot read weights"):
        save_weights(maps, "kept", BrokenModule(), metadata={})
    root = maps.path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["kept"]
    restored = make_model(seed=3)
    load_weights(root / "kept", restored)
    assert same_weights(weights_of(restored), weights_of(model))


def test_tied_weights_are_saved_and_restored(tmp_path: Path) -> None:
    maps = Maps(tmp_path / "maps")
    maps.create()
    tied = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    tied[1].weight = tied[0].weight
    directory = save_weights(maps, "tied", tied, metadata={"kind": "test"})
    other = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    load_weights(directory, other)
    assert torch.equal(other[0].weight, tied[0].weight)
    assert torch.equal(other[1].weight, tied[0].weight)


@pytest.mark.parametrize("tag", ["../escape", "a/b", "", ".hidden", "x" * 129, "a..b"])
def test_unsafe_checkpoint_tags_are_refused(tag: str) -> None:
    with pytest.raises(ConfigurationError, match=r"is not a safe directory name"):
        SaveCheckpoint(tag)


@pytest.mark.fault(
    "A checkpoint replacement killed between its two renames",
    outcome=(
        "the previous checkpoint still loads; the next call restores it and sweeps half-"
        "written leftovers, recorded in maps.json"
    ),
)
def test_a_replacement_killed_between_its_renames_is_recovered(tmp_path: Path) -> None:
    from trainbus import ModelCheckpointCallback, TrainingCheckpointCallback

    maps_path = tmp_path / "maps"
    callbacks = [ModelCheckpointCallback(), TrainingCheckpointCallback()]
    first = Trainer(maps_path, make_model(), callbacks=callbacks, default_callbacks=False)
    first.max_epochs = 1
    first.train(make_loader())
    root = maps_path / "checkpoints"
    expected = (root / "last" / "model.safetensors").read_bytes()
    # As if killed after moving `last` aside, before renaming its successor into place.
    os.replace(root / "last", root / ".replaced-last-4242")
    (root / ".tmp-last-abcd").mkdir()
    (root / ".tmp-last-abcd" / "model.safetensors").write_bytes(b"half written")
    (root / ".deleted-epoch-3-4242").mkdir()

    network = make_model().network
    load_weights(maps_path, network, tag="last")  # the previous `last` is still whole
    for name, tensor in network.state_dict().items():
        assert torch.equal(tensor, safetensors.torch.load(expected)[f"network.{name}"])

    again = Trainer.from_maps(
        maps_path,
        make_model(),
        callbacks=[ModelCheckpointCallback(), TrainingCheckpointCallback()],
        max_epochs=2,
    )
    recovered = []

    @again.on("train_start")
    def look() -> None:
        recovered.extend(sorted(p.name for p in root.iterdir()))

    again.train(make_loader())
    assert recovered == ["last"]  # restored, and nothing half-done left before training
    record = again.maps.read_json("maps.json")["calls"][-1]
    assert record["recovered"] == [
        "checkpoints/: removed .deleted-epoch-3-4242 (left by an interrupted write or deletion)",
        "checkpoints/: restored last (its replacement was never committed)",
        "checkpoints/: removed .tmp-last-abcd (left by an interrupted write or deletion)",
    ]


HOSTILE_MANIFESTS: dict[str, tuple[Callable[[Path, Path], None], type[Exception], str]] = {
    "dot-dot-name": (
        lambda d, _: _rewrite_manifest(d, {"../../outside.txt": {"size": 1, "sha256": "0"}}),
        UnsafePathError,
        r"name '\.\./\.\./outside\.txt' cannot be written into a MAPS",
    ),
    "absolute-name": (
        lambda d, _: _rewrite_manifest(d, {"/etc/passwd": {"size": 1, "sha256": "0"}}),
        UnsafePathError,
        r"name '/etc/passwd'",
    ),
    "symlink-out-of-the-maps": (
        lambda d, outside: _swap_for_link(d / "model.safetensors", outside),
        UnsafePathError,
        r"is a symbolic link .* tampered with",
    ),
    "garbled-entry": (
        lambda d, _: _rewrite_manifest(d, {"model.safetensors": "deadbeef"}),
        CorruptCheckpointError,
        r"corrupt: its manifest lists 'model\.safetensors': 'deadbeef'",
    ),
}


def _rewrite_manifest(directory: Path, files: dict[str, Any]) -> None:
    manifest = json.loads((directory / "manifest.json").read_text())
    manifest["files"] = files
    (directory / "manifest.json").write_text(json.dumps(manifest))


def _swap_for_link(path: Path, outside: Path) -> None:
    outside.write_bytes(path.read_bytes())  # same bytes: only the link gives it away
    path.unlink()
    path.symlink_to(outside)


@pytest.mark.fault(
    (
        "A tampered checkpoint: '..' or absolute names in the manifest, a symlink out of the "
        "MAPS, a garbled manifest"
    ),
    outcome="refused before any file is read, the file named",
)
@pytest.mark.parametrize("case", sorted(HOSTILE_MANIFESTS))
def test_a_tampered_checkpoint_is_refused_before_anything_is_read(
    tmp_path: Path, case: str
) -> None:
    tamper, error, message = HOSTILE_MANIFESTS[case]
    maps = Maps(tmp_path / "maps")
    maps.create()
    directory = save_weights(maps, "last", make_model(), metadata={})
    tamper(directory, tmp_path / "outside.safetensors")
    with pytest.raises(error, match=message):
        load_weights(directory, make_model())
