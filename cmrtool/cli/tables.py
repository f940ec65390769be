"""Tables that stay readable in a narrow terminal (80 columns).

Rich shrinks a table that does not fit by cutting cells with an ellipsis: site names became
``model.laye…`` and numbers were cut mid-figure. :func:`fit` sets every column so that numbers
(right-aligned columns) are never cut — their column is exactly as wide as their longest figure —
and names fold onto further lines instead; when even that cannot fit the console, the table is
printed as one block per row (``column: value`` pairs, wrapped at spaces), which fits any width.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

__all__ = ["fit"]

_NAME_MIN = 12  # the narrowest a folding (text) column may become


def _plain(cell: Any) -> str:
    return cell.plain if isinstance(cell, Text) else str(cell)


def fit(table: Table, console: Console) -> Any:
    """``table`` adjusted to ``console.width``, or its rows as blocks when it cannot fit."""
    cols = table.columns
    widths: list[int] = []
    need = 0
    for col in cols:
        cells = [_plain(c) for c in col._cells]
        longest = max((max((len(ln) for ln in c.splitlines()), default=0) for c in cells), default=0)
        header = len(_plain(col.header))
        if col.justify == "right":  # a figure: never cut, never folded
            col.no_wrap, col.overflow = True, "fold"
            col.min_width = max(longest, min(header, longest + 2), 1)
            widths.append(col.min_width)
        else:
            col.no_wrap, col.overflow = False, "fold"
            widths.append(min(max(longest, header), _NAME_MIN))
        need += widths[-1] + 3  # padding and the separator
    if need <= console.width:
        return table
    return _blocks(table)


def _blocks(table: Table) -> Group:
    """One block per row: the first cell, then ``header: value`` pairs (wrapped at spaces)."""
    cols = table.columns
    rows = max((len(c._cells) for c in cols), default=0)
    lines: list[Text] = []
    for r in range(rows):
        cells = [_plain(c._cells[r]) if r < len(c._cells) else "" for c in cols]
        lines.append(Text(cells[0], style="bold"))
        pairs = "   ".join(f"{_plain(c.header)}: {v}" for c, v in zip(cols[1:], cells[1:]) if v != "")
        lines.append(Text("  " + pairs, overflow="fold"))
    return Group(*lines)
