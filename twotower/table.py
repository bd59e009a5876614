"""Plain-text tables whose columns are as wide as their data.

Track ids can be 36-character MusicBrainz ids or long ``name:artist`` keys: a fixed width
either cuts them (and an id that is cut cannot be pasted back) or wastes the line. Ids are
never shortened; free text (titles, artists) is capped at ``max_width`` with an ellipsis.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

ELLIPSIS = "…"


def _clip(text: str, width: int | None) -> str:
    if width is None or len(text) <= width:
        return text
    return text[: max(width - 1, 0)] + ELLIPSIS


def format_table(
    headers: Sequence[str],
    rows: Sequence[Sequence[Any]],
    right: Sequence[bool] | None = None,
    max_width: Sequence[int | None] | None = None,
    sep: str = "  ",
) -> str:
    """Rows under headers, every column as wide as its widest cell.

    Args:
        headers: Column titles.
        rows: Cells (already formatted, or anything ``str()`` turns into text).
        right: Per column: right-align (numbers). Default: left everywhere.
        max_width: Per column: cap for the cell text (None: never cut, e.g. ids).
        sep: Between columns.

    Returns:
        The table, one line per row after the header line, no trailing spaces.
    """
    n = len(headers)
    right = list(right) if right is not None else [False] * n
    caps = list(max_width) if max_width is not None else [None] * n
    cells = [[_clip(str(c).replace("\n", " "), caps[j]) for j, c in enumerate(r)] for r in rows]
    widths = [max([len(headers[j])] + [len(r[j]) for r in cells]) for j in range(n)]

    def line(values: Sequence[str]) -> str:
        parts = [
            v.rjust(widths[j]) if right[j] else v.ljust(widths[j]) for j, v in enumerate(values)
        ]
        return sep.join(parts).rstrip()

    return "\n".join([line(list(headers))] + [line(r) for r in cells])
