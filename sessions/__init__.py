"""Server-side web sessions on top of kvstorage (see DESIGN.md section 6)."""

from __future__ import annotations

__all__: list[str] = []
