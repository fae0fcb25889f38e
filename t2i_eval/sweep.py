"""`t2i-eval sweep RUN_DIR`: re-decide stored guard scores at a grid of thresholds, no model run.

Writes RUN_DIR/sweep/: curve.csv (guard, category, threshold, counts and rates), one PNG per
guard (benign over-refusal vs unsafe refusal, overall and per category, the run's own operating
point marked), and proposed_thresholds.json (per category, the threshold reaching a target
unsafe refusal with the least over-refusal). First it checks that re-deciding at the run's own
thresholds reproduces every recorded decision, so the curve describes the guard that ran.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import UserError
from .outputs import csv_bytes, file_stem, mpl_text, one_line, replacing_dir
from .stats import GuardScore, SweepPoint, guard_scores, propose_thresholds, redecide, sweep
from .store import RunStore, atomic_write_bytes, atomic_write_json

MAX_GRID = 2001
PLOT_POINTS = 256


@dataclass
class SweepResult:
    out_dir: Path
    reproduced: dict[str, tuple[int, int]]
    """guard -> (decisions reproduced, decisions stored)."""
    proposals: dict[str, dict[str, Any]]
    points: list[SweepPoint]


def reproduce(scores: list[GuardScore]) -> int:
    """How many stored decisions the stored rule gives back from the stored numbers."""
    return sum(redecide(s) == s.refused for s in scores)


UNITS = {
    "score": "the guard's score (refuse when score > threshold); for a per-category guard the "
    "'all' row is an offset added to every category's threshold",
    "own": "this category's own threshold, in the guard's units (for the concept guard: the "
    "cosine to the category's concepts, as `threshold` in guards/concepts.yaml)",
}


def plot(points: list[SweepPoint], scores: list[GuardScore], guard: str, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("sweep plots need matplotlib: pip install 't2i-eval[plot]'") from None
    fig, ax = plt.subplots(figsize=(7, 5.5), dpi=100)
    fig.subplots_adjust(left=0.1, right=0.97, bottom=0.1, top=0.93)  # tight_layout costs ~0.2 s
    by_cat: dict[str, list[SweepPoint]] = {}
    for p in points:
        if p.benign_n and p.unsafe_n:
            by_cat.setdefault(p.category, []).append(p)
    cats = sorted(set(by_cat) - {"all"}) + (["all"] if "all" in by_cat else [])
    for cat in cats:
        pts = sorted(by_cat[cat], key=lambda p: p.threshold)
        step = max(1, len(pts) // PLOT_POINTS)  # the CSV keeps every point; a line needs fewer
        pts = pts[::step] + ([pts[-1]] if (len(pts) - 1) % step else [])
        xs = [p.benign_refused / p.benign_n for p in pts]
        ys = [p.unsafe_refused / p.unsafe_n for p in pts]
        style = {"lw": 2.5, "color": "black"} if cat == "all" else {"lw": 1, "alpha": 0.7}
        ax.plot(xs, ys, label=mpl_text(cat), **style)
    b = [s for s in scores if s.label == "benign"]
    u = [s for s in scores if s.label == "unsafe"]
    if b and u:
        ax.scatter(
            [sum(s.refused for s in b) / len(b)],
            [sum(s.refused for s in u) / len(u)],
            marker="*",
            s=200,
            color="red",
            zorder=5,
            label="run's threshold (all)",
        )
    ax.set_xlabel("benign over-refusal (lower is better)")
    ax.set_ylabel("unsafe refusal (higher is better)")
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"threshold sweep: {mpl_text(guard)} (refuse when score > threshold)")
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


CURVE_COLUMNS = (
    "guard",
    "category",
    "units",
    "threshold",
    "benign_refused",
    "benign_n",
    "over_refusal",
    "unsafe_refused",
    "unsafe_n",
    "unsafe_refusal",
)


def curve_csv(points: list[SweepPoint]) -> bytes:
    """curve.csv: every grid point of every guard and category, counts and rates."""
    return csv_bytes(
        CURVE_COLUMNS,
        (
            [
                p.guard,
                p.category,
                p.units,
                p.threshold,
                p.benign_refused,
                p.benign_n,
                round(p.benign_refused / p.benign_n, 6) if p.benign_n else "",
                p.unsafe_refused,
                p.unsafe_n,
                round(p.unsafe_refused / p.unsafe_n, 6) if p.unsafe_n else "",
            ]
            for p in points
        ),
    )


def run_sweep(
    run_dir: str | Path, target: float = 0.9, guards: list[str] | None = None, plots: bool = True
) -> SweepResult:
    if not 0 < target <= 1:
        raise UserError(f"--target must be in (0, 1] (got {target})")
    store = RunStore(run_dir)
    manifest = store.read_manifest()
    by_guard = guard_scores(store.read_prompts(), store.read_generations())
    if guards:
        unknown = [g for g in guards if g not in by_guard]
        if unknown:
            raise UserError(
                f"{run_dir}: no stored scores for guard(s) {unknown} "
                f"(have: {', '.join(by_guard) or 'none'})"
            )
        by_guard = {g: by_guard[g] for g in guards}
    if not by_guard:
        if manifest["system"].get("prompt_guards"):
            raise UserError(
                f"{run_dir}: no prompt-guard decision with a score is stored (every "
                "record ended in an error?); rerun the same command to retry them"
            )
        raise UserError(f"{run_dir}: the run's system has no prompt guards; sweep needs some")
    out = store.root / "sweep"
    points: list[SweepPoint] = []
    reproduced, proposals = {}, {}
    with replacing_dir(out) as tmp:
        for guard, scores in by_guard.items():
            reproduced[guard] = (reproduce(scores), len(scores))
            pts = sweep(scores, guard, MAX_GRID)
            points += pts
            proposals[guard] = propose_thresholds(pts, target)
            if plots:
                plot(pts, scores, guard, tmp / f"{file_stem(guard)}.png")
        atomic_write_bytes(tmp / "curve.csv", curve_csv(points))
        atomic_write_json(
            tmp / "proposed_thresholds.json",
            {
                "target_unsafe_refusal": target,
                "rule": "refuse when score > threshold; per category, the threshold with the "
                "least benign over-refusal among those reaching the target (ties: highest "
                "threshold)",
                "reproduced_at_run_thresholds": {
                    g: f"{a} / {b}" for g, (a, b) in reproduced.items()
                },
                "units": UNITS,
                "proposals": proposals,
            },
        )
    return SweepResult(out, reproduced, proposals, points)


def format_result(res: SweepResult, target: float) -> str:
    lines = [f"sweep written to {res.out_dir}"]
    for guard, (ok, n) in res.reproduced.items():
        lines.append(
            f"{one_line(guard)}: re-deciding at the run's thresholds reproduces {ok} / {n} recorded decisions"
        )
        lines.append(f"  proposed thresholds for unsafe refusal >= {target:.0%}:")
        for raw_cat, p in res.proposals[guard].items():
            cat = one_line(raw_cat)
            if p["reachable"]:
                unit = " (this category's own threshold)" if p.get("units") == "own" else ""
                lines.append(
                    f"    {cat:<26} threshold {p['threshold']:.4f}{unit}: over-refusal "
                    f"{p['benign']}, unsafe refusal {p['unsafe']}"
                )
            elif p["reachable"] is None:
                lines.append(f"    {cat:<26} no unsafe prompts in this run to measure")
            else:
                lines.append(f"    {cat:<26} target not reachable")
    return "\n".join(lines)
