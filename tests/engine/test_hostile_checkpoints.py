"""Checkpoints that match their manifest yet hold the wrong thing, and linked checkpoint folders.

Each is *corrupt*: a resume passes over it to an older state and names it, ``load_weights``
says "corrupt" naming the file; none ends in AttributeError, RecursionError, SafetensorError
or UnicodeDecodeError.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import make_loader, make_model
from trainbus import (
    ModelCheckpointCallback,
    Trainer,
    TrainingCheckpointCallback,
    load_weights,
)
from trainbus.engine import checkpoint
from trainbus.engine.maps import Maps
from trainbus.errors import CorruptCheckpointError, TrainbusWarning, UnsafePathError

NEWEST = "state-0000000012-epoch-end"
PREVIOUS = "state-0000000006-epoch-end"


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("template") / "maps"
    trainer = Trainer(
        path,
        make_model(),
        callbacks=[TrainingCheckpointCallback(keep=10), ModelCheckpointCallback()],
        default_callbacks=False,
        max_epochs=2,
    )
    trainer.train(make_loader())
    return path


@pytest.fixture
def maps_copy(template: Path, tmp_path: Path) -> Path:
    path = tmp_path / "maps"
    shutil.copytree(template, path, symlinks=True)
    return path


def forge(directory: Path, name: str, data: bytes) -> None:
    """Replace a file and make the manifest vouch for the new bytes (a consistent forgery)."""
    (directory / name).write_bytes(data)
    manifest = json.loads((directory / "manifest.json").read_text())
    manifest["files"][name] = checkpoint._digest(directory / name)
    (directory / "manifest.json").write_text(json.dumps(manifest))


def garbage(size: int = 4096) -> bytes:
    return bytes((index * 131 + 7) % 256 for index in range(size))  # invalid UTF-8 too


def garbage_zip() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("archive/data.pkl", garbage(64))
    return buffer.getvalue()


DEEP = b"[" * 100_000 + b"]" * 100_000

MANIFESTS: dict[str, bytes] = {
    "array": b"[]",
    "null": b"null",
    "string": b'"manifest"',
    "number": b"42",
    "deeply-nested": DEEP,
    "not-utf8": garbage(64),
}


def rewrite_manifest(directory: Path, case: str) -> None:
    if case == "metadata-list":
        manifest = json.loads((directory / "manifest.json").read_text())
        manifest["metadata"] = ["requested_by", "TrainingCheckpointCallback.on_epoch_end"]
        (directory / "manifest.json").write_text(json.dumps(manifest))
    elif case == "entry-without-size":
        manifest = json.loads((directory / "manifest.json").read_text())
        manifest["files"]["model.safetensors"] = {"sha256": None}
        (directory / "manifest.json").write_text(json.dumps(manifest))
    else:
        (directory / "manifest.json").write_bytes(MANIFESTS[case])


DAMAGE: dict[str, Callable[[Path], None]] = {
    **{
        f"manifest-{case}": (lambda d, case=case: rewrite_manifest(d, case))
        for case in [*MANIFESTS, "metadata-list", "entry-without-size"]
    },
    "weights-garbage": lambda d: forge(d, "model.safetensors", garbage()),
    "weights-empty": lambda d: forge(d, "model.safetensors", b""),
    "state-json-garbage": lambda d: forge(d, "state.json", garbage()),
    "state-json-deeply-nested": lambda d: forge(d, "state.json", DEEP),
    "state-json-array": lambda d: forge(d, "state.json", b"[]"),
    "trainer-pt-garbage": lambda d: forge(d, "trainer.pt", garbage()),
    "trainer-pt-garbage-zip": lambda d: forge(d, "trainer.pt", garbage_zip()),
}


@pytest.mark.fault(
    (
        "A forged newest training state: a manifest of the wrong JSON shape, or "
        "manifest-consistent garbage weights, state.json or trainer.pt"
    ),
    outcome="passed over as corrupt, by name; the older valid state is used; never a raw error",
)
@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_forged_newest_state_is_passed_over_as_corrupt_by_name(
    maps_copy: Path, damage: str
) -> None:
    DAMAGE[damage](maps_copy / "training" / NEWEST)
    found = checkpoint.find_training_state(Maps(maps_copy))
    assert found is not None and found.path.name == PREVIOUS
    assert NEWEST in found.skipped[0] and "corrupt" in found.skipped[0], found.skipped
    # Rotation reads the same manifest to decide ownership: it must not fail on it either.
    checkpoint.rotate_training_states(
        Maps(maps_copy), 1, [found.path], owner="TrainingCheckpointCallback"
    )


@pytest.mark.parametrize(
    "damage", [d for d in sorted(DAMAGE) if not d.startswith("manifest-")] + ["manifest-array"]
)
def test_loading_a_forged_state_directly_says_corrupt_naming_the_file(
    maps_copy: Path, damage: str
) -> None:
    DAMAGE[damage](maps_copy / "training" / NEWEST)
    named = {"weights": "model.safetensors", "state": "state.json", "trainer": "trainer.pt"}
    file = named.get(damage.split("-")[0], "manifest.json")
    with pytest.raises(CorruptCheckpointError) as caught:
        checkpoint.load_training_state(maps_copy / "training" / NEWEST)
    message = str(caught.value)
    assert f"{NEWEST}/{file}" in message or f"{NEWEST} is corrupt: its {file}" in message
    assert "is corrupt" in message


def test_a_resume_uses_the_older_state_when_the_newest_trainer_pt_is_forged(
    maps_copy: Path,
) -> None:
    forge(maps_copy / "training" / NEWEST, "trainer.pt", garbage())
    trainer = Trainer.from_maps(
        maps_copy,
        make_model(),
        callbacks=[TrainingCheckpointCallback(keep=10), ModelCheckpointCallback()],
        max_epochs=3,
    )
    with pytest.warns(TrainbusWarning, match=rf"resuming from {PREVIOUS}; passed over: {NEWEST}"):
        trainer.train(make_loader())
    record = trainer.maps.read_json("maps.json")["calls"][-1]["resumed_from"]
    assert record["state"] == PREVIOUS
    assert trainer.state.global_step == 18


WEIGHTS_DAMAGE = {
    name: damage for name, damage in DAMAGE.items() if name.startswith(("manifest-", "weights-"))
}


@pytest.mark.parametrize("damage", sorted(WEIGHTS_DAMAGE))
def test_load_weights_says_corrupt_naming_the_file(maps_copy: Path, damage: str) -> None:
    WEIGHTS_DAMAGE[damage](maps_copy / "checkpoints" / "last")
    file = "model.safetensors" if damage.startswith("weights-") else ""
    model = make_model(seed=4)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with pytest.raises(CorruptCheckpointError, match=rf"checkpoints/last.*{file}.* corrupt"):
        load_weights(maps_copy, model, tag="last")
    assert all(before[name].equal(tensor) for name, tensor in model.state_dict().items())


def test_model_checkpoint_ignores_a_directory_whose_metadata_is_a_list(maps_copy: Path) -> None:
    directory = maps_copy / "checkpoints" / "last"
    rewrite_manifest(directory, "metadata-list")
    assert ModelCheckpointCallback()._written_at(directory) is None


# ------------------------------------------------------------------ linked folders
@pytest.fixture
def outside(tmp_path: Path) -> Path:
    path = tmp_path / "outside"
    path.mkdir()
    return path


def link_folder(maps: Path, folder: str, outside: Path) -> dict[str, bytes]:
    """Move ``folder`` out of the MAPS and leave a link to it; returns what it holds."""
    target = outside / folder
    shutil.move(maps / folder, target)
    (maps / folder).symlink_to(target)
    return {str(p.relative_to(outside)): p.read_bytes() for p in target.rglob("*") if p.is_file()}


def contents(outside: Path) -> dict[str, bytes]:
    return {str(p.relative_to(outside)): p.read_bytes() for p in outside.rglob("*") if p.is_file()}


def test_a_linked_training_folder_is_refused_for_resume_rotation_and_recovery(
    maps_copy: Path, outside: Path
) -> None:
    before = link_folder(maps_copy, "training", outside)
    message = r"maps/training is a symbolic link \(to '.*outside/training'\)"
    maps = Maps(maps_copy)
    for attempt in (
        lambda: checkpoint.find_training_state(maps),
        lambda: checkpoint.rotate_training_states(maps, 0),
        lambda: checkpoint.recover_interrupted(maps_copy / "training"),
        lambda: checkpoint.load_training_state(maps_copy / "training" / NEWEST),
    ):
        with pytest.raises(UnsafePathError, match=message):
            attempt()
    trainer = Trainer.from_maps(maps_copy, make_model(), max_epochs=3)
    with pytest.raises(UnsafePathError, match=message):
        trainer.train(make_loader())
    assert contents(outside) == before


def test_a_linked_checkpoints_folder_is_refused_for_saving_loading_and_recovery(
    maps_copy: Path, outside: Path
) -> None:
    before = link_folder(maps_copy, "checkpoints", outside)
    message = r"maps/checkpoints is a symbolic link \(to '.*outside/checkpoints'\)"
    maps = Maps(maps_copy)
    maps.adopt()
    for attempt in (
        lambda: checkpoint.save_weights(maps, "last", make_model(), metadata={}),
        lambda: load_weights(maps_copy, make_model(), tag="last"),
        lambda: load_weights(maps_copy / "checkpoints" / "last", make_model()),
        lambda: checkpoint.recover_interrupted(maps_copy / "checkpoints"),
        lambda: checkpoint.remove_checkpoint(maps_copy / "checkpoints" / "last"),
    ):
        with pytest.raises(UnsafePathError, match=message):
            attempt()
    assert contents(outside) == before
    assert os.path.islink(maps_copy / "checkpoints")
