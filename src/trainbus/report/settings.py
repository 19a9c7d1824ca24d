"""A run's settings as flat ``name -> text`` pairs, and the ones that differ between runs."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from trainbus.report.reading import Run

__all__ = ["differing", "flatten"]


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True, default=str)


def flatten(run: Run) -> dict[str, str]:
    """Seed, loop settings, model, optimizers, metrics, callbacks, loaders, versions and
    installed packages, one entry per value."""
    document = run.document
    flat: dict[str, str] = {}
    if "seed" in document:
        flat["seed"] = _text(document["seed"])
    for name, value in run.settings.items():
        flat[f"trainer.{name}"] = _text(value)
    model = document.get("model")
    if isinstance(model, dict):
        for key in ("class", "parameters", "trainable_parameters"):
            if key in model:
                flat[f"model.{key}"] = _text(model[key])
    optimizers = document.get("optimizers")
    for index, optimizer in enumerate(optimizers if isinstance(optimizers, list) else []):
        if not isinstance(optimizer, dict):
            continue
        flat[f"optimizer[{index}].class"] = _text(optimizer.get("class"))
        defaults = optimizer.get("defaults")
        for key, value in (defaults if isinstance(defaults, dict) else {}).items():
            flat[f"optimizer[{index}].{key}"] = _text(value)
    metrics = document.get("metrics")
    for name, spec in (metrics if isinstance(metrics, dict) else {}).items():
        flat[f"metric.{name}"] = _text(spec.get("class") if isinstance(spec, dict) else spec)
    callbacks = document.get("callbacks")
    for callback in callbacks if isinstance(callbacks, list) else []:
        if not isinstance(callback, dict):
            continue
        ident = callback.get("id")
        flat[f"callback.{ident}"] = _text(callback.get("class"))
        config = callback.get("config")
        for key, value in (config if isinstance(config, dict) else {}).items():
            flat[f"callback.{ident}.{key}"] = _text(value)
    calls = run.train_calls
    loaders = calls[-1].get("loaders") if calls else None
    for stage, loader in (loaders if isinstance(loaders, dict) else {}).items():
        if isinstance(loader, dict):
            for key, value in loader.items():
                flat[f"loader.{stage}.{key}"] = _text(value)
        else:
            flat[f"loader.{stage}"] = _text(loader)
    versions = document.get("versions")
    for name, version in (versions if isinstance(versions, dict) else {}).items():
        flat[f"version.{name}"] = _text(version)
    packages = (run.environment or {}).get("packages")
    for name, version in (packages if isinstance(packages, dict) else {}).items():
        flat[f"package.{name}"] = _text(version)
    return flat


def differing(runs: Sequence[Run]) -> list[tuple[str, list[str]]]:
    """The settings whose values are not the same in every run (``-`` where one lacks it);
    packages are compared only between runs that recorded their environment."""
    flats = [flatten(run) for run in runs]
    names: list[str] = []
    for flat in flats:
        names.extend(n for n in flat if n not in names)
    rows = []
    for name in names:
        values = [flat.get(name, "-") for flat in flats]
        if name.startswith("package."):
            recorded = [v for run, v in zip(runs, values, strict=True) if run.environment]
            if len(set(recorded)) <= 1:
                continue
        elif len(set(values)) <= 1:
            continue
        rows.append((name, values))
    return rows
