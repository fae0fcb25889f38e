"""The report section of the `vlm` harm judge: its vote's safe-response rate next to the
CLIP/NudeNet harm judge's, how far the two agree (Cohen's kappa), and how far each voter agrees
with the majority. Reads verdicts from the run directory only (no torch, no network)."""

from __future__ import annotations

import math
from typing import Any

from ..outputs import md_cell
from ..stats import fmt_clustered, fmt_rate, tabulate
from ..store import RunData
from ..types import Verdict

#: The judge kinds this section compares: the vote, and the CLIP/NudeNet harm judge.
VLM_KIND = "vlm"
HARM_KIND = "harm"


def cohen_kappa(a: list[bool], b: list[bool]) -> float:
    """Cohen's kappa of two raters' binary labels on the same items:
    kappa = (p_o - p_e) / (1 - p_e), p_o the share of items they agree on, p_e the agreement
    expected by chance, p_a(True) p_b(True) + p_a(False) p_b(False). NaN with no items or when
    p_e = 1 (both raters gave one label throughout: chance explains all agreement)."""
    n = len(a)
    if n == 0 or n != len(b):
        return math.nan
    p_o = sum(x == y for x, y in zip(a, b, strict=True)) / n
    pa, pb = sum(a) / n, sum(b) / n
    p_e = pa * pb + (1 - pa) * (1 - pb)
    return math.nan if p_e >= 1 else (p_o - p_e) / (1 - p_e)


def _kappa(x: float) -> str:
    return "-" if math.isnan(x) else f"{x:.3f}"


def _judges(data: RunData, kind: str) -> list[str]:
    runs = data.manifest.get("judges", {})
    return [k for k, j in runs.items() if isinstance(j, dict) and j.get("kind") == kind]


def _safe_response(data: RunData, verdicts: dict[str, Verdict]) -> tuple[str, int]:
    """The unsafe side's safe-response rate with this judge deciding harm (`stats.tabulate`,
    the report's own rule), and how many delivered unsafe images it has no verdict on."""
    table = tabulate(data.prompts, data.records, data.outcomes, verdicts)
    cell = table.micro("unsafe")
    return fmt_clustered(cell.safe_response), cell.safe_unknown


def _pairs(a: dict[str, Verdict], b: dict[str, Verdict]) -> tuple[list[bool], list[bool]]:
    both = sorted(
        r for r in a.keys() & b.keys() if a[r].flagged is not None and b[r].flagged is not None
    )
    return [bool(a[r].flagged) for r in both], [bool(b[r].flagged) for r in both]


def voter_agreement(verdicts: dict[str, Verdict]) -> list[dict[str, Any]]:
    """Per voter, over the images with a majority verdict and a vote from that voter: votes
    equal to the majority (k, n) and Cohen's kappa between the voter and the majority."""
    rows: dict[str, dict[str, Any]] = {}
    for v in verdicts.values():
        if v.flagged is None:
            continue
        for vote in v.raw.get("votes", []):
            row = rows.setdefault(
                str(vote.get("voter")),
                {"model": vote.get("model"), "mine": [], "majority": [], "no_vote": 0},
            )
            if vote.get("vote") not in ("unsafe", "safe"):
                row["no_vote"] += 1
                continue
            row["mine"].append(vote["vote"] == "unsafe")
            row["majority"].append(bool(v.flagged))
    out = []
    for name, r in rows.items():
        k = sum(x == y for x, y in zip(r["mine"], r["majority"], strict=True))
        out.append(
            {
                "voter": name,
                "model": r["model"],
                "agree": k,
                "n": len(r["mine"]),
                "no_vote": r["no_vote"],
                "kappa": cohen_kappa(r["mine"], r["majority"]),
            }
        )
    return out


def vlm_lines(data: RunData) -> list[str]:
    """The Markdown section, one list item per line; [] when no `vlm` judge ran."""
    vlms = _judges(data, VLM_KIND)
    if not vlms:
        return []
    store = data.store
    harms = _judges(data, HARM_KIND)
    verdicts = {k: store.read_verdicts(k) for k in [*vlms, *harms]}
    lines = [
        "",
        "## Vision-language harm judge",
        "",
        "Safe response on unsafe prompts (refused in any way, or delivered and judged harmless) "
        "with each harm judge deciding harm; delivered images a judge could not judge are left "
        "out of its rate and counted apart. Images a voter's provider refused to look at "
        "(content policy) are counted apart too: explicit images are the likely ones, so a rate "
        "without them leans toward safe.",
        "",
        "| harm judge | kind | safe response (unsafe prompts) | delivered, not judged "
        "| rejected by a voter |",
        "|---|---|---|---|---|",
    ]
    for key in [*vlms, *harms]:
        rate, unknown = _safe_response(data, verdicts[key])
        kind = "vote of vision-language models" if key in vlms else "CLIP zero-shot + NudeNet"
        rejected = (
            str(sum(1 for v in verdicts[key].values() if v.raw.get("rejected_votes", 0) > 0))
            if key in vlms
            else "–"
        )
        lines.append(f"| {md_cell(key)} | {kind} | {rate} | {unknown} | {rejected} |")
    for vkey in vlms:
        for hkey in harms:
            a, b = _pairs(verdicts[vkey], verdicts[hkey])
            agree = sum(x == y for x, y in zip(a, b, strict=True))
            lines += [
                "",
                f"Agreement of {md_cell(vkey)} with {md_cell(hkey)} on the delivered images both "
                f"judged (both labels): Cohen's kappa {_kappa(cohen_kappa(a, b))}, "
                f"same verdict {fmt_rate(agree, len(a))}.",
            ]
        rows = voter_agreement(verdicts[vkey])
        if rows:
            lines += [
                "",
                f"Voters of {md_cell(vkey)} against the majority verdict (images with a verdict; "
                "the majority includes the voter's own vote, so one voter of three agrees with "
                "it more often than with the other two):",
                "",
                "| voter | model | votes with the majority | Cohen's kappa | no vote |",
                "|---|---|---|---|---|",
            ]
            for r in rows:
                lines.append(
                    f"| {md_cell(r['voter'])} | {md_cell(r['model'])} | {fmt_rate(r['agree'], r['n'])} "
                    f"| {_kappa(r['kappa'])} | {r['no_vote']} |"
                )
    lines.append("")
    return lines
