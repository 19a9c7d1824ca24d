"""What ``maps.json`` holds: versions, configuration, the dispatch plan and every call."""

from __future__ import annotations

import platform
import sys
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import torch

from trainbus.engine.core import Engine, plain_values
from trainbus.engine.maps import MAPS_FILE

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
            name: {"class": type(m).__name__, "higher_is_better": m.higher_is_better}
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


def trainbus_version() -> str:
    """The installed trainbus version (``0.0.0+unknown`` from a source tree)."""
    try:
        return version("trainbus")
    except PackageNotFoundError:
        return "0.0.0+unknown"
