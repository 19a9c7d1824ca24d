"""Text for a terminal: one line per record, whatever names, reasons or errors hold."""

from __future__ import annotations

__all__ = ["escape_control"]

_NAMED_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def escape_control(text: str) -> str:
    """``text`` with every non-printable character (CR, LF, ESC, ...) written as an escape.

    Run names, metric names, subscriber ids and error messages come from users and files: a
    carriage return or an ANSI sequence in one of them must not forge or hide a console line.
    The C1 controls (such as the single-byte CSI ``\\x9b``) and the Unicode line and paragraph
    separators are not printable either, so they are escaped too.
    """
    if text.isprintable():
        return text
    return "".join(
        char if char.isprintable() else _NAMED_ESCAPES.get(char) or _code_escape(char)
        for char in text
    )


def _code_escape(char: str) -> str:
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"
