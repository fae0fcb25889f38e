"""Reports: what a user reads of a run, written from the store's records and nothing else.

- `run`: one run's report.md, summary.json, per_category.csv and per_prompt.csv;
- `html`: the self-contained HTML report of one or more runs (`report --html`);
- `rewrite`: the rewrite experiment's before/after report in its linked folder.

Data flows one way: the report imports the store, stats, sweep, triggers and predictor, and
nothing outside this package imports the report (the CLI dispatches to it).
"""

from __future__ import annotations

from .html import check_html_out, write_html
from .rewrite import write_rewrite_report
from .run import GROUPINGS, write_report
from .sources import comparable, source_rows

__all__ = [
    "GROUPINGS",
    "check_html_out",
    "comparable",
    "source_rows",
    "write_html",
    "write_report",
    "write_rewrite_report",
]
