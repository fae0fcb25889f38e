"""The leave-one-source-out matrix: one row per (evaluated source, guard, setting), its metrics,
and the files it is written as (CSV, Markdown, a heatmap PNG).

A trained filter's in-distribution score overstates it; the matrix puts three settings of a guard
side by side on the same prompts of one source, so the gap shows:

- `held-out`: trained on every other source, never on this one; its threshold was chosen on
  those training sources and is applied here unchanged;
- `in-distribution`: k-fold cross-validation inside this source (folds keep benign/unsafe
  twins together, so a twin never sits on both sides of a split), the optimistic number;
- `shipped`: a guard this package ships (blocklist, profanity, concept), trained on none of
  these sources, at its default threshold.

Metrics, each prompt once: AUROC of the raw score (benign vs unsafe) with a 95% DeLong
interval, FPR at 95% TPR (`sweep.fpr_at_tpr`), benign over-refusal and unsafe refusal at the
guard's own operating point (Wilson intervals, `stats.fmt_rate`) and milliseconds per prompt.
Pure numbers and files: numpy and matplotlib are imported inside the functions that need them.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..outputs import csv_bytes, md_cell, mpl_text
from ..stats import Z95, fmt_rate
from ..sweep import auroc, fpr_at_tpr

#: The settings a row can have, in the order tables show them.
SETTINGS = ("held-out", "in-distribution", "shipped")


def delong_ci(
    negatives: Sequence[float], positives: Sequence[float], z: float = Z95
) -> tuple[float, float]:
    """95% interval for the AUROC by DeLong, DeLong & Clarke-Pearson (1988), clipped to [0, 1].

    With psi(x, y) = 1 if x > y, 1/2 if x == y, else 0, for m positives X and n negatives Y:
    V10_i = mean_j psi(X_i, Y_j), V01_j = mean_i psi(X_i, Y_j), and
    Var(AUROC) = var(V10) / m + var(V01) / n (sample variances, ddof 1). Unlike Hanley-McNeil
    (used by the run report) it assumes no score distribution. With one prompt of a label the
    variance is undefined: (nan, nan). Perfect separation gives a zero-width interval, which
    says the sample separated perfectly, not that the guard always will.
    """
    import numpy as np

    m, n = len(positives), len(negatives)
    if m < 2 or n < 2:
        return math.nan, math.nan
    pos = np.asarray(positives, dtype=np.float64)
    neg = np.asarray(negatives, dtype=np.float64)
    neg_sorted, pos_sorted = np.sort(neg), np.sort(pos)
    # V10: negatives strictly below each positive, ties half; V01: positives strictly above
    v10 = (
        np.searchsorted(neg_sorted, pos, "left")
        + 0.5
        * (np.searchsorted(neg_sorted, pos, "right") - np.searchsorted(neg_sorted, pos, "left"))
    ) / n
    v01 = (
        (m - np.searchsorted(pos_sorted, neg, "right"))
        + 0.5
        * (np.searchsorted(pos_sorted, neg, "right") - np.searchsorted(pos_sorted, neg, "left"))
    ) / m
    a = float(v10.mean())
    half = z * math.sqrt(max(float(v10.var(ddof=1)) / m + float(v01.var(ddof=1)) / n, 0.0))
    return max(0.0, a - half), min(1.0, a + half)


@dataclass(frozen=True)
class MatrixRow:
    """One guard in one setting, evaluated on the prompts of one source."""

    source: str
    """The source evaluated on (the held-out one for `held-out` rows)."""
    guard: str
    """`probe` (trained here) or a shipped guard's name."""
    setting: str
    """`held-out`, `in-distribution` or `shipped` (module docstring)."""
    trained_on: tuple[str, ...]
    """The sources the guard was trained on (empty for shipped guards)."""
    weights: str
    """The encoder's or guard's weights: pretrained, random (labelled in every table), rules."""
    n_benign: int
    n_unsafe: int
    auroc: float
    """P(score of an unsafe prompt > score of a benign one), ties half; nan with one label."""
    auroc_lo: float
    auroc_hi: float
    """The 95% DeLong interval (`delong_ci`)."""
    fpr_at_95_tpr: float
    """Share of benign prompts refused at the highest cut that refuses >= 95% of unsafe ones."""
    threshold: float | None
    """The operating threshold applied (refuse when score > threshold); None when a guard
    decides per category or by rule and has no single number."""
    benign_refused: int
    """Benign prompts refused at the operating point (over-refusal numerator)."""
    unsafe_refused: int
    ms_per_prompt: float
    """Wall milliseconds per prompt to score this source (encoder included for probes)."""

    @property
    def over_refusal(self) -> float:
        return self.benign_refused / self.n_benign if self.n_benign else math.nan

    @property
    def unsafe_refusal(self) -> float:
        return self.unsafe_refused / self.n_unsafe if self.n_unsafe else math.nan

    @property
    def column(self) -> str:
        """The heatmap column and the short name tables use: the guard in its setting."""
        if self.setting == "shipped":
            return self.guard
        return f"{self.guard} ({self.setting})"


def measure(
    *,
    source: str,
    guard: str,
    setting: str,
    trained_on: Iterable[str],
    weights: str,
    labels: Sequence[str],
    scores: Sequence[float],
    refused: Sequence[bool],
    seconds: float,
    threshold: float | None = None,
) -> MatrixRow:
    """A row from per-prompt labels, raw scores and decisions (one each per prompt, in the same
    order) and the seconds scoring them took."""
    if setting not in SETTINGS:
        raise ValueError(f"setting must be one of {SETTINGS}, got {setting!r}")
    if not len(labels) == len(scores) == len(refused):
        raise ValueError(
            f"{source}/{guard}: {len(labels)} labels, {len(scores)} scores, {len(refused)} decisions"
        )
    neg = [float(s) for s, lab in zip(scores, labels, strict=True) if lab == "benign"]
    pos = [float(s) for s, lab in zip(scores, labels, strict=True) if lab == "unsafe"]
    lo, hi = delong_ci(neg, pos)
    return MatrixRow(
        source=source,
        guard=guard,
        setting=setting,
        trained_on=tuple(trained_on),
        weights=weights,
        n_benign=len(neg),
        n_unsafe=len(pos),
        auroc=auroc(neg, pos),
        auroc_lo=lo,
        auroc_hi=hi,
        fpr_at_95_tpr=fpr_at_tpr(neg, pos)[0],
        threshold=threshold,
        benign_refused=sum(
            bool(r) for r, lab in zip(refused, labels, strict=True) if lab == "benign"
        ),
        unsafe_refused=sum(
            bool(r) for r, lab in zip(refused, labels, strict=True) if lab == "unsafe"
        ),
        ms_per_prompt=1000.0 * seconds / max(len(labels), 1),
    )


CSV_COLUMNS = (
    "source",
    "guard",
    "setting",
    "trained_on",
    "weights",
    "n_benign",
    "n_unsafe",
    "auroc",
    "auroc_ci_low",
    "auroc_ci_high",
    "fpr_at_95_tpr",
    "threshold",
    "benign_refused",
    "over_refusal",
    "unsafe_refused",
    "unsafe_refusal",
    "ms_per_prompt",
)


def _num(x: float | None, digits: int = 6) -> float | str:
    """A CSV number: rounded, and empty for nan/None (a spreadsheet reads '' as missing)."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return ""
    return round(float(x), digits)


def matrix_csv(rows: Sequence[MatrixRow]) -> bytes:
    """matrix.csv: one row per (source, guard, setting); `trained_on` joined by '+'."""
    return csv_bytes(
        CSV_COLUMNS,
        (
            [
                r.source,
                r.guard,
                r.setting,
                "+".join(r.trained_on),
                r.weights,
                r.n_benign,
                r.n_unsafe,
                _num(r.auroc),
                _num(r.auroc_lo),
                _num(r.auroc_hi),
                _num(r.fpr_at_95_tpr),
                _num(r.threshold),
                r.benign_refused,
                _num(r.over_refusal),
                r.unsafe_refused,
                _num(r.unsafe_refusal),
                _num(r.ms_per_prompt, 3),
            ]
            for r in rows
        ),
    )


def rows_to_json(rows: Sequence[MatrixRow]) -> list[dict[str, Any]]:
    """The rows as JSON values (nan becomes None), for matrix.json."""
    out = []
    for r in rows:
        d = asdict(r)
        d["trained_on"] = list(r.trained_on)
        out.append(
            {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in d.items()}
        )
    return out


def rows_from_json(items: Sequence[dict[str, Any]]) -> list[MatrixRow]:
    """matrix.json's rows back as MatrixRow (None numbers back to nan)."""
    names = {f.name for f in fields(MatrixRow)}
    out = []
    for d in items:
        v = {k: d[k] for k in names}
        v["trained_on"] = tuple(v["trained_on"])
        for k in ("auroc", "auroc_lo", "auroc_hi", "fpr_at_95_tpr", "ms_per_prompt"):
            v[k] = math.nan if v[k] is None else float(v[k])
        out.append(MatrixRow(**v))
    return out


def fmt_auroc(r: MatrixRow) -> str:
    """`0.873 [0.851, 0.895]`, or n/a when the source lacks one label."""
    if math.isnan(r.auroc):
        return "n/a"
    if math.isnan(r.auroc_lo):
        return f"{r.auroc:.3f}"
    return f"{r.auroc:.3f} [{r.auroc_lo:.3f}, {r.auroc_hi:.3f}]"


def _weights_note(r: MatrixRow) -> str:
    return " (random weights)" if r.weights == "random" else ""


MD_HEADER = (
    "| evaluated on | guard | setting | trained on | AUROC [95% CI] | FPR at 95% TPR | "
    "benign over-refusal | unsafe refusal | ms / prompt |\n"
    "|---|---|---|---|---|---|---|---|---|"
)


def matrix_markdown(rows: Sequence[MatrixRow]) -> str:
    """The matrix as a Markdown table (every name through `md_cell`); rows grouped by source,
    then setting (held-out, in-distribution, shipped). Random-weight encoders are labelled."""
    order = {s: i for i, s in enumerate(SETTINGS)}
    sources = list(dict.fromkeys(r.source for r in rows))
    lines = [MD_HEADER]
    for r in sorted(rows, key=lambda r: (sources.index(r.source), order[r.setting])):
        trained = ", ".join(md_cell(s) for s in r.trained_on) or "nothing here (shipped)"
        if r.setting == "in-distribution":
            trained = f"other folds of {md_cell(r.source)}"
        fpr = "n/a" if math.isnan(r.fpr_at_95_tpr) else f"{r.fpr_at_95_tpr:.3f}"
        lines.append(
            f"| {md_cell(r.source)} | {md_cell(r.guard)}{_weights_note(r)} | {r.setting} | "
            f"{trained} | {fmt_auroc(r)} | {fpr} | {fmt_rate(r.benign_refused, r.n_benign)} | "
            f"{fmt_rate(r.unsafe_refused, r.n_unsafe)} | {r.ms_per_prompt:.2f} |"
        )
    return "\n".join(lines) + "\n"


def heatmap(
    rows: Sequence[MatrixRow], path: Path, title: str = "AUROC by evaluated source"
) -> None:
    """A PNG heatmap of AUROC: one row per evaluated source, one column per guard and setting,
    each cell annotated with its value (grey where it is undefined)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np
    except ImportError:
        raise UserError(
            "the matrix heatmap needs matplotlib: pip install 't2i-eval[plot]'"
        ) from None
    from ..store import atomic_write_bytes

    sources = list(dict.fromkeys(r.source for r in rows))
    order = {s: i for i, s in enumerate(SETTINGS)}
    columns = list(dict.fromkeys(r.column for r in sorted(rows, key=lambda r: order[r.setting])))
    grid = np.full((len(sources), len(columns)), np.nan)
    for r in rows:
        grid[sources.index(r.source), columns.index(r.column)] = r.auroc
    fig, ax = plt.subplots(figsize=(1.6 + 1.5 * len(columns), 1.2 + 0.6 * len(sources)), dpi=100)
    cmap = matplotlib.colormaps["RdYlGn"].with_extremes(bad="lightgrey")
    im = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=0.5, vmax=1.0, aspect="auto")
    for i in range(len(sources)):
        for j in range(len(columns)):
            v = grid[i, j]
            ax.text(
                j, i, "n/a" if np.isnan(v) else f"{v:.2f}", ha="center", va="center", fontsize=9
            )
    ax.set_xticks(range(len(columns)), [mpl_text(c) for c in columns], rotation=30, ha="right")
    ax.set_yticks(range(len(sources)), [mpl_text(s) for s in sources])
    ax.set_title(mpl_text(title))
    fig.colorbar(im, ax=ax, label="AUROC (0.5 = chance)")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(Path(path), buf.getvalue())
