"""The one pivot behind every benchmark report (terminal tables, README table, sessions).

Rows come flat (driver, operation, target, kind, ops/s); every report shows, per driver
and operation, our figure beside the raw client's and the peers'.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

from .workload import Row


class Line(NamedTuple):
    """One driver and operation: our row and every row it is compared with."""

    driver: str
    operation: str
    ours: Row
    others: dict[str, Row]
    """Every other target's row, by target name, in the order first measured."""

    @property
    def raw(self) -> Row | None:
        """The raw client doing the same work, if it was measured."""
        return next((row for row in self.others.values() if row.kind == "raw"), None)

    @property
    def peers(self) -> list[Row]:
        """The other libraries' rows."""
        return [row for row in self.others.values() if row.kind == "peer"]


def pivot(rows: Iterable[Row]) -> list[Line]:
    """Group ``rows`` by (driver, operation), in the order first seen; operations that
    have no row of ours are left out."""
    cells: dict[tuple[str, str], list[Row]] = {}
    for row in rows:
        cells.setdefault((row.driver, row.operation), []).append(row)
    lines = []
    for (driver, operation), found in cells.items():
        ours = next((row for row in found if row.kind == "ours"), None)
        if ours is not None:
            others = {row.target: row for row in found if row.kind != "ours"}
            lines.append(Line(driver, operation, ours, others))
    return lines


def ratio(ours: Row, other: Row | None) -> str:
    """``ours.ops / other.ops`` formatted as ``1.23x``, or an empty cell without ``other``."""
    return f"{ours.ops / other.ops:.2f}x" if other is not None and other.ops else ""


def lag(row: Row) -> str:
    """The event-loop lag measured during ``row``: ``p99 / max`` in ms, or an empty cell."""
    if row.lag_ms is None or row.lag_p99_ms is None:
        return ""
    return f"{row.lag_p99_ms:.2f} / {row.lag_ms:.2f}"
