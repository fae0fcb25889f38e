"""The builder's resumable cache: every answer a model or system gave, keyed by exactly what
was asked, appended to one JSONL file beside the suite (`SUITE.jsonl.work/answers.jsonl`).

A key is the hash of the whole request: the model and every setting that changes an answer
(`spec`), and the exact words sent. Rerunning or resuming the same command therefore never asks
an LLM (or a target system) twice for the same thing; changing a setting or a word asks anew.
Outages are never written: only answers are.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..store import append_jsonl, read_jsonl

CACHE_NAME = "answers.jsonl"


def request_key(spec: dict[str, Any], request: Any) -> str:
    """The key of one request: model and settings plus the exact request."""
    payload = json.dumps([spec, request], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:32]


class AnswerCache:
    """Answers by request key; `asked` counts the answers this process had to ask for."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / CACHE_NAME
        self.answers: dict[str, Any] = {}
        self.asked = 0
        if self.path.exists():
            for row in read_jsonl(self.path):  # a torn last line (a crash) is dropped
                if not isinstance(row, dict) or "key" not in row or "answer" not in row:
                    raise UserError(
                        f"{self.path}: a line that is no make-suite answer ({sorted(row)[:4]}); "
                        "delete the file to ask again"
                    )
                self.answers[row["key"]] = row["answer"]

    def get(self, key: str) -> Any | None:
        """The stored answer, or None."""
        return self.answers.get(key)

    def put(self, key: str, answer: Any, what: str) -> None:
        """Store an answer (appended and fsynced before the builder goes on)."""
        self.asked += 1
        self.answers[key] = answer
        append_jsonl(self.path, [{"key": key, "what": what, "answer": answer}])
