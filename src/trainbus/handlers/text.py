"""Text for a terminal: re-exported from :mod:`trainbus.events.text`.

The escaping lives in the events layer so the engine and the bus can use it without importing
handlers; this module keeps the name importable from where handlers and the CLI expect it.
"""

from __future__ import annotations

from trainbus.events.text import escape_control

__all__ = ["escape_control"]
