"""MkDocs hooks: the parts of the pages that are generated from the code at build time.

A page asks for generated text with an HTML comment on a line of its own:

- ``<!-- generated: event-table -->``: the event catalogue as a table, from
  :data:`trainbus.events.catalog.EVENTS` and the map of where each event fires;
- ``<!-- generated: event-map -->``: that map itself, from the catalogue's docstring;
- ``<!-- generated: plan FILE [ARGS] -->``: the output of ``trainbus plan ARGS FILE``;
- ``<!-- generated: cli-help -->``: the ``--help`` of the command and of each subcommand.

Nothing of it is written by hand, so it cannot drift from the code. An unknown request fails
the build.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
_REQUEST = re.compile(r"^<!-- generated: (?P<what>[\w-]+)(?P<arguments>[^>]*?) -->$", re.M)

COMMANDS_EVERYWHERE = "`Stop`, saves"
NO_EFFECT: dict[str, str] = {
    # No call runs yet: every call starts with no stop and no save pending.
    "trainer_init": "none (no call runs yet)",
    # The failing call is over: what exception handlers return is discarded.
    "exception": "none (discarded)",
    # The call is ending: no boundary is left to carry a request out.
    "teardown": "none (the call is over; a warning names a save asked here)",
}
"""Events where a command a handler returns has no effect (``tests/test_docs.py`` checks it)."""


def commands_at(name: str, *, skippable: bool) -> str:
    """What a handler may ask for at the event ``name``, as a table cell."""
    if name in NO_EFFECT:
        return NO_EFFECT[name]
    if skippable:
        return f"{COMMANDS_EVERYWHERE}, `SkipStep`"
    return COMMANDS_EVERYWHERE


# ----------------------------------------------------------------- the map of where events fire
@dataclass
class Firing:
    """One place in the map where an event fires."""

    call: str
    blocks: list[str] = field(default_factory=list)
    repeat: str = ""
    note: str = ""

    def describe(self) -> str:
        parts = [f"`{self.call}`", *self.blocks]
        text = " \N{SINGLE RIGHT-POINTING ANGLE QUOTATION MARK} ".join(parts)
        if self.repeat:
            text += f" ({self.repeat})"
        if self.note:
            text += f": {self.note}"
        return text


def event_map() -> str:
    """The pseudo-code map of where each event fires, from the catalogue's docstring."""
    from trainbus.events import catalog

    doc = catalog.__doc__ or ""
    start = doc.index("::\n\n") + len("::\n\n")
    lines: list[str] = []
    for line in doc[start:].splitlines():
        if line and not line.startswith(" "):
            break
        lines.append(line)
    return "\n".join(line.removeprefix("    ") for line in lines).strip("\n")


def _block_text(header: str) -> str:
    """A block header of the map as a short phrase ("repeat for each epoch" -> "each epoch")."""
    text = header.rstrip(":")
    for prefix in ("repeat for ", "optionally, "):
        text = text.removeprefix(prefix)
    return text


def firings() -> dict[str, list[Firing]]:
    """Every event of the map with the places it fires, in the map's order."""
    from trainbus.events.catalog import EVENTS

    found: dict[str, list[Firing]] = {}
    call = ""
    stack: list[tuple[int, str]] = []
    line_pattern = re.compile(r"^(?P<indent> *)(?P<name>\w+)(?P<mark>[?*]?)(?: {2,}(?P<note>.*))?$")
    for line in event_map().splitlines():
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        if indent == 0:
            call = line.rstrip(":")
            call = re.sub(r"\(.+\)", "(...)" if call.startswith("Trainer") else "()", call)
            stack = []
            continue
        while stack and stack[-1][0] >= indent:
            stack.pop()
        matched = line_pattern.match(line)
        if matched and matched["name"] in EVENTS:
            repeat = {"?": "at most once", "*": "any number of times"}.get(matched["mark"], "")
            found.setdefault(matched["name"], []).append(
                Firing(call, [text for _, text in stack], repeat, matched["note"] or "")
            )
        else:
            stack.append((indent, _block_text(line.strip())))
    return found


def event_table() -> str:
    """The catalogue as a Markdown table: name, payload, where it fires, commands."""
    from trainbus.events.catalog import COMMON_PAYLOAD, EVENTS

    places = firings()
    rows = [
        f"Every event carries {', '.join(f'`{name}`' for name in COMMON_PAYLOAD)}; the "
        "payload column lists what an event adds. In the last column, saves are "
        "`SaveCheckpoint` and `SaveTrainingState`. Generated from `trainbus.events.catalog` "
        "when the site is built.",
        "",
        "| event | payload it adds | what it announces | where it fires | commands |",
        "|---|---|---|---|---|",
    ]
    for name, spec in EVENTS.items():
        payload = ", ".join(f"`{item}`" for item in spec.payload) or "-"
        where = "<br>".join(place.describe() for place in places.get(name, ()))
        if not where:
            where = "when a call fails (see the map below)"
        rows.append(
            f"| `{name}` | {payload} | {_cell(spec.doc)} | {_cell(where)} | "
            f"{commands_at(name, skippable=spec.skippable)} |"
        )
    return "\n".join(rows)


def _cell(text: str) -> str:
    """``text`` safe inside a table cell."""
    return text.replace("|", "\\|").replace("\n", " ")


# ----------------------------------------------------------------- command outputs
def _environment() -> dict[str, str]:
    environment = dict(os.environ)
    # Installed plugin packages would add their subscribers to the plans shown.
    environment["TRAINBUS_DISABLE_PLUGIN_AUTOLOAD"] = "1"
    environment["COLUMNS"] = "100"
    return environment


def plan(arguments: str) -> str:
    """The output of ``trainbus plan`` for a script of the docs, as a text block."""
    *options, script = shlex.split(arguments)
    path = ROOT / "docs" / script
    command = [sys.executable, "-m", "trainbus.cli", "plan", *options, str(path)]
    with tempfile.TemporaryDirectory() as scratch:
        result = subprocess.run(
            command,
            cwd=scratch,
            env=_environment(),
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
    if result.returncode != 0:
        raise RuntimeError(f"{shlex.join(command)} failed:\n{result.stderr}")
    shown = shlex.join(["trainbus", "plan", *options, f"docs/{script}"])
    return f"```text\n$ {shown}\n{result.stdout.rstrip()}\n```"


def cli_help() -> str:
    """``trainbus --help`` and the help of every subcommand, one section each."""
    from trainbus.cli import main

    def help_of(arguments: list[str]) -> str:
        output = io.StringIO()
        with _columns("100"), contextlib.redirect_stdout(output), contextlib.suppress(SystemExit):
            main([*arguments, "--help"])
        return output.getvalue().rstrip()

    top = help_of([])
    # The subcommands are listed under COMMAND, one per line, indented by four spaces.
    names = re.findall(r"^    (\w+) ", top.partition("COMMAND\n")[2], re.M)
    if not names:
        raise RuntimeError("trainbus --help lists no subcommands")
    parts = [f"```text\n$ trainbus --help\n{top}\n```"]
    for name in names:
        parts.append(f"## `trainbus {name}`\n\n```text\n$ trainbus {name} --help\n")
        parts[-1] += f"{help_of([name])}\n```"
    return "\n\n".join(parts)


@contextlib.contextmanager
def _columns(width: str) -> Iterator[None]:
    """argparse wraps its help to $COLUMNS: a fixed width gives the same page everywhere."""
    saved = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = width
    try:
        yield
    finally:
        if saved is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = saved


# ----------------------------------------------------------------- MkDocs
def generate(what: str, arguments: str) -> str:
    """The Markdown for one request."""
    if what == "event-table" and not arguments:
        return event_table()
    if what == "event-map" and not arguments:
        return f"```text\n{event_map()}\n```"
    if what == "plan" and arguments:
        return plan(arguments)
    if what == "cli-help" and not arguments:
        return cli_help()
    raise ValueError(f"unknown request <!-- generated: {what}{arguments} -->")


def on_page_markdown(markdown: str, page: Any, **_: Any) -> str:
    """Replace every request of the page by its generated text."""

    def replace(found: re.Match[str]) -> str:
        try:
            return generate(found["what"], found["arguments"].strip())
        except Exception as error:
            raise RuntimeError(f"{page.file.src_path}: {error}") from error

    return _REQUEST.sub(replace, markdown)
