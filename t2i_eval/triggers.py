"""Refusal triggers: which word of a refused benign prompt makes the guard refuse it.

Leave-one-word-out: each refused benign prompt is re-scored through the same prompt guard (rebuilt
from the run's manifest) once per word, with that word removed. A word whose removal flips the
decision to "pass" is a trigger; a refusal is "explained by a single word" when at least one
removal flips it. Writes RUN_DIR/triggers/loo.json and loo.csv; the report shows the top triggers.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from tqdm import tqdm

from .errors import UserError
from .outputs import csv_bytes, md_cell
from .store import RunStore, atomic_write_bytes, atomic_write_json
from .systems import checked_class
from .systems.spec import ComponentSpec

_WORD = re.compile(r"\S+")


def variants(text: str) -> list[tuple[str, str]]:
    """(removed word, text without it) for each word of the prompt."""
    spans = [m.span() for m in _WORD.finditer(text)]
    out = []
    for a, b in spans:
        word = re.sub(r"^\W+|\W+$", "", text[a:b]).lower()
        rest = (text[:a] + text[b:]).strip()
        out.append((word or text[a:b], re.sub(r"\s{2,}", " ", rest)))
    return out


def refused_benign(store: RunStore, guard: str) -> list[tuple[str, str, str]]:
    """(prompt_id, category, text) of benign prompts this guard's own decision refused, once per
    prompt (a prompt guard sees only the text: every seed repeats the same decision)."""
    prompts = {p.id: p for p in store.read_prompts()}
    out: dict[str, tuple[str, str, str]] = {}
    for g in store.read_generations().values():
        p = prompts.get(g.prompt_id)
        if p is None or p.label != "benign" or p.id in out:
            continue
        if any(d.stage == "prompt_guard" and d.name == guard and d.refused for d in g.decisions):
            out[p.id] = (p.id, p.category, p.text)
    return list(out.values())


def find_triggers(
    run_dir: str | Path, guards: list[str] | None = None, progress: bool = True
) -> dict[str, Any]:
    store = RunStore(run_dir)
    manifest = store.read_manifest()
    specs = {c["name"]: c for c in manifest["system"]["prompt_guards"]}
    if not specs:
        raise UserError(f"{run_dir}: the run's system has no prompt guards to explain")
    chosen = guards or list(specs)
    unknown = [g for g in chosen if g not in specs]
    if unknown:
        raise UserError(
            f"{run_dir}: no prompt guard {unknown} in this run (have: {', '.join(specs)})"
        )
    result: dict[str, Any] = {"method": "leave-one-word-out through the same guard", "guards": {}}
    for name in chosen:
        opts = {k: v for k, v in specs[name].items() if k != "name"}
        guard = checked_class("prompt guard", ComponentSpec(name, opts))(**opts)
        ran = next(
            (
                c.get("info", {})
                for c in manifest.get("components", [])
                if c.get("stage") == "prompt_guard" and c.get("name") == name
            ),
            {},
        )
        now = guard.info()
        if "version" in ran and ran.get("version") != now.get("version"):
            raise UserError(
                f"prompt guard '{name}': its data is version {now.get('version')} now "
                f"but the run used version {ran.get('version')}; triggers would "
                "explain another guard"
            )
        rows = refused_benign(store, name)
        # the rebuilt guard must still refuse each prompt, or its triggers mean nothing
        still = guard.check([text for _, _, text in rows]) if rows else []
        not_reproduced = sum(d.refused is not True for d in still)
        rows = [r for r, d in zip(rows, still, strict=True) if d.refused is True]
        per_cat: dict[str, dict[str, Any]] = defaultdict(
            lambda: {"refused": 0, "single_word": 0, "triggers": Counter()}
        )
        records = []
        for rid, cat, text in tqdm(
            rows, desc=f"triggers {name}", unit="prompt", disable=not progress or not rows
        ):
            vs = variants(text)
            decisions = guard.check([v for _, v in vs]) if vs else []
            flips = sorted(
                {w for (w, _), d in zip(vs, decisions, strict=True) if d.refused is False}
            )
            cell = per_cat[cat]
            cell["refused"] += 1
            cell["single_word"] += bool(flips)
            cell["triggers"].update(flips)
            records.append({"record_id": rid, "category": cat, "text": text, "triggers": flips})
        result["guards"][name] = {
            "categories": {
                cat: {
                    "refused": c["refused"],
                    "explained_by_one_word": c["single_word"],
                    "top": c["triggers"].most_common(),
                }
                for cat, c in per_cat.items()
            },
            "records": records,
            "not_reproduced": not_reproduced,
        }
    out = store.triggers_dir
    atomic_write_json(out / "loo.json", result)
    rows = [
        [name, r["record_id"], r["category"], " ".join(r["triggers"]), r["text"]]
        for name, g in result["guards"].items()
        for r in g["records"]
    ]
    header = ["guard", "record_id", "category", "triggers", "text"]
    atomic_write_bytes(out / "loo.csv", csv_bytes(header, rows))
    return result


def triggers_section(result: dict[str, Any] | None, top: int = 5) -> str:
    """Markdown: per guard and category, the words most often found to trigger a refusal."""
    if not result or not result.get("guards"):
        return ""
    lines = [
        "",
        "## Refusal triggers (benign prompts, leave-one-word-out)",
        "",
        "A trigger is a word whose removal alone makes the guard accept the prompt.",
        "",
        "| guard | category | refused benign | explained by one word | top triggers (count) |",
        "|---|---|---|---|---|",
    ]
    for name, g in result["guards"].items():
        if g.get("not_reproduced"):
            lines.insert(
                4,
                f"Warning: {g['not_reproduced']} refusal(s) of '{md_cell(name)}' were not "
                "reproduced by the guard as it is now and are left out.\n",
            )
        for cat, c in g["categories"].items():
            tops = ", ".join(f"{md_cell(w)} ({n})" for w, n in c["top"][:top]) or "-"
            share = c["explained_by_one_word"] / c["refused"] if c["refused"] else 0.0
            lines.append(
                f"| {md_cell(name)} | {md_cell(cat)} | {c['refused']} | {c['explained_by_one_word']} "
                f"({100 * share:.0f}%) | {tops} |"
            )
    return "\n".join(lines) + "\n"
