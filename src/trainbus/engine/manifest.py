"""Reading checkpoints: the manifest checked and verified, then each file parsed.

A manifest is a JSON object listing every file of a checkpoint with its sha256 and size, the
format version, and the metadata of the save (who asked for it, when). Whatever a manifest or a
file holds (another JSON shape, garbage that matches the manifest, nesting deep enough to
exhaust the parser), reading it raises :class:`CorruptCheckpointError` naming the file, so a
resume can pass over it.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import zipfile
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from trainbus.engine.maps import (
    CHECKPOINTS_DIR,
    TRAINING_DIR,
    check_name,
    check_real_directory,
)
from trainbus.errors import CheckpointError, CorruptCheckpointError, UnsafePathError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
MAX_JSON_BYTES = 64 * 1024 * 1024
"""A manifest or a ``state.json`` larger than this is not one trainbus wrote."""

_JSON_TYPES = {
    dict: "an object",
    list: "an array",
    str: "a string",
    int: "a number",
    float: "a number",
    bool: "a boolean",
    type(None): "null",
}


def json_kind(value: object) -> str:
    """What a parsed JSON value is, in JSON's words (for error messages)."""
    return _JSON_TYPES.get(type(value), type(value).__name__)


def read_json_file(path: Path, what: str) -> Any:
    """Parse the JSON file ``path`` of checkpoint ``what``; any failure is *corrupt*."""
    try:
        size = path.stat().st_size
        if size > MAX_JSON_BYTES:
            raise CorruptCheckpointError(
                f"checkpoint file {path} is corrupt: {size} bytes, more than any {path.name} "
                f"trainbus writes ({MAX_JSON_BYTES})"
            )
        return json.loads(path.read_bytes())
    except FileNotFoundError:
        raise CorruptCheckpointError(
            f"checkpoint {what} is corrupt: {path.name} is missing"
        ) from None
    except RecursionError:
        raise CorruptCheckpointError(
            f"checkpoint {what} is corrupt: {path} cannot be read (JSON nested too deeply)"
        ) from None
    except (OSError, ValueError) as exc:
        raise CorruptCheckpointError(
            f"checkpoint {what} is corrupt: {path} cannot be read ({exc})"
        ) from exc


def load_manifest(directory: Path) -> dict[str, Any]:
    """A checkpoint's manifest, its shape checked, the files not verified (see read_manifest)."""
    refuse_links(directory)
    manifest = read_json_file(directory / MANIFEST, str(directory))
    if not isinstance(manifest, dict):
        raise CorruptCheckpointError(
            f"checkpoint {directory} is corrupt: its {MANIFEST} holds {json_kind(manifest)}, "
            "not an object"
        )
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
        if not (
            isinstance(expected, dict)
            and isinstance(expected.get("sha256"), str)
            and type(expected.get("size")) is int
        ):
            raise CorruptCheckpointError(
                f"checkpoint {directory} is corrupt: its manifest lists {name!r}: {expected!r}"
            )
    for key, kind in (("metadata", dict), ("kind", str), ("tag", str)):
        if key in manifest and not isinstance(manifest[key], kind):
            raise CorruptCheckpointError(
                f"checkpoint {directory} is corrupt: the {key!r} of its manifest is "
                f"{json_kind(manifest[key])}, not {json_kind(kind())}"
            )
    return manifest


def read_manifest(directory: Path) -> dict[str, Any]:
    """Read and verify a checkpoint's manifest against the files; raise if anything differs."""
    manifest = load_manifest(directory)
    for name, expected in manifest["files"].items():
        path = directory / check_name(name)  # a name with separators or '..' is refused
        if path.is_symlink():
            raise UnsafePathError(
                f"checkpoint file {path} is a symbolic link (to {os.path.realpath(path)}); "
                "trainbus never writes one, so the checkpoint was tampered with: refusing to "
                "read through it"
            )
        if not path.is_file():
            raise CorruptCheckpointError(f"checkpoint file {path} is corrupt: it is missing")
        actual = digest(path)
        if actual != {"sha256": expected["sha256"], "size": expected["size"]}:
            raise CorruptCheckpointError(
                f"checkpoint file {path} is corrupt: size {actual['size']} and sha256 "
                f"{actual['sha256'][:12]}... differ from the manifest's {expected['size']} "
                f"and {expected['sha256'][:12]}..."
            )
    return manifest


def load_weights_file(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; a file that does not parse is *corrupt*."""
    try:
        return safetensors.torch.load_file(str(path))
    except Exception as exc:  # the parser's own error types: any of them means unreadable
        raise corrupt(path, "not a safetensors file", exc) from exc


def load_torch_file(path: Path, *, mmap: bool) -> dict[str, Any]:
    """The dict a training state's torch file holds, read with ``weights_only=True``.

    ``mmap=True`` reads the pickle but maps the tensors without reading them: a cheap check.
    """
    # Only the zip archives torch.save writes can be mapped; another file is read whole by
    # the legacy unpickler (bounded by the size the manifest vouched for).
    mmap = mmap and zipfile.is_zipfile(path)
    try:
        tensors = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        offending = next((line for line in lines if "GLOBAL" in line), None)
        if offending is None:
            raise corrupt(path, "its pickle cannot be read", exc) from exc
        raise CheckpointError(
            f"refused to load {path}: {offending} A training state written by "
            "trainbus holds only tensors and plain values, so this file was not written by "
            "trainbus or was tampered with; do not load it with weights_only=False"
        ) from exc
    except Exception as exc:  # zip and tensor errors of torch: any of them means unreadable
        raise corrupt(path, "torch cannot read it", exc) from exc
    if not isinstance(tensors, dict):
        raise CorruptCheckpointError(
            f"checkpoint file {path} is corrupt: it holds a {type(tensors).__name__}, not the "
            "dict a training state holds"
        )
    return tensors


def read_document(path: Path) -> dict[str, Any]:
    """The JSON object of a checkpoint file (a training state's ``state.json``)."""
    document = read_json_file(path, str(path.parent))
    if not isinstance(document, dict):
        raise CorruptCheckpointError(
            f"checkpoint file {path} is corrupt: it holds {json_kind(document)}, not an object"
        )
    return document


def corrupt(path: Path, problem: str, exc: BaseException) -> CorruptCheckpointError:
    """The error for a file that matches its manifest yet cannot be parsed."""
    detail = " ".join(str(exc).split())[:200]
    return CorruptCheckpointError(
        f"checkpoint file {path} is corrupt: {problem} ({type(exc).__name__}: {detail}); its "
        "manifest matches it, so it was written or replaced by something else than trainbus"
    )


def refuse_links(directory: Path) -> None:
    """Refuse a checkpoint that is a symbolic link, or lies in a linked checkpoints/ or training/.

    trainbus never makes a link in a MAPS: one is a tampering that would have a resume read,
    or a rotation delete, files outside the MAPS.
    """
    if directory.parent.name in (CHECKPOINTS_DIR, TRAINING_DIR) and directory.parent.is_symlink():
        check_real_directory(directory.parent)
    if directory.is_symlink():
        raise UnsafePathError(
            f"checkpoint {directory} is a symbolic link (to {os.path.realpath(directory)}); "
            "trainbus never writes one, so the checkpoint was tampered with: refusing to read "
            "through it"
        )


def owned_by(directory: Path, owner: str, sources: Collection[str] = ()) -> bool:
    """Whether callback ``owner`` asked for the checkpoint in ``directory`` (files not verified).

    The manifest's ``owner`` decides when it is recorded. Otherwise ``requested_by`` (the id of
    the handler that asked) must be one of ``sources``, the callback's handler ids, or
    ``<owner>.<method>``: never a mere prefix, so the callback ``ckpt`` does not own what
    ``ckpt.steps`` asked for. An unreadable manifest belongs to nobody: a resume passes over
    it, a rotation never deletes it blindly.
    """
    try:
        metadata = load_manifest(directory).get("metadata", {})
    except (CheckpointError, UnsafePathError):
        return False
    return metadata_owned_by(metadata, owner, sources)


def metadata_owned_by(metadata: Mapping[str, Any], owner: str, sources: Collection[str]) -> bool:
    """:func:`owned_by` for the metadata of a manifest already read."""
    recorded = metadata.get("owner")
    if recorded is not None:
        return bool(recorded == owner)
    source = metadata.get("requested_by")
    if not isinstance(source, str):
        return False
    if source in sources:
        return True
    head, dot, method = source.rpartition(".")
    return bool(dot) and head == owner and method.isidentifier()


def digest(path: Path) -> dict[str, Any]:
    """The sha256 and size of a file, as a manifest lists them."""
    sha = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            sha.update(block)
    return {"sha256": sha.hexdigest(), "size": path.stat().st_size}
