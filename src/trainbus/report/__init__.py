"""Looking at runs: an HTML report of one or several MAPS, and a listing of the runs in a folder.

``trainbus report MAPS`` and ``trainbus runs DIR`` are the commands. Everything here only reads
a MAPS (never takes its lock), so it can look at a run while it trains; the report needs
matplotlib (``pip install 'trainbus[report]'``), the listing does not.
"""

from __future__ import annotations

from trainbus.report.reading import Run, find_maps, read_run
from trainbus.report.runs import format_rows, list_runs
from trainbus.report.writing import write_report

__all__ = ["Run", "find_maps", "format_rows", "list_runs", "read_run", "write_report"]
