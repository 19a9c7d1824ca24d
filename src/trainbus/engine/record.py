"""What ``maps.json`` holds: versions, configuration, the dispatch plan and every call."""

from __future__ import annotations

import platform
import sys
import warnings
from collections.abc import Iterable, Mapping, Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import torch
from torch.utils.data import DataLoader

from trainbus.engine.compute import batch_size, claim_seeding
from trainbus.engine.core import Engine, plain_values
from trainbus.engine.maps import MAPS_FILE, Maps
from trainbus.errors import MapsError, TrainbusWarning

MAPS_FORMAT = "trainbus-maps/1"


def describe(engine: Engine) -> dict[str, Any]:
    """The ``maps.json`` document of the Trainer whose parts ``engine`` holds."""
    model = engine.model
    return {
        "format": MAPS_FORMAT,
        "versions": {
            "trainbus": trainbus_version(),
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "command": sys.argv,
        "seed": engine.seed,
        "initial_weights_seeded": engine.weights_seeded,
        "trainer": engine.settings_record(),
        "model": {
            "class": f"{type(model).__module__}.{type(model).__qualname__}",
            "parameters": sum(p.numel() for p in model.parameters()),
            "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "structure": repr(model),
        },
        "optimizers": [
            {"class": type(o).__qualname__, "defaults": plain_values(o.defaults)}
            for o in engine.optimizers
        ],
        "metrics": {
            name: {"class": m.info.metric_class, "higher_is_better": m.higher_is_better}
            for name, m in engine.metrics.items()
        },
        "callbacks": [
            {
                "id": c.callback_id,
                "class": f"{type(c).__module__}.{type(c).__qualname__}",
                "source": engine.sources[c.callback_id],
                "config": c.config(),
            }
            for c in engine.callbacks
        ],
        "plan": [entry.as_dict() for entry in engine.bus.plan()],
        "plugins": [record.as_dict() for record in engine.plugins],
        "calls": engine.calls,
    }


def write(engine: Engine) -> None:
    """Rewrite ``maps.json`` (atomically) once the MAPS exists."""
    if engine.maps.created:
        engine.maps.write_json(describe(engine), MAPS_FILE)


def seeding(seed: int | None, maps: Maps) -> tuple[int | None, bool | None]:
    """Seed a new Trainer's generators; its seed and what ``initial_weights_seeded`` records.

    The model's initial weights count as seeded when ``seed_everything(seed)`` was called
    before it was built and no other Trainer claimed that call (see
    :func:`~trainbus.engine.compute.claim_seeding`). A MAPS that already holds a run (resume,
    evaluation) keeps what it recorded: its weights come from its checkpoints. Otherwise a
    seed whose weights are not seeded warns once, with the fix. None without a seed.
    """
    covered = claim_seeding(seed)
    if seed is None:
        return None, None
    if maps.is_maps() and not maps.overwrite:
        return seed, _recorded_weights_seeded(maps)
    if not covered:
        warnings.warn(
            f"Trainer(seed={seed}): the model's initial weights were not seeded (they are "
            f"drawn when the model is built, before the Trainer seeds the generators), so two "
            f"runs with seed={seed} start from different weights, and maps.json records "
            f'"initial_weights_seeded": false; call trainbus.seed_everything({seed}) before '
            "building the model",
            TrainbusWarning,
            stacklevel=3,
        )
    return seed, covered


def _recorded_weights_seeded(maps: Maps) -> bool | None:
    try:
        document = maps.read_json(MAPS_FILE)
    except (MapsError, OSError, ValueError):
        return None  # the call that adopts the MAPS reports what is wrong with it
    value = document.get("initial_weights_seeded") if isinstance(document, dict) else None
    return value if isinstance(value, bool) else None


def loaders(named: Mapping[str, Iterable[Any] | None]) -> dict[str, dict[str, Any] | None]:
    """What a call's record says of its loaders: their batch size, by name (None: no loader).

    ``batch_size`` is the loader's own (``DataLoader.batch_size``, or its batch sampler's),
    or None when it cannot be known without loading data (a loader that yields ready-made
    batches, a custom batch sampler). For a sequence of ready-made batches (e.g. a list),
    ``observed`` adds the size of its first batch.
    """
    return {name: None if loader is None else _loader(loader) for name, loader in named.items()}


def _loader(loader: Iterable[Any]) -> dict[str, Any]:
    if isinstance(loader, DataLoader):
        size = loader.batch_size
        if size is None:
            size = getattr(loader.batch_sampler, "batch_size", None)
        return {"batch_size": size if type(size) is int else None}
    described: dict[str, Any] = {"batch_size": None}
    if isinstance(loader, Sequence) and len(loader) > 0:
        described["observed"] = batch_size(loader[0])
    return described


def trainbus_version() -> str:
    """The installed trainbus version (``0.0.0+unknown`` from a source tree)."""
    try:
        return version("trainbus")
    except PackageNotFoundError:
        return "0.0.0+unknown"
