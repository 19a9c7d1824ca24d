"""Model checkpoints: weights as safetensors with a manifest, written and verified atomically.

Protocol: write into a temporary directory inside ``checkpoints/``, fsync every file, write
``manifest.json`` (sha256 and size of every file, format version, step, epoch, versions), then
commit by renaming the directory into place and fsync the parent. A reader verifies the manifest
before it trusts a byte: a mismatch is reported as *corrupt*, naming the file.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
from torch import nn

from trainbus.engine import sharding
from trainbus.engine.files import create_directory
from trainbus.engine.manifest import FORMAT_VERSION as FORMAT_VERSION
from trainbus.engine.manifest import MANIFEST as MANIFEST
from trainbus.engine.manifest import corrupt, load_torch_file, load_weights_file
from trainbus.engine.manifest import digest as _digest
from trainbus.engine.manifest import metadata_owned_by as metadata_owned_by
from trainbus.engine.manifest import owned_by as owned_by
from trainbus.engine.manifest import read_document as read_document
from trainbus.engine.manifest import read_manifest as read_manifest
from trainbus.engine.maps import (
    CHECKPOINTS_DIR,
    TRAINING_DIR,
    Maps,
    check_name,
    check_real_directory,
    fsync_directory,
)
from trainbus.errors import (
    CheckpointError,
    CorruptCheckpointError,
)

WEIGHTS = "model.safetensors"


def save_weights(
    maps: Maps,
    tag: str,
    model: nn.Module | Mapping[str, torch.Tensor],
    *,
    metadata: Mapping[str, Any],
) -> Path:
    """Commit ``model``'s weights under ``checkpoints/<tag>/``; an older one is replaced whole.

    ``model`` may be a state dict already copied to host memory (an asynchronous save).
    """
    return write_checkpoint(
        maps.directory(CHECKPOINTS_DIR),
        tag,
        {WEIGHTS: lambda path: save_model_file(model, path)},
        kind="weights",
        metadata=metadata,
    )


def save_model_file(model: nn.Module | Mapping[str, torch.Tensor], path: Path) -> None:
    """Write ``model``'s state dict as safetensors (moved to the CPU, tied tensors unshared)."""
    state = model.state_dict() if isinstance(model, nn.Module) else model
    tensors = {name: tensor.detach().to("cpu").contiguous() for name, tensor in state.items()}
    # Serialised in memory, written by Python: a full disk is then an OSError (ENOSPC) that
    # names its cause, not a serialiser's own error type.
    path.write_bytes(safetensors.torch.save(_unshare(tensors)))


def _torch_save(value: Any, path: Path) -> None:
    """``torch.save`` through memory: on a full disk torch reports a bad position, not ENOSPC."""
    buffer = io.BytesIO()
    torch.save(value, buffer)
    path.write_bytes(buffer.getbuffer())


def write_checkpoint(
    root: Path,
    name: str,
    writers: Mapping[str, Callable[[Path], None]],
    *,
    kind: str,
    metadata: Mapping[str, Any],
    staging: Path | None = None,
) -> Path:
    """Write files into a staging directory, add the manifest, and commit ``root/name`` by rename.

    Each writer writes one file; every file is fsynced and listed in the manifest (sha256 and
    size) before the rename makes the checkpoint visible. On failure nothing is left behind and
    an older checkpoint of the same name is intact. ``staging`` (from
    :func:`staging_directory`) may already hold files written by others (every rank's shard
    of a sharded state): they are listed too.
    """
    target = root / check_name(name)
    staging = staging_directory(root, name) if staging is None else staging
    try:
        for filename, write in writers.items():
            write(staging / check_name(filename))
        # Every file, those written before (a sharded state's shards) included.
        digests = {}
        for path in sorted(staging.iterdir(), key=lambda p: p.name):
            _fsync_file(path)
            digests[path.name] = _digest(path)
        manifest = {
            "format_version": FORMAT_VERSION,
            "kind": kind,
            "tag": name,
            "files": digests,
            "metadata": dict(metadata),
            "versions": {"torch": torch.__version__, "safetensors": safetensors.__version__},
        }
        manifest_path = staging / MANIFEST
        manifest_path.write_text(json.dumps(manifest, indent=2, default=str) + "\n")
        _fsync_file(manifest_path)
        fsync_directory(staging)
        _commit(staging, target)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise CheckpointError(
            f"cannot write checkpoint {name!r} under {root}: {exc.strerror or exc}; the previous "
            "checkpoint with this name, if any, is intact"
        ) from exc
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def staging_directory(root: Path, name: str) -> Path:
    """A new, empty directory under ``root`` where checkpoint ``name`` is written before commit.

    A process killed before the commit leaves it behind; :func:`recover_interrupted` removes it.
    """
    with contextlib.suppress(FileExistsError):
        root.mkdir()
    check_real_directory(root)
    return create_directory(root, f"{_STAGING}{check_name(name)}-")


def remove_checkpoint(directory: Path) -> None:
    """Delete a committed checkpoint: renamed aside first, so no half-deleted one is ever seen."""
    if not directory.exists():
        return
    check_real_directory(directory.parent)
    retired = directory.with_name(f"{_DELETED}{directory.name}-{os.getpid()}")
    shutil.rmtree(retired, ignore_errors=True)
    os.replace(directory, retired)
    fsync_directory(directory.parent)
    shutil.rmtree(retired, ignore_errors=True)


_STAGING = ".tmp-"
REPLACED_PREFIX = ".replaced-"
_DELETED = ".deleted-"


def recover_interrupted(root: Path) -> list[str]:
    """Finish what a process killed while writing checkpoints under ``root`` left half-done.

    A checkpoint being replaced is renamed aside before its successor is renamed into place:
    if the process died between the two renames, the old one is put back. Staging
    directories (never committed) and directories being deleted are removed. Returns a line
    per action, for the call's record in ``maps.json``.
    """
    actions: list[str] = []
    if not root.is_dir():
        return actions
    check_real_directory(root)  # never rename or delete through a link
    for entry in sorted(root.iterdir()):
        name = entry.name
        if name.startswith(REPLACED_PREFIX):
            tag = name[len(REPLACED_PREFIX) :].rsplit("-", 1)[0]
            target = root / tag
            if tag and not target.exists():
                os.replace(entry, target)
                actions.append(f"restored {tag} (its replacement was never committed)")
                continue
            shutil.rmtree(entry, ignore_errors=True)
            actions.append(f"removed {name} (left by a replacement that was committed)")
        elif name.startswith((_STAGING, _DELETED)):
            shutil.rmtree(entry, ignore_errors=True)
            actions.append(f"removed {name} (left by an interrupted write or deletion)")
    if actions:
        fsync_directory(root)
    return actions


def _unshare(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors sharing storage (tied weights): give each its own."""
    seen: set[int] = set()
    result = {}
    for name, tensor in tensors.items():
        pointer = tensor.untyped_storage().data_ptr()
        result[name] = tensor.clone() if pointer in seen and tensor.numel() else tensor
        seen.add(pointer)
    return result


def _fsync_file(path: Path) -> None:
    with path.open("rb") as stream:
        os.fsync(stream.fileno())


def _commit(staging: Path, target: Path) -> None:
    """Rename ``staging`` to ``target``; an existing target is moved aside first, then removed."""
    retired = None
    if target.exists():
        retired = target.with_name(f"{REPLACED_PREFIX}{target.name}-{os.getpid()}")
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(retired)
        os.replace(target, retired)
    os.replace(staging, target)
    fsync_directory(target.parent)
    if retired is not None:
        shutil.rmtree(retired, ignore_errors=True)


# ------------------------------------------------------------------ training states
TRAINER_FILE = "trainer.pt"
STATE_FILE = "state.json"
LATEST = "latest"
_STATE_PREFIX = "state-"


def training_state_name(iteration: int, *, epoch_end: bool) -> str:
    """Directory name of a training state; names sort in training order."""
    return f"{_STATE_PREFIX}{iteration:010d}{'-epoch-end' if epoch_end else ''}"


def save_training_state(
    maps: Maps,
    name: str,
    model: nn.Module | Mapping[str, torch.Tensor] | None,
    *,
    tensors: Mapping[str, Any],
    document: Mapping[str, Any],
    metadata: Mapping[str, Any],
    staging: Path | None = None,
) -> Path:
    """Commit a training state under ``training/<name>/``, then move ``training/latest`` to it.

    ``tensors`` (optimizers, scaler, random states, callback states) is written with
    ``torch.save`` and read back with ``weights_only=True`` only; ``document`` (counters,
    positions, filter counters) as JSON; the weights as safetensors. A sharded state passes
    ``model=None`` and the ``staging`` directory where every rank wrote its shard of the
    weights and optimizers (see :mod:`~trainbus.engine.sharding`).
    """
    root = maps.directory(TRAINING_DIR)
    text = json.dumps(dict(document), indent=2, default=str) + "\n"
    writers: dict[str, Callable[[Path], None]] = {}
    if model is not None:
        writers[WEIGHTS] = lambda target: save_model_file(model, target)
    writers[TRAINER_FILE] = lambda target: _torch_save(dict(tensors), target)
    writers[STATE_FILE] = lambda target: _write_text(target, text)
    path = write_checkpoint(
        root, name, writers, kind="training", metadata=metadata, staging=staging
    )
    try:
        maps.write_bytes(f"{name}\n".encode(), TRAINING_DIR, LATEST)
    except OSError as exc:
        raise CheckpointError(
            f"training state {path} was committed, but {root / LATEST} could not be updated: "
            f"{exc.strerror or exc}; a resume still finds the newest valid state"
        ) from exc
    return path


def _write_text(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8")


def training_states(maps: Maps) -> list[Path]:
    """Committed training states of the MAPS, newest first."""
    root = maps.file(TRAINING_DIR)
    if not root.is_dir():
        return []
    check_real_directory(root)
    found = [p for p in root.iterdir() if p.name.startswith(_STATE_PREFIX) and p.is_dir()]
    return sorted(found, key=lambda p: p.name, reverse=True)


@dataclass(frozen=True, slots=True)
class FoundState:
    """The training state a resume will use, and the newer ones it had to pass over."""

    path: Path
    manifest: dict[str, Any]
    skipped: tuple[str, ...]


def find_training_state(maps: Maps) -> FoundState | None:
    """The newest training state that verifies and parses; ``None`` if the MAPS holds none.

    A corrupt, partial or unreadable state is passed over (and named in ``skipped``): one whose
    manifest does not verify, and one whose files match their manifest yet are not what
    trainbus writes (the weights, the torch file and ``state.json`` are opened to check).
    A ``latest`` pointer that is missing, corrupt or stale never decides on its own.
    Raises :class:`CorruptCheckpointError` when states exist but none verifies.
    """
    skipped: list[str] = []
    candidates = training_states(maps)
    for path in candidates:
        try:
            manifest = read_manifest(path)
            if manifest.get("kind") != "training":
                raise CorruptCheckpointError(f"{path} is not a training state")
            _check_contents(path)
        except CheckpointError as exc:
            skipped.append(f"{path.name}: {exc}")
            continue
        pointer = _read_latest(maps)
        if pointer is not None and pointer != path.name:
            skipped.append(f"{LATEST}: names {pointer!r}, not the newest valid state")
        return FoundState(path, manifest, tuple(skipped))
    if candidates:
        raise CorruptCheckpointError(
            f"every training state under {maps.file(TRAINING_DIR)} is corrupt or unreadable: "
            + "; ".join(skipped)
        )
    return None


def _read_latest(maps: Maps) -> str | None:
    try:
        return maps.file(TRAINING_DIR, LATEST).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None


def _check_contents(path: Path) -> None:
    """Open every file of a verified training state as what it should be, cheaply.

    The weights' header is parsed and the torch file is memory-mapped (its pickle read, its
    tensors not): a resume then passes over a manifest-consistent forgery instead of failing.
    """
    if is_sharded(path):
        sharding.read_metadata(path)
    else:
        weights = path / WEIGHTS
        try:
            with safetensors.safe_open(str(weights), framework="pt") as opened:
                opened.keys()
        except Exception as exc:  # the parser's own error types: any of them means unreadable
            raise corrupt(weights, "not a safetensors file", exc) from exc
    load_torch_file(path / TRAINER_FILE, mmap=True)
    read_document(path / STATE_FILE)


def is_sharded(path: Path) -> bool:
    """Whether the training state at ``path`` holds its weights as a DCP checkpoint (FSDP)."""
    return (path / sharding.DCP_METADATA).is_file() and not (path / WEIGHTS).exists()


def load_training_state(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], Any]:
    """The weights, the torch-saved part and the JSON part of a verified training state.

    The torch file is read with ``weights_only=True`` passed explicitly, so a pickle that
    names anything but tensors and plain containers is refused, whatever the environment says.
    A file that matches the manifest but cannot be parsed raises :class:`CorruptCheckpointError`.
    """
    read_manifest(path)
    # A sharded state's weights are read by every rank into its shards (load_sharded).
    weights = {} if is_sharded(path) else load_weights_file(path / WEIGHTS)
    tensors = load_torch_file(path / TRAINER_FILE, mmap=False)
    return weights, tensors, read_document(path / STATE_FILE)


def quarantine(directory: Path) -> Path:
    """Move an unusable checkpoint aside as ``corrupt-<name>`` (kept for inspection)."""
    target = directory.with_name(f"corrupt-{directory.name}")
    remove_checkpoint(target)
    os.replace(directory, target)
    fsync_directory(directory.parent)
    return target


def rotate_training_states(
    maps: Maps,
    keep: int,
    protect: Iterable[Path] = (),
    *,
    owner: str | None = None,
    sources: Collection[str] = (),
) -> list[Path]:
    """Delete all but the newest ``keep`` states; never one in ``protect``. Returns the removed.

    With ``owner`` (a callback id), only the states that callback asked for count and go
    (``sources``: its handler ids; see :func:`~trainbus.engine.manifest.owned_by`): several
    training-checkpoint callbacks in one MAPS never rotate each other's states, whatever
    their ids.
    """
    protected = {p.resolve() for p in protect}
    candidates = [p for p in training_states(maps) if owner is None or owned_by(p, owner, sources)]
    removed = []
    for path in candidates[keep:]:
        if path.resolve() in protected:
            continue
        remove_checkpoint(path)
        removed.append(path)
    return removed
