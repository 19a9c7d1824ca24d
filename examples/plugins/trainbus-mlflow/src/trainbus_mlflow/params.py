"""MLflow params, tags and metric keys from what a trainbus run records."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

MAX_PARAM_CHARS = 500
"""Longest param value sent: the limit of the oldest MLflow servers still in use."""

_NOT_IN_KEY = re.compile(r"[^/\w.\- ]")


def run_params(document: Mapping[str, Any]) -> dict[str, str]:
    """The params of a run from its ``maps.json`` document.

    The Trainer's settings under their own names (``max_epochs``, ``precision``, ...),
    ``seed``, ``model.class``, ``model.parameters`` and the optimizer's class and defaults as
    ``optimizer.class``, ``optimizer.lr``, ... (``optimizer.<i>.*`` for several).
    """
    params: dict[str, str] = {}
    _flatten("", document.get("trainer", {}), params)
    params["seed"] = _text(document.get("seed"))
    model = document.get("model", {})
    for name in ("class", "parameters"):
        if name in model:
            params[f"model.{name}"] = _text(model[name])
    optimizers = document.get("optimizers", [])
    for index, optimizer in enumerate(optimizers):
        prefix = "optimizer." if len(optimizers) == 1 else f"optimizer.{index}."
        params[f"{prefix}class"] = _text(optimizer.get("class"))
        _flatten(prefix, optimizer.get("defaults", {}), params)
    return params


def metric_key(name: str) -> str:
    """``name`` with every character MLflow refuses in a metric key replaced by ``_``."""
    return _NOT_IN_KEY.sub("_", name)


def _flatten(prefix: str, values: Mapping[str, Any], into: dict[str, str]) -> None:
    for key, value in values.items():
        if isinstance(value, Mapping) and value:
            _flatten(f"{prefix}{key}.", value, into)
        else:
            into[metric_key(f"{prefix}{key}")] = _text(value)


def _text(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= MAX_PARAM_CHARS else text[: MAX_PARAM_CHARS - 3] + "..."
