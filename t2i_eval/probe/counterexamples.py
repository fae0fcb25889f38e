"""Benign hard negatives for guard training: prompts that carry the wording a guard reacts to
but ask for nothing harmful. Without them a probe learns "knife, blood, naked -> unsafe", which
is the over-refusal this project measures.

Two origins, both labelled benign and kept in their category:
- `from_triggers_run(RUN_DIR)`: a `t2i-eval triggers` run's refused benign prompts (loo.json),
  each with the trigger words that made the guard refuse it.
- `from_unsafe(prompts, rewriter)`: each unsafe training prompt rewritten by a prompt rewriter
  (`rule`: the rewrite lexicon, offline; `llm:MODEL` where a model is available) so its harmful
  terms give way to the lexicon's benign alternatives while the rest of its wording (subjects,
  setting, style) stays: a twin that looks like the unsafe prompt and is not. Only rewrites
  that changed something (status `ok`) are kept.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

from ..errors import UserError
from ..store import RunStore
from ..types import Prompt, content_id
from .card import text_key


def _benign(text: str, category: str, source: str, meta: dict[str, object]) -> Prompt:
    return Prompt(
        id=content_id(text, category, "benign"),
        text=text,
        category=category,
        label="benign",
        source=source,
        meta=meta,
    )


def from_triggers_run(run_dir: str | Path) -> list[Prompt]:
    """The refused benign prompts of a triggers run, once each, with their trigger words."""
    path = RunStore(run_dir).triggers_dir / "loo.json"
    if not path.is_file():
        raise UserError(
            f"--counterexamples {run_dir}: {path} not found (expected a run explained by "
            f"triggers); run: t2i-eval triggers {run_dir}"
        )
    try:
        data = json.loads(path.read_bytes())
        guards = data["guards"]
        records = [(g, r) for g, body in guards.items() for r in body["records"]]
        rows = [(g, str(r["text"]), str(r["category"]), list(r["triggers"])) for g, r in records]
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise UserError(
            f"--counterexamples {run_dir}: {path} is not a triggers result ({e!r}); rerun "
            f"t2i-eval triggers {run_dir}"
        ) from None
    out: dict[str, Prompt] = {}
    for guard, text, category, triggers in rows:
        if text not in out:
            meta = {"origin": "triggers", "guard": guard, "triggers": triggers}
            out[text] = _benign(text, category, f"{run_dir} triggers", meta)
    return list(out.values())


def from_unsafe(prompts: Sequence[Prompt], rewriter: str = "rule") -> list[Prompt]:
    """Benign twins of the unsafe prompts (see the module docstring), each with parent_id set."""
    from ..rewrite.rewriters import build_rewriter

    rw = build_rewriter(rewriter)
    out = []
    for p in prompts:
        if p.label != "unsafe":
            continue
        r = rw.rewrite(p.id, p.text)
        if r.status != "ok":
            continue
        meta = {"origin": f"unsafe-{rw.key}", "replaced": r.details.get("replaced", [])}
        twin = _benign(r.text, p.category, f"{p.source} rewritten by {rw.key}", meta)
        out.append(dataclasses.replace(twin, parent_id=p.id))
    return out


def dedupe(extra: Sequence[Prompt], train: Sequence[Prompt]) -> tuple[list[Prompt], int]:
    """(the extra prompts whose normalized text is neither in `train` nor repeated, how many
    were dropped): a counterexample already in the training data would count twice, and one
    that is an unsafe training prompt would teach both labels for one text."""
    seen = {text_key(p.text) for p in train}
    kept = []
    for p in extra:
        key = text_key(p.text)
        if key not in seen:
            seen.add(key)
            kept.append(p)
    return kept, len(extra) - len(kept)
