"""Runs trained once per session for the report tests: real trainings into real MAPS."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pytest

from tests.report import making


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Mapping[str, Path]:
    """An early-stopped run, one crashed in its first epoch, a resumed one, one without
    Monitor or validation, and one whose names are markup, side by side in one folder."""
    root = tmp_path_factory.mktemp("runs")
    runs = dict(making.build_all(root))
    runs["hostile"] = making.hostile(root / making.HOSTILE_RUN)
    return runs
