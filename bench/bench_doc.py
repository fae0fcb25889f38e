"""What every bench that generates a doc under docs/ does last: write it, show it, say where."""

from __future__ import annotations

from pathlib import Path


def write_doc(path: str | Path, text: str) -> None:
    """Write `text` to `path` (UTF-8, folders made), print it, then the path written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    print(text)
    print(f"\nwritten: {path}")
