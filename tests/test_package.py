"""The package as a dependency: public API, typing marker, and an import without side effects."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest

import trainbus


def test_all_is_sorted_and_every_name_exists() -> None:
    assert trainbus.__all__ == sorted(trainbus.__all__)
    for name in trainbus.__all__:
        assert hasattr(trainbus, name), name


def test_py_typed_marker_ships_with_the_package() -> None:
    assert resources.files("trainbus").joinpath("py.typed").is_file()


def test_importing_trainbus_has_no_side_effects() -> None:
    probe = """
import json, logging, signal, sys, warnings
import pynvml
nvml_calls = []
pynvml.nvmlInit = lambda *args, **kwargs: nvml_calls.append(args)
handlers_before = list(logging.getLogger().handlers)
sigint, sigterm = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
import trainbus, trainbus.cli
light = "torch" not in sys.modules  # `trainbus runs` and `report` need no torch
for name in trainbus.__all__:
    getattr(trainbus, name)  # every public name imported: still no side effect
import structlog, torch
print(json.dumps({
    "import_without_torch": light,
    "root_handlers_added": len(logging.getLogger().handlers) - len(handlers_before),
    "structlog_configured": structlog.is_configured(),
    "cuda_initialised": torch.cuda.is_initialized(),
    "nvml_initialised": bool(nvml_calls),
    "sklearn_imported": "sklearn" in sys.modules,
    "demo_imported": "trainbus.demo.run" in sys.modules,
    "signals_unchanged": signal.getsignal(signal.SIGINT) is sigint
        and signal.getsignal(signal.SIGTERM) is sigterm,
}))
"""
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120
    )
    assert json.loads(result.stdout) == {
        "import_without_torch": True,
        "root_handlers_added": 0,
        "structlog_configured": False,
        "cuda_initialised": False,
        "nvml_initialised": False,
        "sklearn_imported": False,
        "demo_imported": False,
        "signals_unchanged": True,
    }


SOURCE = Path(trainbus.__file__).parent
LAYERS = {
    # module (or package) -> imports it must never make
    "errors.py": {"torch", "blinker", "trainbus"},
    "events": {
        "torch",
        "trainbus.engine",
        "trainbus.handlers",
        "trainbus.demo",
        "trainbus.trainer",
    },
    "engine": {
        "trainbus.handlers",
        "trainbus.trainer",
        "trainbus.registration",
        "trainbus.cli",
        "trainbus.demo",
    },
    "engine/maps.py": {"torch"},
    "handlers": {"trainbus.trainer", "trainbus.registration", "trainbus.cli", "trainbus.demo"},
}


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_imports_point_down_only(layer: str) -> None:
    target = SOURCE / layer
    files = sorted(target.rglob("*.py")) if target.is_dir() else [target]
    assert files
    for path in files:
        for module in imported_modules(path):
            for forbidden in LAYERS[layer]:
                assert module != forbidden and not module.startswith(forbidden + "."), (
                    f"{path.relative_to(SOURCE)} imports {module}, above its layer"
                )
