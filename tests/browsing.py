"""Headless Chromium for the tests of web pages: the report and the documentation site.

Debian's ``chromium`` opens a page from disk, offline, with a fresh profile. The DOM it dumps
(``--dump-dom``) is the page after parsing and after its scripts ran, and its log on stderr
carries every console message, so a script error or a blocked script shows up.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

CHROMIUM = next(
    filter(None, (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome"))),
    None,
)
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="no chromium binary on PATH (Debian: apt-get install chromium)"
)


def chromium(page: Path, *options: str) -> subprocess.CompletedProcess[str]:
    """Open ``page`` in headless Chromium with ``options`` (e.g. ``--dump-dom``)."""
    assert CHROMIUM is not None
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run(
            [
                CHROMIUM,
                "--headless",
                "--no-sandbox",  # tests may run as root, where the sandbox refuses to start
                "--disable-gpu",
                "--no-first-run",
                f"--user-data-dir={profile}",
                "--enable-logging=stderr",
                "--v=0",
                "--hide-scrollbars",
                *options,
                page.resolve().as_uri(),
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )


def console(result: subprocess.CompletedProcess[str]) -> list[str]:
    """The console messages of the page (errors, warnings, logs) from Chromium's log."""
    return [line for line in result.stderr.splitlines() if ":CONSOLE" in line]
