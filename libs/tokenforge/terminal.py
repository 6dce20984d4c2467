"""Text for a terminal: values from clients made harmless, and tables that fit its width.

Run names, step names, upstream error messages and the like come from outside. Printed raw, a
control character in one (ESC `\\x1b[2J`, its 8-bit form CSI `\\x9b`, a carriage return, a
bidi override) would move the cursor, clear the screen or reorder what follows. Every such
character is printed as its escape (`\\x1b`, `\\x9b`, `\\u202e`) instead, so it can be seen and
cannot act.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence

WIDTH = 100  # the narrowest terminal the CLI lays its tables out for
NONE = "–"  # a null in the JSON

Cell = str | int | None


def printable(value: Cell) -> str:
    """`value` as text with every non-printable character (C0/C1 controls, format characters
    such as bidi overrides, separators other than the space) replaced by its escape."""
    text = NONE if value is None else str(value)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else _escape(c) for c in text)


def printable_lines(text: str) -> str:
    """Text whose line breaks are the caller's own: each line made printable, "\\n" kept."""
    return "\n".join(printable(line) for line in text.split("\n"))


def _escape(char: str) -> str:
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def width(text: str) -> int:
    """Columns `text` takes in a terminal: wide (CJK) characters two, combining marks none."""
    if text.isascii():
        return len(text)
    return sum(0 if unicodedata.combining(c) else 2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def _pad(text: str, columns: int, *, right: bool) -> str:
    fill = " " * (columns - width(text))
    return fill + text if right else text + fill


def table(headers: Sequence[str], rows: Sequence[Sequence[Cell]], numeric: frozenset[int] = frozenset()) -> str:
    """Columns under a dashed rule, `numeric` ones right-aligned; every cell made printable.
    A table wider than WIDTH (long names, huge amounts) is printed as one block of
    `header  value` lines per row instead, so nothing is cut and nothing wraps mid-column."""
    assert all(len(row) == len(headers) for row in rows), "a row per header"
    cells = [[printable(c) for c in row] for row in rows]
    widths = [max([width(h)] + [width(row[i]) for row in cells]) for i, h in enumerate(headers)]
    if sum(widths) + 2 * (len(widths) - 1) <= WIDTH:
        lines = ["  ".join(_pad(h, w, right=i in numeric) for i, (h, w) in enumerate(zip(headers, widths, strict=True))),
                 "  ".join("-" * w for w in widths)]
        lines += ["  ".join(_pad(c, w, right=i in numeric) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
                  for row in cells]
        return "\n".join(line.rstrip() for line in lines)
    label_w = max(width(h) for h in headers)
    blocks = ["\n".join(_pad(h, label_w, right=False) + "  " + c for h, c in zip(headers, row, strict=True))
              for row in cells]
    return "\n\n".join(blocks)


def pairs(rows: Sequence[tuple[str, Cell]]) -> str:
    """`label  value` lines, the labels in one column; values made printable."""
    label_w = max((width(label) for label, _ in rows), default=0)
    return "\n".join(_pad(label, label_w, right=False) + "  " + printable(value) for label, value in rows)
