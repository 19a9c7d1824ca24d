"""The documentation site: it builds strictly, covers the public API, and its code runs.

The site is built once per session with ``mkdocs build --strict`` (a broken link, a missing
reference or a docstring the handler cannot parse fails it). The guides show Python only
through files included from ``docs/snippets/`` (run here) or ``examples/`` (run by
``tests/test_examples.py``), so every Python block a reader sees is executed.
"""

from __future__ import annotations

import dataclasses
import html
import inspect
import json
import os
import re
import runpy
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import trainbus
from tests.browsing import chromium, console, needs_chromium
from trainbus.events import EVENTS, Callback

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
SNIPPETS = DOCS / "snippets"
EXAMPLES = ROOT / "examples"
PAGES = sorted(DOCS.rglob("*.md"))


def environment() -> dict[str, str]:
    """The variables of this process, without plugin packages another test installed."""
    variables = dict(os.environ)
    variables["TRAINBUS_DISABLE_PLUGIN_AUTOLOAD"] = "1"
    variables["NO_MKDOCS_2_WARNING"] = "1"  # a notice the theme prints on every build
    return variables


@pytest.fixture(scope="session")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The site, built once with the command `make docs` runs."""
    built = tmp_path_factory.mktemp("site")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mkdocs",
            "build",
            "--strict",
            "--config-file",
            str(ROOT / "mkdocs.yml"),
            "--site-dir",
            str(built),
        ],
        cwd=ROOT,
        env=environment(),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-8000:]
    return built


def reference_html(site: Path) -> str:
    return "\n".join(page.read_text() for page in sorted((site / "reference").glob("*.html")))


def heading_ids(text: str) -> set[str]:
    return {html.unescape(found) for found in re.findall(r'<h\d id="([^"]+)"', text)}


# ----------------------------------------------------------------- the reference
def test_the_reference_documents_every_public_name(site: Path) -> None:
    ids = heading_ids(reference_html(site))
    missing = [
        name
        for name in trainbus.__all__
        if f"trainbus.{name}" not in ids and not any(i.endswith(f".{name}") for i in ids)
    ]
    assert not missing, f"public names without a heading in docs/reference/: {missing}"


def test_every_field_of_the_state_is_documented(site: Path) -> None:
    ids = heading_ids((site / "reference" / "state.html").read_text())
    fields = [field.name for field in dataclasses.fields(trainbus.TrainerState)]
    assert [f for f in fields if f"trainbus.TrainerState.{f}" not in ids] == []


def section(text: str, name: str) -> str:
    """The part of a reference page about ``trainbus.<name>``, up to the next public name."""
    start = text.index(f'id="trainbus.{name}"')
    following = re.compile(r'id="trainbus\.[A-Za-z_]+"').search(text, start + 1)
    return text[start : following.start() if following else len(text)]


def test_every_built_in_callback_documents_each_option(site: Path) -> None:
    text = (site / "reference" / "callbacks.html").read_text()
    callbacks = [
        name
        for name in trainbus.__all__
        if isinstance(getattr(trainbus, name), type)
        and issubclass(getattr(trainbus, name), Callback)
        and getattr(trainbus, name) is not Callback
    ]
    assert len(callbacks) >= 7
    for name in callbacks:
        options = inspect.signature(getattr(trainbus, name).__init__).parameters
        described = section(text, name)
        for option in options:
            if option != "self":
                # ``option`` or ``option=value`` in the docstring, as code
                assert re.search(f"<code>{option}(=[^<]*)?</code>", described), f"{name}({option})"


def table_rows(page: str) -> dict[str, list[str]]:
    """The rows of the page's tables, by the text of their first cell."""
    rows: dict[str, list[str]] = {}
    for row in re.findall(r"<tr>(.*?)</tr>", page, re.DOTALL):
        cells = re.findall(r"<td[^>]*>(.*?)</td>", row, re.DOTALL)
        if cells:
            rows[re.sub(r"<[^>]+>", "", cells[0]).strip()] = cells
    return rows


def test_the_event_table_lists_every_event_with_its_payload(site: Path) -> None:
    rows = table_rows((site / "reference" / "events.html").read_text())
    for name, spec in EVENTS.items():
        assert name in rows, f"event {name!r} is missing from the table"
        _, payload, _, where, commands = rows[name]
        assert set(re.findall(r"<code>(\w+)</code>", payload)) == set(spec.payload), name
        assert where.strip(), name
        assert ("SkipStep" in commands) == spec.skippable, name


def test_commands_at_the_events_the_table_marks_have_no_effect(tmp_path: Path) -> None:
    """What docs/hooks.py says of trainer_init, exception and teardown is what happens."""
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from trainbus import SaveCheckpoint, Stop, SupervisedModel, Trainer
    from trainbus.errors import TrainbusWarning

    no_effect = runpy.run_path(str(DOCS / "hooks.py"))["NO_EFFECT"]
    assert set(no_effect) == {"trainer_init", "exception", "teardown"}
    loader = DataLoader(TensorDataset(torch.randn(8, 2), torch.zeros(8).long()), batch_size=4)

    class Asking(Callback):
        def on_trainer_init(self, *, state):
            return [Stop("asked at trainer_init"), SaveCheckpoint("trainer-init")]

        def on_exception(self, *, state):
            return SaveCheckpoint("exception")

        def on_teardown(self, *, state):
            return SaveCheckpoint("teardown")

    def trainer(maps: Path) -> Trainer:
        model = SupervisedModel(nn.Linear(2, 2), nn.CrossEntropyLoss())
        return Trainer(maps, model, callbacks=[Asking()], default_callbacks=False, max_epochs=2)

    with pytest.warns(TrainbusWarning, match=r"not written: SaveCheckpoint\(tag='teardown'"):
        state = trainer(tmp_path / "ran").train(loader)
    assert state.stopped_by is None and state.current_epoch == 1
    failing = trainer(tmp_path / "failed")

    @failing.on("batch_end")
    def fail(*, state: object) -> None:
        raise RuntimeError("a failing handler")

    with pytest.raises(RuntimeError, match="a failing handler"):
        failing.train(loader)
    for maps in (tmp_path / "ran", tmp_path / "failed"):
        checkpoints = maps / "checkpoints"
        assert not checkpoints.exists() or not any(checkpoints.iterdir()), maps


# ----------------------------------------------------------------- the guides' code
FENCE = re.compile(r"^(?P<indent> *)(?P<fence>`{3,}|~{3,})(?P<info>[^\n`]*)$")
INCLUDE = re.compile(r'^--8<-- "(?P<path>[^":]+)(?::(?P<part>[\w-]+))?"$')


def fenced_blocks(page: Path) -> list[tuple[str, list[str]]]:
    """Every fenced block of a Markdown page: its info string and its lines."""
    blocks: list[tuple[str, list[str]]] = []
    lines = page.read_text().splitlines()
    index = 0
    while index < len(lines):
        opened = FENCE.match(lines[index])
        index += 1
        if not opened:
            continue
        body: list[str] = []
        while index < len(lines) and lines[index].strip() != opened["fence"]:
            body.append(lines[index].strip())
            index += 1
        index += 1
        blocks.append((opened["info"].strip(), body))
    return blocks


def is_python(info: str) -> bool:
    language = info.lstrip("{").lstrip(".").split()[0] if info else ""
    return language in {"python", "py", "python3", "py3", "pycon"}


def included_scripts() -> dict[Path, set[str]]:
    """The files the pages' Python blocks include, with the parts of each they show."""
    scripts: dict[Path, set[str]] = {}
    for page in PAGES:
        for info, body in fenced_blocks(page):
            if not is_python(info) or ".no-run" in info:
                continue
            for line in body:
                found = INCLUDE.match(line)
                if found:
                    path = (SNIPPETS / found["path"]).resolve()
                    if not path.exists():
                        path = (ROOT / found["path"]).resolve()
                    scripts.setdefault(path, set()).add(found["part"] or "")
    return scripts


def test_every_python_block_of_the_docs_is_a_script_the_tests_run() -> None:
    shown = 0
    for page in PAGES:
        for info, body in fenced_blocks(page):
            if not is_python(info):
                continue
            where = f"{page.relative_to(ROOT)}: ```{info}"
            if ".no-run" in info:
                assert "not run" in info, f"{where}: a block not run says so in its title"
                continue
            assert body and all(INCLUDE.match(line) for line in body), (
                f"{where}: Python in the docs is included from a script the tests run "
                '(--8<-- "script.py:part"), not written inline'
            )
            shown += 1
    assert shown >= 10
    tested_examples = (ROOT / "tests" / "test_examples.py").read_text()
    for path, parts in included_scripts().items():
        assert path.exists(), path
        if path.parent == EXAMPLES:
            assert path.name in tested_examples, f"{path.name} is not run by test_examples.py"
        else:
            assert path.parent == SNIPPETS, f"{path}: include scripts from docs/snippets/"
        text = path.read_text()
        for part in parts - {""}:
            assert f"# --8<-- [start:{part}]" in text, f"{path.name} has no part {part!r}"


def test_every_snippet_is_shown_in_a_page() -> None:
    shown = set(included_scripts())
    orphans = [p.name for p in SNIPPETS.glob("*.py") if p.resolve() not in shown]
    assert not orphans, f"scripts in docs/snippets/ that no page shows: {orphans}"


SCRIPTS = sorted(p.name for p in SNIPPETS.glob("*.py"))


@pytest.fixture(scope="session")
def snippet_runs(
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, subprocess.CompletedProcess[str]]:
    """Every script of docs/snippets/ run once, each in a new directory, two at a time.

    Most of a script's few seconds is importing torch, which runs well side by side with
    another script's training.
    """

    def run(script: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, str(SNIPPETS / script)],
            cwd=tmp_path_factory.mktemp(Path(script).stem),
            env=environment(),
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(SCRIPTS, pool.map(run, SCRIPTS), strict=True))


@pytest.mark.parametrize("script", SCRIPTS)
def test_snippet_runs(
    script: str, snippet_runs: dict[str, subprocess.CompletedProcess[str]]
) -> None:
    result = snippet_runs[script]
    assert result.returncode == 0, f"{script} failed:\n{result.stderr[-6000:]}"


# ----------------------------------------------------------------- in a browser
@needs_chromium
@pytest.mark.parametrize(
    ("page", "expected"),
    [("index.html", "Getting started"), ("reference/trainer.html", 'id="trainbus.Trainer"')],
)
def test_pages_render_from_disk_without_console_errors(
    site: Path, page: str, expected: str
) -> None:
    result = chromium(site / page, "--dump-dom")
    assert result.returncode == 0, result.stderr[-4000:]
    assert console(result) == []
    dom = result.stdout
    assert 'class="md-content"' in dom  # the theme laid the page out
    assert expected in dom
    assert 'data-md-component="search-query"' in dom  # the search box is there


def test_the_search_index_holds_the_reference(site: Path) -> None:
    index = json.loads((site / "search" / "search_index.json").read_text())
    locations = {entry["location"] for entry in index["docs"]}
    for name in ("Trainer", "EarlyStoppingCallback", "TrainerState", "Stop"):
        assert any(location.endswith(f"#trainbus.{name}") for location in locations), name
    # Pages opened from disk search through the index written as a script.
    assert (site / "search" / "search_index.js").stat().st_size > 0
