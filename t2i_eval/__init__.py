"""t2i-eval: measure over-refusal in text-to-image systems, stage by stage.

The public API, in the order data flows (docs/architecture.md):

    suite = load_suite("core")                       # suites -> Suite
    spec = parse_system("blocklist>tiny")            # a system under test
    result = run(suite, spec, out="outputs/x")       # runner -> store (judges with blank)
    judge_run(result.run_dir, "harm", clip="tiny")   # judging -> store
    data = read_run(result.run_dir)                  # store -> RunData (outcomes once)
    text = write_report(result.run_dir)              # stats -> report

Names are imported on first use, so `import t2i_eval` stays light (no torch).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

#: Public name -> the module that defines it.
_API = {
    "load_suite": "t2i_eval.suites",
    "parse_system": "t2i_eval.systems",
    "run": "t2i_eval.runner",
    "judge_run": "t2i_eval.judging",
    "read_run": "t2i_eval.store",
    "write_report": "t2i_eval.report",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 't2i_eval' has no attribute {name!r}")
