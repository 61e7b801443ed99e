"""GitHub-flavoured Markdown tables, written one way for the sweep, the analysis report and the
benchmarks."""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable, Sequence

if TYPE_CHECKING:  # the annotation only: bench_gpu imports this module before it checks its dependencies
    import pandas as pd


def markdown_lines(header: Sequence, rows: Iterable[Sequence], align: str = "") -> list[str]:
    """The table as lines: the header, the rule, then one line per row.

    Cells are written with ``str`` and a ``|`` in them is escaped. ``align`` holds one letter per
    column, ``l`` (the default for columns it leaves out) or ``r`` (right-aligned, ``---:``).
    """

    def line(cells) -> str:
        return "| " + " | ".join(str(cell).replace("|", "\\|") for cell in cells) + " |"

    if set(align) - {"l", "r"}:
        raise ValueError(f"align takes the letters l and r, got {align!r}")
    rule = "|" + "".join("---:|" if align[i : i + 1] == "r" else "---|" for i in range(len(header)))
    return [line(header), rule, *(line(row) for row in rows)]


def frame_markdown(table: pd.DataFrame) -> str:
    """A DataFrame (of display strings) as a Markdown table, its index as the first column."""
    header = [table.index.name or "", *(str(c) for c in table.columns)]
    rows = ([index, *row] for index, row in zip(table.index, table.values))
    return "\n".join(markdown_lines(header, rows))
