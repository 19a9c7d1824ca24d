"""docs/reliability.md is the suite's own report: it lists every fault the suite injects."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPORT_END, REPORT_START

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "reliability.md"


def marked_faults() -> set[str]:
    names = set()
    for path in (ROOT / "tests").rglob("test_*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "fault"
                and node.args
            ):
                names.add(ast.literal_eval(node.args[0]))
    return names


def table_rows() -> dict[str, tuple[int, int]]:
    text = DOC.read_text()
    table = text.split(REPORT_START, 1)[1].split(REPORT_END, 1)[0]
    rows = {}
    for line in table.strip().splitlines()[2:]:
        cells = [cell.strip() for cell in line.strip("|").split(" | ")]
        rows[cells[0]] = (int(cells[1]), int(cells[2]))
    return rows


def test_every_fault_the_suite_injects_is_in_the_published_table() -> None:
    rows = table_rows()
    assert set(rows) == marked_faults(), (
        "docs/reliability.md is out of date: regenerate it with "
        "TRAINBUS_SLOW=1 TRAINBUS_RELIABILITY_REPORT=docs/reliability.md pytest -m fault"
    )
    assert all(trials >= 1 and passed == trials for trials, passed in rows.values())
    random_kills = next(v for k, v in rows.items() if k.startswith("SIGKILL at a random point"))
    assert random_kills[0] >= 20  # the slow mode's trials


def test_every_fault_marker_decorates_a_test() -> None:
    # A marker left on a helper (a class inserted between it and its test) marks no trial:
    # the fault would silently drop out of the published table.
    misplaced = []
    for path in (ROOT / "tests").rglob("test_*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.FunctionDef | ast.ClassDef):
                continue
            is_test = node.name.startswith("test_" if isinstance(node, ast.FunctionDef) else "Test")
            for decorator in node.decorator_list:
                if (
                    isinstance(decorator, ast.Call)
                    and isinstance(decorator.func, ast.Attribute)
                    and decorator.func.attr == "fault"
                    and not is_test
                ):
                    misplaced.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}")
    assert misplaced == []
