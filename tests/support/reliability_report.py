"""Render RELIABILITY.md from the figures a test run collected (see tests/reliability.py).

make reliability      # runs the tests with KVSTORAGE_RELIABILITY_JSON set, then this
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

INTRO = """# Reliability

What the test suite tries in order to break kvstorage and sessions, and what it measured.
Every number below was produced by the test run named at the bottom, not typed by hand;
regenerate with `make reliability` (add `KVSTORAGE_LONG_TESTS=1` for the long profile).
"""

SECTIONS = {
    "model": (
        "Model-based testing",
        "Random sequences of set (with and without ttl), set_items, remove(s), clear(base), "
        "update_item and conditional writes, through the root and a `prefix_storage` view, "
        "with a second driver mounted, checked against a dict after every step: drawn as "
        "operation lists on every driver and backend (`tests/test_model.py`) and as a "
        "hypothesis `RuleBasedStateMachine` (`tests/test_stateful.py`, rows marked "
        "'state machine').",
    ),
    "faults": (
        "Faults injected",
        "Each fault must lose no acknowledged write and leave no torn value.",
    ),
    "concurrency": (
        "Concurrency",
        "Tasks and processes hammering one key with `update_item`; final counts must be exact.",
    ),
    "load": (
        "Load",
        "The session app (`tests/load/app.py`) under uvicorn with 4 worker processes sharing "
        "one store, 100 concurrent clients on loopback, each with its own session, verifying "
        "its counter on every response (`tests/test_load.py`).",
    ),
    "hostile": (
        "Hostile input",
        "Awkward and fuzzed keys through the public API: each must raise `InvalidKeyError` "
        "or round-trip exactly (`tests/test_hostile.py`); session cookies in "
        "`tests/test_sessions*.py`.",
    ),
}


def _cell(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value)


def _table(rows: dict[str, dict[str, Any]]) -> list[str]:
    columns = sorted({name for figures in rows.values() for name in figures})
    if len(columns) > 10:  # sparse figures: one line per subject reads better
        return [
            f"- **{subject}**: "
            + ", ".join(f"{name.replace('_', ' ')} {_cell(v)}" for name, v in figures.items())
            for subject, figures in sorted(rows.items())
        ]
    lines = ["| subject | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for subject, figures in sorted(rows.items()):
        cells = [_cell(figures[c]) if c in figures else "" for c in columns]
        lines.append(f"| {subject} | " + " | ".join(cells) + " |")
    return lines


def render(figures: dict[str, dict[str, dict[str, Any]]], source: str) -> str:
    """The whole RELIABILITY.md text."""
    lines = [INTRO]
    for key, (title, text) in SECTIONS.items():
        if key not in figures:
            continue
        lines += [f"## {title}", "", text, "", *_table(figures[key]), ""]
    for key in sorted(set(figures) - set(SECTIONS)):
        lines += [f"## {key}", "", *_table(figures[key]), ""]
    lines.append(f"_Generated from `{source}`._")
    return "\n".join(lines) + "\n"


def main(*json_paths: str, output: str = "RELIABILITY.md") -> None:
    """Write ``output`` from the figures in ``json_paths`` (merged; later files win)."""
    figures: dict[str, dict[str, dict[str, Any]]] = {}
    for path in json_paths:
        for section, subjects in json.loads(Path(path).read_text()).items():
            figures.setdefault(section, {}).update(subjects)
    Path(output).write_text(render(figures, "make reliability"))


if __name__ == "__main__":
    main(*sys.argv[1:])
