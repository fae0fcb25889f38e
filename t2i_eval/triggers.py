"""Refusal triggers: which word of a refused benign prompt makes the guard refuse it, and which
safety-checker concept made it refuse a benign image.

Leave-one-word-out: each refused benign prompt is re-scored through the same prompt guard (rebuilt
from the run's manifest) once per word, with that word removed. A word whose removal flips the
decision to "pass" is a trigger; a refusal is "explained by a single word" when at least one
removal flips it. Writes RUN_DIR/triggers/loo.json and loo.csv; the report shows the top triggers.

Image side (no model run): for each benign image the safety checker refused, the concepts
(of its 17, and of the 3 special-care ones) whose score round(cos - w + adjustment, 3) was above
0, re-decided from the stored cosines. Writes RUN_DIR/triggers/image_concepts.json; the report
shows the counts per category whenever such images exist.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from tqdm import tqdm

from .errors import UserError
from .outputs import csv_bytes, md_cell
from .store import Record, RunStore, atomic_write_bytes, atomic_write_json
from .sweep import checker_scores
from .systems import build_component
from .systems.spec import ComponentSpec
from .types import Generation, Prompt, category_order

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
        if any(
            d.stage == "prompt_guard" and d.name == guard and d.refused and not d.unavailable
            for d in g.decisions
        ):  # a fail-closed decision (on_error: refuse) is not the guard's own refusal
            out[p.id] = (p.id, p.category, p.text)
    return list(out.values())


def find_triggers(
    run_dir: str | Path, guards: list[str] | None = None, progress: bool = True
) -> dict[str, Any]:
    """Leave-one-word-out over each refused benign prompt, per prompt guard (see the module docstring)."""
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
        guard = build_component("prompt guard", ComponentSpec(name, opts))
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
        was, is_ = ran.get("thresholds_file"), now.get("thresholds_file")
        if was and was.get("sha256") != (is_ or {}).get("sha256"):
            raise UserError(
                f"prompt guard '{name}': its thresholds file {was.get('path')} changed since the "
                "run (sha256 differs); triggers would explain another guard"
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


IMAGE_METHOD = (
    "stored per-concept cosines of each refused benign image, re-decided: a concept decided the "
    "refusal when round(cos - w + adjustment, 3) > 0 (diffusers' rule); numbered as in the "
    "checker, concepts 0-16 and special-care concepts 0-2"
)


def image_triggers(
    prompts: Iterable[Prompt] | Mapping[str, Prompt], gens: Mapping[str, Generation | Record]
) -> dict[str, Any]:
    """Per image guard with per-concept scores (the safety checker) and per category: the benign
    images it refused and how many of them each concept (and special-care concept) exceeded its
    threshold in; `top` counts the highest-scoring concept of each image. An image whose stored
    refusal the stored numbers do not give back is counted in `not_reproduced`, not explained."""
    result: dict[str, Any] = {"method": IMAGE_METHOD, "guards": {}}
    for name, scores in checker_scores(prompts, gens).items():
        cells: dict[str, dict[str, Any]] = defaultdict(
            lambda: {
                "refused": 0,
                "concepts": Counter(),
                "special_care": Counter(),
                "top": Counter(),
            }
        )
        records, missed = [], 0
        for s in scores:
            if s.label != "benign" or not s.refused:
                continue
            d = s.decide()
            if not d["bad_concepts"]:
                missed += 1
                continue
            scores_k = d["concept_scores"]
            top = max(d["bad_concepts"], key=lambda k: scores_k[k])
            cell = cells[s.category]
            cell["refused"] += 1
            cell["concepts"].update(d["bad_concepts"])
            cell["special_care"].update(d["special_care"])
            cell["top"][top] += 1
            records.append(
                {
                    "record_id": s.record_id,
                    "prompt_id": s.prompt_id,
                    "category": s.category,
                    "concepts": d["bad_concepts"],
                    "special_care": d["special_care"],
                    "top": top,
                    "concept_scores": scores_k,
                }
            )
        result["guards"][name] = {
            "n_concepts": len(scores[0].concept_cos) if scores else 0,
            "n_special": len(scores[0].special_cos) if scores else 0,
            "categories": {
                cat: {
                    "refused": cells[cat]["refused"],
                    "concepts": sorted(
                        cells[cat]["concepts"].items(), key=lambda kv: (-kv[1], kv[0])
                    ),
                    "special_care": sorted(
                        cells[cat]["special_care"].items(), key=lambda kv: (-kv[1], kv[0])
                    ),
                    "top": sorted(cells[cat]["top"].items(), key=lambda kv: (-kv[1], kv[0])),
                }
                for cat in category_order(cells)
            },
            "records": records,
            "not_reproduced": missed,
        }
    return result


def image_triggers_section(result: dict[str, Any] | None, top: int = 5) -> str:
    """Markdown: per image guard and category, the concepts most often above threshold in the
    benign images it refused ('' when there are none: the section appears only then)."""
    guards = (result or {}).get("guards", {})
    if not any(g["categories"] or g.get("not_reproduced") for g in guards.values()):
        return ""
    lines = [
        "",
        "## Image-guard triggers (benign images the safety checker refused)",
        "",
        "Which checker concepts scored above their threshold (round(cos - w + adjustment, 3) > 0, "
        "re-decided from the stored cosines) in each refused benign image; an image can exceed "
        "several. Concepts are numbered as in the checker (17 concepts, 3 special-care ones).",
        "",
        "| guard | category | refused benign images | concepts above threshold (images) "
        "| highest concept (images) | special-care (images) |",
        "|---|---|---|---|---|---|",
    ]
    for name, g in guards.items():
        if g.get("not_reproduced"):
            lines.insert(
                4,
                f"Warning: {g['not_reproduced']} refusal(s) of '{md_cell(name)}' are not "
                "reproduced from the stored numbers and are left out.\n",
            )

        def fmt(pairs: list[list[int]]) -> str:
            return ", ".join(f"{k} ({n})" for k, n in pairs[:top]) or "-"

        for cat, c in g["categories"].items():
            lines.append(
                f"| {md_cell(name)} | {md_cell(cat)} | {c['refused']} | {fmt(c['concepts'])} "
                f"| {fmt(c['top'])} | {fmt(c['special_care'])} |"
            )
    return "\n".join(lines) + "\n"


def write_image_triggers(store: RunStore) -> dict[str, Any]:
    """image_concepts.json of a run (its image guards' concepts in refused benign images)."""
    result = image_triggers(store.read_prompts(), store.read_generations())
    atomic_write_json(store.triggers_dir / "image_concepts.json", result)
    return result


def explain_run(
    run_dir: str | Path, guards: list[str] | None = None, progress: bool = True
) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """`t2i-eval triggers`: (leave-one-word-out result of the prompt guards, image concepts of
    the image guards), each None when the run (or `guards`) has no guard of that side."""
    store = RunStore(run_dir)
    system = store.read_manifest()["system"]
    words = [c["name"] for c in system.get("prompt_guards", [])]
    images = [c["name"] for c in system.get("image_guards", [])]
    if not words and not images:
        raise UserError(f"{run_dir}: the run's system has no prompt or image guards to explain")
    chosen = guards or [*words, *images]
    unknown = [g for g in chosen if g not in words and g not in images]
    if unknown:
        raise UserError(
            f"{run_dir}: no guard {unknown} in this run (have: {', '.join([*words, *images])})"
        )
    loo = None
    if any(g in words for g in chosen):
        loo = find_triggers(run_dir, [g for g in chosen if g in words], progress)
    image = None
    if any(g in images for g in chosen):
        image = write_image_triggers(store)
    return loo, image
