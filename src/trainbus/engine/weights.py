"""Loading weights: a verified checkpoint into a model, or nothing when they do not fit."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainbus.engine.checkpoint import REPLACED_PREFIX, WEIGHTS
from trainbus.engine.manifest import load_weights_file, read_manifest
from trainbus.engine.maps import CHECKPOINTS_DIR, MAPS_FILE, check_name, check_real_directory
from trainbus.errors import CheckpointError, ConfigurationTypeError, UnsafePathError


def load_weights(
    path: str | os.PathLike[str],
    model: nn.Module,
    *,
    tag: str | None = None,
    strict: bool = True,
) -> dict[str, Any]:
    """Verify a weights checkpoint and load it into ``model``; returns its manifest.

    ``path`` is a checkpoint directory, or a MAPS directory with ``tag`` naming the checkpoint
    (``"last"`` when omitted). Weights saved from a wrapper (e.g. ``SupervisedModel``, whose
    keys start with ``network.``) load into the bare network: the wrapper's prefix is removed
    when that makes the keys match. Only tensors are read (safetensors): no code can run.
    """
    _check_load_arguments(path, model, tag, strict)
    directory = Path(path)
    name: str | None = None
    if (directory / MAPS_FILE).is_file() or tag is not None:
        name = tag or "last"
        if (directory / CHECKPOINTS_DIR).is_symlink():
            check_real_directory(directory / CHECKPOINTS_DIR)
        directory = directory / CHECKPOINTS_DIR / name
    if not directory.is_dir():
        # Killed between the two renames of a replacement: the previous one is still whole.
        aside = sorted(directory.parent.glob(f"{REPLACED_PREFIX}{directory.name}-*"))
        if aside:
            directory = aside[-1]
    if not directory.is_dir() and name is not None:
        root = directory.parent
        held = sorted(
            p.name for p in (root.iterdir() if root.is_dir() else ()) if p.name[:1] != "."
        )
        raise CheckpointError(
            f"no checkpoint {name!r} in {os.fspath(path)!r}; its {CHECKPOINTS_DIR}/ holds {held}: "
            "pass tag= one of those names (e.g. 'last' or 'best-loss')"
        )
    if not directory.is_dir():
        raise CheckpointError(
            f"no checkpoint at {str(directory)!r}; pass a checkpoint directory, or the MAPS "
            "with tag= one of its checkpoints/ names (e.g. 'last' or 'best-loss')"
        )
    manifest = read_manifest(directory)
    state = _match_keys(load_weights_file(directory / WEIGHTS), model)
    check_fit(state, model, repr(str(directory)), strict=strict)
    model.load_state_dict(state, strict=strict)
    return manifest


def _check_load_arguments(path: object, model: object, tag: object, strict: object) -> None:
    if not isinstance(path, str | os.PathLike):
        raise ConfigurationTypeError(
            f"load_weights: path={path!r} is not a path; pass a checkpoint directory, or a MAPS "
            "directory with tag= one of its checkpoints/ names"
        )
    if not isinstance(model, nn.Module):
        raise ConfigurationTypeError(
            f"load_weights: model={model!r} is not a torch.nn.Module; pass the model (or its "
            "network) to load the weights into"
        )
    if tag is not None:
        if not isinstance(tag, str):
            raise ConfigurationTypeError(
                f"load_weights: tag={tag!r} is not a string; pass a checkpoints/ name such as "
                "'last' or 'best-loss', or None for 'last'"
            )
        try:
            check_name(tag)
        except UnsafePathError:
            raise UnsafePathError(
                f"load_weights: tag={tag!r} is not a checkpoint name (one path component, no "
                "separators, '.' or '..'); pass a checkpoints/ name such as 'last' or "
                "'best-loss', or None for 'last'"
            ) from None
    if not isinstance(strict, bool):
        raise ConfigurationTypeError(
            f"load_weights: strict={strict!r} is not a bool; pass True to require every key "
            "to match, False to load the matching keys only"
        )


def check_fit(
    state: Mapping[str, torch.Tensor],
    model: nn.Module,
    source: str,
    *,
    strict: bool,
    remedy: str = (
        "Load them into a model built like the one that saved them (or its network), or pass "
        "strict=False to load the keys both have"
    ),
) -> None:
    """Refuse weights that do not fit ``model`` before any of them is copied into it.

    ``source`` names where the weights come from; ``remedy`` says what to do instead.
    """
    expected = model.state_dict()
    problems = [
        f"{key}: saved {tuple(value.shape)}, model {tuple(expected[key].shape)}"
        for key, value in state.items()
        if key in expected and expected[key].shape != value.shape
    ]
    if strict:
        missing = sorted(expected.keys() - state.keys())
        unexpected = sorted(state.keys() - expected.keys())
        if missing:
            problems.append(f"missing {missing[:5]}" + (" ..." if len(missing) > 5 else ""))
        if unexpected:
            problems.append(
                f"unexpected {unexpected[:5]}" + (" ..." if len(unexpected) > 5 else "")
            )
    if problems:
        raise CheckpointError(
            f"the weights in {source} do not fit model {type(model).__name__} "
            f"({'; '.join(problems)}); the model was left unchanged. {remedy}"
        )


def _match_keys(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    wanted = set(model.state_dict())
    if set(state) == wanted or not state:
        return state
    for prefix in sorted({key.split(".", 1)[0] + "." for key in state if "." in key}):
        stripped = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if set(stripped) == wanted:
            return stripped
    return state
