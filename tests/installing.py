"""Install distributions for real, offline, into a directory the tests put on the path."""

from __future__ import annotations

import subprocess
import sys
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
