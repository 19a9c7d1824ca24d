"""A Griffe extension: the docstrings' reStructuredText roles, read as Markdown.

trainbus's docstrings name other objects with roles (``:class:`~trainbus.Stop```) and open
literal blocks with ``::``. mkdocstrings reads docstrings as Markdown, where both would show
as typed. This extension rewrites them before rendering: a role whose target the reference
documents becomes a link to it, any other role becomes code, and ``::`` ending a paragraph
becomes ``:`` (a ``::`` alone on its line goes; the indented block after it is already a
Markdown code block).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import griffe

_ROLE = re.compile(r":(?:class|func|meth|attr|data|mod|exc|obj):`(~?)([\w.]+)(?:\(\))?`")
_LITERAL = re.compile(r"(?<=\S)::$", re.MULTILINE)
_LITERAL_ALONE = re.compile(r"^[ \t]*::[ \t]*$", re.MULTILINE)
_BLOCK = re.compile(r"^::: (?P<path>[\w.]+)\n(?P<options>(?: {4,}.*\n)*)", re.MULTILINE)
_REFERENCE = Path(__file__).resolve().parent / "reference"


def _documented() -> tuple[frozenset[str], tuple[str, ...]]:
    """What the reference pages render with a heading: objects, and modules' members.

    Read from their ``::: path`` blocks: an object shown with its heading can be linked to;
    a module shown without its own heading but with its members gives each member one.
    """
    objects: set[str] = set()
    modules: list[str] = []
    for page in sorted(_REFERENCE.glob("*.md")):
        for block in _BLOCK.finditer(page.read_text()):
            options = block["options"]
            if "show_root_heading: false" not in options:
                objects.add(block["path"])
            elif "members: false" not in options:
                modules.append(block["path"] + ".")
    return frozenset(objects), tuple(modules)


DOCUMENTED, DOCUMENTED_MODULES = _documented()


def linkable(path: str) -> bool:
    """Whether the reference has a heading with the id ``path``."""
    if path in DOCUMENTED:
        return True
    member = next((path[len(m) :] for m in DOCUMENTED_MODULES if path.startswith(m)), None)
    return member is not None and member.isidentifier() and not member.startswith("_")


def markdown(text: str) -> str:
    """``text`` with its roles as links or code, and its ``::`` markers as Markdown."""

    def replace(found: re.Match[str]) -> str:
        short, path = found.group(1), found.group(2)
        shown = path.rsplit(".", 1)[-1] if short else path
        if linkable(path):
            return f"[`{shown}`][{path}]"
        return f"`{shown}`"

    text = _ROLE.sub(replace, text)
    return _LITERAL.sub(":", _LITERAL_ALONE.sub("", text))


class RestructuredTextRoles(griffe.Extension):
    """Rewrites every docstring of the loaded package once, as it is loaded."""

    def on_instance(self, *, obj: griffe.Object, **_: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = markdown(obj.docstring.value)
