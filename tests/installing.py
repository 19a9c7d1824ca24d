"""Install distributions for real, offline, into a directory the tests put on the path."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import types
from collections.abc import Iterator, Mapping, Sequence
from email.parser import Parser
from pathlib import Path


def pip_install(target: Path, *sources: Path) -> None:
    """``pip install --target`` without dependencies, build isolation or an index."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--disable-pip-version-check",
            "--target",
            str(target),
            *map(str, sources),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def plugin_environment(
    target: Path, *, drop: Sequence[str] = (), **variables: str
) -> dict[str, str]:
    """This environment, with ``target`` first on PYTHONPATH and no plugin control set.

    ``drop`` names further variables to leave out (a plugin's own settings).
    """
    removed = {"TRAINBUS_DISABLE_PLUGIN_AUTOLOAD", "TRAINBUS_PLUGINS", *drop}
    environment = {key: value for key, value in os.environ.items() if key not in removed}
    environment["PYTHONPATH"] = os.pathsep.join(
        [str(target), *filter(None, [os.environ.get("PYTHONPATH")])]
    )
    environment.update(variables)
    return environment


def run_script(script: Path, work: Path, environment: Mapping[str, str], *arguments: str) -> None:
    """Run ``script`` with ``arguments`` in ``work``; fail the test with its output if it fails."""
    result = subprocess.run(
        [sys.executable, str(script), *arguments],
        env=dict(environment),
        cwd=work,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def check_installed_plugin(
    installed: Path, distribution: str, entry_point: str, requires: set[str]
) -> None:
    """The installed plugin declares its entry point, version, requirements and py.typed."""
    info = installed / f"{distribution.replace('-', '_')}-0.1.0.dist-info"
    name, _, target = entry_point.partition("=")
    assert (info / "entry_points.txt").read_text().split() == [
        "[trainbus.plugins]",
        *name.split(),
        "=",
        target.strip(),
    ]
    metadata = Parser().parsestr((info / "METADATA").read_text())
    assert metadata["Name"] == distribution
    assert metadata["Version"] == "0.1.0"
    assert {re.split(r"[<>=!~ ]", r)[0] for r in metadata.get_all("Requires-Dist", [])} == {
        "trainbus",
        *requires,
    }
    assert (installed / target.strip().partition(":")[0] / "py.typed").is_file()


@contextlib.contextmanager
def source_module(init: Path, name: str) -> Iterator[types.ModuleType]:
    """A plugin package imported from its source tree as ``name`` (its metadata not installed).

    Modules of that name loaded before are set aside and put back afterwards.
    """
    spec = importlib.util.spec_from_file_location(
        name, init, submodule_search_locations=[str(init.parent)]
    )
    assert spec is not None
    assert spec.loader is not None
    saved = {key: sys.modules.pop(key) for key in list(sys.modules) if key.startswith(name)}
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        for key in [key for key in sys.modules if key.startswith(name)]:
            del sys.modules[key]
        sys.modules.update(saved)


def install_copy(package: Path, base: Path) -> Path:
    """``package`` installed with pip into ``base/site``, from a copy (builds write in-tree)."""
    source = base / "source"
    shutil.copytree(
        package, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__")
    )
    target = base / "site"
    pip_install(target, source)
    return target
