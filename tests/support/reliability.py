"""Figures the reliability tests measure, collected for RELIABILITY.md.

Tests call :func:`record`; when ``KVSTORAGE_RELIABILITY_JSON`` names a file, the figures
are written there at the end of the run and ``python -m tests.support.reliability_report FILE``
turns them into RELIABILITY.md (``make reliability`` does both). Every number in that file
therefore comes from a test run, never from a hand.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

_FIGURES: dict[str, dict[str, dict[str, Any]]] = defaultdict(lambda: defaultdict(dict))


def record(section: str, subject: str, **figures: Any) -> None:
    """Add ``figures`` (name=value) about ``subject`` (a driver, a fault...) to ``section``;
    numbers under the same name accumulate."""
    entry = _FIGURES[section][subject]
    for name, value in figures.items():
        if isinstance(value, int | float) and not isinstance(value, bool) and name in entry:
            entry[name] += value
        else:
            entry[name] = value


def write_if_requested() -> None:
    """Write the collected figures to ``$KVSTORAGE_RELIABILITY_JSON`` (if set)."""
    path = os.environ.get("KVSTORAGE_RELIABILITY_JSON")
    if path:
        Path(path).write_text(json.dumps(_FIGURES, indent=2, sort_keys=True))
