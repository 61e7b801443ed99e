"""What every benchmark does with its results: a UTC timestamp, and the report written as
``<stem>.json`` and ``<stem>.md`` (and printed)."""

from __future__ import annotations

import datetime
import json
from pathlib import Path


def utc_now() -> str:
    """The current time in UTC, ISO 8601 to the second (``2026-12-03T15:26:16+00:00``)."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def write_report(folder: Path | str, stem: str, report: dict, markdown: str) -> Path:
    """Write ``report`` to ``<folder>/<stem>.json`` and ``markdown`` to ``<folder>/<stem>.md`` (the
    folder made when missing), print the Markdown, and return the JSON file's path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{stem}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    (folder / f"{stem}.md").write_text(markdown)
    print(markdown)
    return path
