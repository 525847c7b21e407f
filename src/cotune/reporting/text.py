"""Names made safe to show: what a terminal or a report prints of a client, folder or run name.

Client names come from the data owners' folder and file names, and run labels from config values; a
name can carry terminal escape sequences (`ESC [2J` clears the screen, `ESC ]0;...BEL` retitles the
window) or other control characters. `printable` is the one place that decides how such a name is
shown: control and format characters (Unicode categories Cc, Cf, Zl, Zp: ESC, BEL, newlines, bidi
overrides) become visible escapes (`\\x1b`, `\\u202e`), and a very long name is cut, so nothing a
name holds acts on the terminal or breaks a Markdown table.
"""

from __future__ import annotations

import unicodedata

__all__ = ["MAX_NAME", "printable", "printable_lines"]

MAX_NAME = 80  # characters of a name shown; a longer one ends in "…"
_UNSAFE = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs", "Co", "Cn"})


def _escaped(ch: str) -> str:
    code = ord(ch)
    if code <= 0xFF:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


def printable(name: object, limit: int = MAX_NAME) -> str:
    """`name` as text that is safe on a terminal and in a report: control characters escaped, cut at `limit`.

    A backslash is kept as it is (a Windows-looking name stays readable); only characters that could act
    on a terminal, or end a line, are rewritten.
    """
    text = "".join(_escaped(c) if unicodedata.category(c) in _UNSAFE else c for c in str(name))
    return text if len(text) <= limit else text[: limit - 1] + "…"


def printable_lines(text: object) -> str:
    """A message of one or more lines, made safe as `printable` makes a name, whole (not cut) and with its
    line breaks kept: an error paragraph can name a folder whose name holds an escape sequence."""
    return "\n".join(printable(line, limit=len(line) + 1) for line in str(text).split("\n"))
