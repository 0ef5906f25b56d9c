"""The one Markdown table format of every report (results, benchmark, GPU check, analyses)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any


def md_table(header: Sequence[Any], rows: Iterable[Sequence[Any]]) -> list[str]:
    """A table's lines and the blank line that ends it; a ``|`` inside a cell is escaped."""

    def line(values: Iterable[Any]) -> str:
        return "| " + " | ".join(str(value).replace("|", "\\|") for value in values) + " |"

    return [line(header), "|" + "---|" * len(header), *map(line, rows), ""]
