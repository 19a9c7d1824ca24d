"""Model checkpoints: weights as safetensors with a manifest, written and verified atomically.

Protocol: write into a temporary directory inside ``checkpoints/``, fsync every file, write
``manifest.json`` (sha256 and size of every file, format version, step, epoch, versions), then
commit by renaming the directory into place and fsync the parent. A reader verifies the manifest
before it trusts a byte: a mismatch is reported as *corrupt*, naming the file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import nn

from trainbus.engine.maps import CHECKPOINTS_DIR, Maps, check_name, fsync_directory
from trainbus.errors import CheckpointError, CorruptCheckpointError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"


def save_weights(
    maps: Maps,
    tag: str,
    model: nn.Module,
    *,
    metadata: Mapping[str, Any],
) -> Path:
    """Commit ``model``'s weights under ``checkpoints/<tag>/``; an older one is replaced whole."""
    root = maps.file(CHECKPOINTS_DIR)
    root.mkdir(parents=True, exist_ok=True)
    target = root / check_name(tag)
    staging = Path(tempfile.mkdtemp(prefix=f".tmp-{tag}-", dir=root))
    try:
        weights = staging / WEIGHTS
        tensors = {
            name: tensor.detach().to("cpu").contiguous()
            for name, tensor in model.state_dict().items()
        }
        safetensors.torch.save_file(_unshare(tensors), str(weights))
        _fsync_file(weights)
        manifest = {
            "format_version": FORMAT_VERSION,
            "kind": "weights",
            "tag": tag,
            "files": {WEIGHTS: _digest(weights)},
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
            f"cannot write checkpoint {tag!r} under {root}: {exc.strerror or exc}; the previous "
            "checkpoint with this tag, if any, is intact"
        ) from exc
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def read_manifest(directory: Path) -> dict[str, Any]:
    """Read and verify a checkpoint's manifest against the files; raise if anything differs."""
    manifest_path = directory / MANIFEST
    try:
        manifest: dict[str, Any] = json.loads(manifest_path.read_text())
    except FileNotFoundError:
        raise CorruptCheckpointError(
            f"checkpoint {directory} is corrupt: {MANIFEST} is missing"
        ) from None
    except (OSError, ValueError) as exc:
        raise CorruptCheckpointError(
            f"checkpoint {directory} is corrupt: {manifest_path} cannot be read ({exc})"
        ) from exc
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {directory} has format version {manifest.get('format_version')!r}; "
            f"this trainbus reads version {FORMAT_VERSION}"
        )
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise CorruptCheckpointError(
            f"checkpoint {directory} is corrupt: its manifest lists no files"
        )
    for name, expected in files.items():
        path = directory / check_name(name)
        if not path.is_file():
            raise CorruptCheckpointError(f"checkpoint file {path} is corrupt: it is missing")
        actual = _digest(path)
        if actual != expected:
            raise CorruptCheckpointError(
                f"checkpoint file {path} is corrupt: size {actual['size']} and sha256 "
                f"{actual['sha256'][:12]}... differ from the manifest's {expected.get('size')} "
                f"and {str(expected.get('sha256'))[:12]}..."
            )
    return manifest


def load_weights(
    directory: str | os.PathLike[str], model: nn.Module, *, strict: bool = True
) -> dict[str, Any]:
    """Verify a weights checkpoint and load it into ``model``; returns its manifest."""
    path = Path(directory)
    manifest = read_manifest(path)
    state = safetensors.torch.load_file(str(path / WEIGHTS))
    model.load_state_dict(state, strict=strict)
    return manifest


def _unshare(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors sharing storage (tied weights): give each its own."""
    seen: set[int] = set()
    result = {}
    for name, tensor in tensors.items():
        pointer = tensor.untyped_storage().data_ptr()
        result[name] = tensor.clone() if pointer in seen and tensor.numel() else tensor
        seen.add(pointer)
    return result


def _digest(path: Path) -> dict[str, Any]:
    sha = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            sha.update(block)
    return {"sha256": sha.hexdigest(), "size": path.stat().st_size}


def _fsync_file(path: Path) -> None:
    with path.open("rb") as stream:
        os.fsync(stream.fileno())


def _commit(staging: Path, target: Path) -> None:
    """Rename ``staging`` to ``target``; an existing target is moved aside first, then removed."""
    retired = None
    if target.exists():
        retired = target.with_name(f".old-{target.name}-{os.getpid()}")
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(retired)
        os.replace(target, retired)
    os.replace(staging, target)
    fsync_directory(target.parent)
    if retired is not None:
        shutil.rmtree(retired, ignore_errors=True)
