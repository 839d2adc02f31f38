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

START, END = "<!-- bench:start -->", "<!-- bench:end -->"


def table(payload: dict[str, Any]) -> str:
    """Markdown: per driver and operation, our ops/s and our ratio to raw and to peers."""
    rows = payload["rows"]
    lines = [
        f"Measured on {payload['machine']}, N = {payload['n']:,}.",
        "",
        "| driver | operation | kvstorage ops/s | raw client | ours/raw | peers (ours/peer) |",
        "|---|---|---:|---|---:|---|",
    ]
    seen: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        seen.setdefault((row["driver"], row["operation"]), []).append(row)
    for (driver, operation), cells in seen.items():
        ours = next((c for c in cells if c["kind"] == "ours"), None)
        if ours is None:
            continue
        raw = next((c for c in cells if c["kind"] == "raw"), None)
        peers = [c for c in cells if c["kind"] == "peer"]
        peer_text = ", ".join(f"{p['target']} {ours['ops'] / p['ops']:.2f}x" for p in peers)
        extra = f" (peak +{ours['peak_mb']:.1f} MiB)" if ours.get("peak_mb") is not None else ""
        raw_name = raw["target"] if raw else ""
        raw_ratio = f"{ours['ops'] / raw['ops']:.2f}x" if raw else ""
        lines.append(
            f"| {driver} | {operation}{extra} | {ours['ops']:,.0f} | {raw_name} | "
            f"{raw_ratio} | {peer_text} |"
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
