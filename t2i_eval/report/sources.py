"""Findings across prompt sources, and against a graded source's own score.

Over-refusal measured on one data set says little until it is checked on another: a guard's
AUROC on the set it was tuned on is not its AUROC elsewhere. `source_rows` puts runs of one
system (or guards-only runs) over several suites side by side, one row per (source, guard);
`graded_rows` bins a graded source's records (I2P's `inappropriate_percentage`) by that score,
so refusal can be read against how unsafe the source itself thought a prompt was.
"""

from __future__ import annotations

import math
from typing import Any

from ..outputs import csv_bytes, md_cell
from ..stats import fmt_rate, wilson
from ..store import RunData
from ..sweep import guard_metrics

SOURCE_COLUMNS = (
    "source",
    "guard",
    "n_benign",
    "n_unsafe",
    "auroc",
    "auroc_ci_low",
    "auroc_ci_high",
    "fpr_at_95_tpr",
    "benign_refused",
    "benign_over_refusal",
    "unsafe_refused",
    "unsafe_refusal",
)
GRADED_BINS = 10


def comparable(runs: list[RunData]) -> bool:
    """Several sources of one system: at least two suites, and every run the same system
    (same spec digest) or a guards-only run (whose guards are compared guard by guard)."""
    suites = {d.manifest["suite"].get("name") for d in runs}
    systems = {d.manifest["system"].get("digest") for d in runs}
    guards_only = all(
        d.manifest["system"].get("generator", {}).get("name") == "guards-only" for d in runs
    )
    return len(runs) > 1 and len(suites) > 1 and (len(systems) == 1 or guards_only)


def _ratio(k: int, n: int) -> float | None:
    return k / n if n else None


def source_rows(runs: list[RunData]) -> list[dict[str, Any]]:
    """One row per (source, prompt guard): separability and refusals at the run's threshold,
    each prompt counted once whatever its number of seeds (`sweep.guard_metrics`)."""
    rows = []
    for d in runs:
        for guard, per in guard_metrics(d.prompts_by_id, d.records).items():
            m = per["all"]
            lo, hi = m["auroc_ci"]
            rows.append(
                {
                    "source": d.manifest["suite"].get("name"),
                    "guard": guard,
                    "n_benign": m["n_benign"],
                    "n_unsafe": m["n_unsafe"],
                    "auroc": m["auroc"],
                    "auroc_ci_low": lo,
                    "auroc_ci_high": hi,
                    "fpr_at_95_tpr": m["fpr_at_95_tpr"],
                    "benign_refused": m["benign_refused"],
                    "benign_over_refusal": _ratio(m["benign_refused"], m["n_benign"]),
                    "unsafe_refused": m["unsafe_refused"],
                    "unsafe_refusal": _ratio(m["unsafe_refused"], m["n_unsafe"]),
                }
            )
    return rows


def _num(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def sources_section(rows: list[dict[str, Any]]) -> str:
    """The source x guard table for report.md."""
    if not rows:
        return ""
    lines = [
        "",
        "## Across sources",
        "",
        "The same system (or guards-only runs) on several prompt sources, as reported together. "
        "AUROC with its 95% Hanley-McNeil interval; FPR at 95% TPR as in the guard table; "
        "refusals at each run's own threshold, each prompt counted once. A guard trained or "
        "tuned on one of these sources is only judged fairly on the others.",
        "",
        "| source | guard | AUROC | FPR at 95% TPR | benign over-refusal | unsafe refusal |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        auroc = _num(r["auroc"])
        if r["auroc"] is not None and r["auroc_ci_low"] is not None:
            auroc += f" [{_num(r['auroc_ci_low'])}, {_num(r['auroc_ci_high'])}]"
        lines.append(
            f"| {md_cell(r['source'])} | {md_cell(r['guard'])} | {auroc} | "
            f"{_num(r['fpr_at_95_tpr'])} | {fmt_rate(r['benign_refused'], r['n_benign'])} | "
            f"{fmt_rate(r['unsafe_refused'], r['n_unsafe'])} |"
        )
    return "\n".join(lines) + "\n"


def sources_csv(rows: list[dict[str, Any]]) -> bytes:
    """The source x guard rows as report/sources.csv (formula cells neutralised)."""
    return csv_bytes(SOURCE_COLUMNS, rows)


def graded_column(data: RunData) -> str | None:
    """The column a graded suite spec labelled by (`label: {column, unsafe_at_least, ...}`)."""
    label = data.manifest["suite"].get("provenance", {}).get("mapping", {}).get("label")
    if isinstance(label, dict) and "unsafe_at_least" in label:
        return str(label.get("column"))
    return None


def graded_rows(data: RunData, bins: int = GRADED_BINS) -> list[dict[str, Any]]:
    """Refusal (any stage, blocked or sanitized) per equal-width bin of the graded score, over
    records with a counted outcome. Rows in the spec's dropped middle band are not in the
    suite, so their bins are empty: said, not hidden."""
    column = graded_column(data)
    if column is None:
        return []
    scores: list[tuple[float, bool]] = []
    for rid, g in data.records.items():
        p = data.prompts_by_id.get(g.prompt_id)
        refused = data.outcome(rid)[0].is_refusal(soft=True)
        try:
            score = float(p.meta[column]) if p is not None else math.nan
        except (KeyError, TypeError, ValueError):
            continue
        if refused is not None and not math.isnan(score):
            scores.append((score, refused))
    if not scores:
        return []
    lo, hi = min(s for s, _ in scores), max(s for s, _ in scores)
    width = (hi - lo) / bins or 1.0
    counts = [[0, 0] for _ in range(bins)]
    for s, refused in scores:
        i = min(int((s - lo) / width), bins - 1)
        counts[i][0] += refused
        counts[i][1] += 1
    rows = []
    for i, (k, n) in enumerate(counts):
        ci = wilson(k, n) if n else (math.nan, math.nan)
        rows.append(
            {
                "column": column,
                "bin_low": lo + i * width,
                "bin_high": lo + (i + 1) * width,
                "refused": k,
                "n": n,
                "rate": _ratio(k, n),
                "ci": ci,
            }
        )
    return rows


def graded_section(rows: list[dict[str, Any]]) -> str:
    """Refusal against the source's graded score, for report.md."""
    if not rows:
        return ""
    lines = [
        "",
        f"## Refusal against the source's graded score ({md_cell(rows[0]['column'])})",
        "",
        "Records (seeds) refused in any way, per equal-width bin of the score the suite spec "
        "labelled by; bins inside the spec's dropped band are empty.",
        "",
        "| score bin | refused |",
        "|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['bin_low']:.1f} - {r['bin_high']:.1f} | {fmt_rate(r['refused'], r['n'])} |"
        )
    return "\n".join(lines) + "\n"
