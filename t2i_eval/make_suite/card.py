"""The suite's card: what built it (policy digest, generator and its settings, judge, dedup
threshold, target) and what happened at every step, counted per category and label.

Written beside the suite as `SUITE.card.json` (read back with the suite, so a run's manifest
records it) and `SUITE.card.md` (for people). The card holds no time stamp: the same command
on the same inputs writes the same card.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .. import __version__
from ..store import atomic_write_bytes

CARD_VERSION = 1
#: The steps a candidate goes through, in order; each count is what that step dropped.
STEPS = (
    "generated",
    "unusable",
    "near_duplicate",
    "judge_unclear",
    "judge_disagreed",
    "below_boundary",
    "kept",
)


def card_paths(suite: Path) -> tuple[Path, Path]:
    """(SUITE.card.json, SUITE.card.md) beside `SUITE.jsonl`."""
    return suite.with_suffix(".card.json"), suite.with_suffix(".card.md")


def make_card(
    *,
    suite: dict[str, Any],
    policy: dict[str, Any],
    generator: dict[str, Any],
    dedup: dict[str, Any],
    judge: dict[str, Any],
    target: dict[str, Any] | None,
    counts: dict[str, dict[str, dict[str, int]]],
) -> dict[str, Any]:
    """The card as data; `counts` is category -> label -> step -> n (see STEPS, plus `target`)."""
    short = {
        f"{cat}/{label}": c["target"] - c["kept"]
        for cat, by_label in counts.items()
        for label, c in by_label.items()
        if c["kept"] < c["target"]
    }
    return {
        "card_version": CARD_VERSION,
        "made_by": f"t2i-eval {__version__} make-suite",
        "suite": suite,
        "policy": policy,
        "generator": generator,
        "dedup": dedup,
        "judge": judge,
        "target": target,
        "counts": counts,
        "short_of_target": short,
    }


def write_card(path_json: Path, path_md: Path, card: dict[str, Any]) -> None:
    """Both files, each written atomically."""
    atomic_write_bytes(
        path_json, (json.dumps(card, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
    )
    atomic_write_bytes(path_md, render_markdown(card).encode("utf-8"))


def render_markdown(card: dict[str, Any]) -> str:
    """The card for people: provenance, then one row per category and label with every step."""
    s, p, g, d, j, t = (
        card[k] for k in ("suite", "policy", "generator", "dedup", "judge", "target")
    )
    lines = [
        f"# Suite card: {s['file']}",
        "",
        f"- Made by: {card['made_by']}; suite digest `{s['digest']}`, {s['n_prompts']} prompts "
        f"({s['n_benign']} benign, {s['n_unsafe']} unsafe, {s['n_pairs']} benign/unsafe pairs)",
        f"- Policy: `{p['name']}` version {p['version']}, digest `{p['digest']}` ({p['file']})",
        f"- Generator: `{g['kind']}` "
        + json.dumps(
            {k: v for k, v in g.items() if k not in ("kind", "twins")}, ensure_ascii=False
        ),
        f"- Twins: {g['twins']}",
        f"- Near-duplicates: {d['rule']}",
        f"- Policy filter: `{j['kind']}`: {j['rule']}",
        f"- Target: {'none (no boundary sampling)' if t is None else t['system'] + ', ' + t['counts']}",
    ]
    if t is not None:
        lines += ["", f"**Bias.** {t['bias']}"]
    lines += [
        "",
        "Counts: each step's column is what it dropped; `kept` of `target` went into the suite.",
        "",
        "| category | label | target | " + " | ".join(STEPS) + " |",
        "|---|---|---:|" + "---:|" * len(STEPS),
    ]
    for cat, by_label in card["counts"].items():
        for label, c in by_label.items():
            lines.append(
                f"| {cat} | {label} | {c['target']} | "
                + " | ".join(str(c.get(k, 0)) for k in STEPS)
                + " |"
            )
    if card["short_of_target"]:
        lines += [
            "",
            "Short of target (the generator ran out, or the filters dropped too many): "
            + ", ".join(f"{k} by {n}" for k, n in card["short_of_target"].items())
            + ". Add templates or seeds, raise --max-requests, or lower the targets.",
        ]
    return "\n".join(lines) + "\n"
