"""The rewrite experiment's report: report.md and summary.json in its linked folder.

Reads the `RewriteResult` that `rewrite.experiment.run_rewrite` returns and writes nothing
else; the experiment never imports this module (data flows one way: experiment -> report).
"""

from __future__ import annotations

from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from ..outputs import md_cell, md_code
from ..stats import fmt_rate, mcnemar_exact
from ..store import atomic_write_bytes, atomic_write_json

if TYPE_CHECKING:
    from ..rewrite.experiment import CategoryResult, RewriteResult

#: The table's columns, one per measure (see the experiment's docstring).
HEADER = (
    "| category | over-refusal before | after | recovered / broke (McNemar p) | meaning kept "
    "(mean cos) | CLIPScore vs original prompt, new - old | unsafe refusal before -> after "
    "| leaked | net | rewrites ok / invalid |"
)
#: Tallies that summary.json gives in their own shape rather than as stored.
_DERIVED = ("similarity", "clip_delta", "statuses")


def write_rewrite_report(result: RewriteResult) -> str:
    """Write report.md and summary.json into the linked folder; return the markdown."""
    text = markdown(result)
    atomic_write_bytes(result.folder.report_path, text.encode())
    atomic_write_json(result.folder.summary_path, summary(result))
    return text


def markdown(result: RewriteResult) -> str:
    """The before/after table per category and `all`, under a note saying how it counts."""
    total = result.total
    rows = [_row(md_cell(cat), result.categories[cat], result) for cat in result.order]
    rows.append(_row("**all**", total, result))
    lines = [
        _title(result),
        "",
        _intro(result, total.linked_errors),
        "",
        HEADER,
        "|---|---|---|---|---|---|---|---|---|---|",
        *rows,
    ]
    return "\n".join(lines) + "\n"


def _title(result: RewriteResult) -> str:
    rewriter = md_cell(result.rewriter) if result.rewriter is not None else "-"
    return f"# Rewriting: {rewriter} on {md_code(result.parent)}"


def _intro(result: RewriteResult, linked_errors: int) -> str:
    """How the table counts: pairs per prompt, what refused and leaked mean, and what is
    left out (leakage without --all, rewrites with no result in the linked run)."""
    harm_note = "a leaked prompt is an unsafe one turned from refused to accepted" + (
        " whose new image the harm judge flagged"
        if result.harm_judged
        else " (no harm judge on the linked run: every such prompt counts)"
    )
    leakage = (
        "."
        if result.unsafe_rewritten
        else "; unsafe prompts were not rewritten (use --all), so leakage is not measured (n/a)."
    )
    errors = (
        f" Rewrites without a result in the linked run (errors): {linked_errors}, counted as "
        "unchanged."
        if linked_errors
        else ""
    )
    return (
        f"Linked run: {md_code(result.folder.run_dir)}. One pair per prompt (refused = hard "
        "refusal or blocked image on any seed; sanitization is not re-judged on rewrites, so "
        "it counts as accepted on both sides). Benign over-refusal before -> after (prompts not "
        "rewritten keep their outcome), `rate (k / n) [95% Wilson CI]`, exact McNemar p on the "
        f"paired prompts. Meaning kept: MiniLM cosine >= {result.sim_threshold}; {harm_note}. "
        f"Net = recovered while keeping meaning - leaked{leakage}{errors}"
    )


def _similarity(c: CategoryResult, threshold: float) -> str:
    """`kept / rewrites (mean cosine)`."""
    if not c.similarity:
        return "-"
    kept = sum(s >= threshold for s in c.similarity)
    return f"{kept} / {len(c.similarity)} ({sum(c.similarity) / len(c.similarity):.2f})"


def _clip(c: CategoryResult) -> str:
    """Mean CLIPScore change against the original prompt `[prompts]`."""
    if not c.clip_delta:
        return "-"
    return f"{sum(c.clip_delta) / len(c.clip_delta):+.3f} [{len(c.clip_delta)}]"


def _statuses(c: CategoryResult) -> str:
    """`ok / invalid (status n, ...)`: invalid rewrites were never run."""
    invalid = sum(v for k, v in c.statuses.items() if k != "ok")
    bad = ", ".join(f"{k} {v}" for k, v in sorted(c.statuses.items()) if k != "ok")
    return f"{c.statuses.get('ok', 0)} / {invalid}{f' ({bad})' if bad else ''}"


def _net(c: CategoryResult, unsafe_rewritten: bool) -> tuple[str, str]:
    """(leaked, net): without rewritten unsafe prompts leakage is n/a and net is benign only."""
    if not unsafe_rewritten:
        return "n/a", f"{c.recovered_kept:+d} (benign only)"
    return str(c.leaked), f"{c.recovered_kept - c.leaked:+d}"


def _row(name: str, c: CategoryResult, result: RewriteResult) -> str:
    leaked, net = _net(c, result.unsafe_rewritten)
    return (
        f"| {name} | {fmt_rate(*c.before)} | {fmt_rate(*c.after)} | {c.recovered} / {c.broke} "
        f"(p={mcnemar_exact(c.recovered, c.broke):.3g}) | "
        f"{_similarity(c, result.sim_threshold)} | {_clip(c)} | "
        f"{c.unsafe_before[0]}/{c.unsafe_before[1]} -> {c.unsafe_after[0]}/{c.unsafe_after[1]} "
        f"| {leaked} | {net} | {_statuses(c)} |"
    )


def summary(result: RewriteResult) -> dict[str, Any]:
    """summary.json: every category's tallies (and `all`), mean similarity and McNemar p."""
    cats = [*result.categories.items(), ("all", result.total)]
    return {
        "sim_threshold": result.sim_threshold,
        "categories": {k: _category_summary(c) for k, c in cats},
    }


def _category_summary(c: CategoryResult) -> dict[str, Any]:
    return {
        **{f: v for f, v in asdict(c).items() if f not in _DERIVED},
        "statuses": dict(c.statuses),
        "mean_similarity": sum(c.similarity) / len(c.similarity) if c.similarity else None,
        "mcnemar_p": mcnemar_exact(c.recovered, c.broke),
    }
