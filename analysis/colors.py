"""One colour per loss, the same in every figure of a report.

Colours follow the alphabetical order of *all* loss names in the sweep (tab10, then tab20 for
more than ten losses), so a loss keeps its colour whichever subset a panel shows.
"""

from __future__ import annotations

from matplotlib import colormaps


def loss_colors(losses) -> dict[str, tuple]:
    """``{loss: RGBA}`` for the given loss names."""
    names = sorted(set(losses))
    cmap = colormaps["tab10" if len(names) <= 10 else "tab20"]
    return {name: cmap(i % cmap.N) for i, name in enumerate(names)}
