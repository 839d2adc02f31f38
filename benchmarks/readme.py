"""Regenerate the benchmark table in README.md from a `python -m benchmarks --json` file.

    python -m benchmarks --drivers all --json bench.json && python -m benchmarks.readme bench.json

(`make bench-readme` does both.) The table goes between the ``bench:start`` and
``bench:end`` markers, so it is never typed by hand.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from .report import lag, pivot, ratio
from .workload import Row

START, END = "<!-- bench:start -->", "<!-- bench:end -->"


def table(payload: dict[str, Any]) -> str:
    """Markdown: per driver and operation, our ops/s and our ratio to raw and to peers."""
    lines = [
        f"Measured on {payload['machine']}, N = {payload['n']:,}.",
        "",
        "| driver | operation | kvstorage ops/s | loop lag p99 / max ms | raw client | ours/raw "
        "| peers (ours/peer) |",
        "|---|---|---:|---:|---|---:|---|",
    ]
    for line in pivot(Row(**row) for row in payload["rows"]):
        ours, raw = line.ours, line.raw
        peers = ", ".join(f"{p.target} {ratio(ours, p)}" for p in line.peers)
        extra = f" (peak +{ours.peak_mb:.1f} MiB)" if ours.peak_mb is not None else ""
        lines.append(
            f"| {line.driver} | {line.operation}{extra} | {ours.ops:,.0f} | {lag(ours)} | "
            f"{raw.target if raw else ''} | {ratio(ours, raw)} | {peers} |"
        )
    return "\n".join(lines)


def main(json_path: str, readme: str = "README.md") -> None:
    """Replace the table in ``readme`` with one built from ``json_path``."""
    payload = json.loads(Path(json_path).read_text())
    text = Path(readme).read_text()
    head, _, rest = text.partition(START)
    _, _, tail = rest.partition(END)
    Path(readme).write_text(f"{head}{START}\n{table(payload)}\n{END}{tail}")


if __name__ == "__main__":
    main(*sys.argv[1:])
