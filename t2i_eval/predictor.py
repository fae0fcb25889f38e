"""Refusal predictor: how much of a run's refusals the prompt text alone predicts.

A bag of 1-2-grams with logistic regression, cross-validated; the n-grams with the largest
weights per category say what the system reacts to (`t2i-eval triggers` writes it to
RUN_DIR/triggers/predictor.json; the report shows it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .outputs import md_cell


def refusal_predictor(run_dir: str | Path, folds: int = 5, top: int = 5) -> dict[str, Any]:
    """Predict refusal from the prompt text alone: bag of 1-2-grams + logistic regression.

    One example per prompt (refused if any of its records was refused in any way; records with
    errors or unjudged images left out). Reports stratified k-fold cross-validated accuracy and
    AUROC, and per category the n-grams with the largest positive weights that occur there.
    """
    import numpy as np

    from .store import read_run
    from .sweep import auroc

    try:
        from sklearn.feature_extraction.text import CountVectorizer
        from sklearn.linear_model import LogisticRegression
        from sklearn.model_selection import StratifiedKFold, cross_val_predict
    except ImportError:
        from .errors import MissingExtra

        raise MissingExtra("the refusal predictor", "scikit-learn", "guards") from None
    data = read_run(run_dir)
    refused: dict[str, bool] = {}
    for g in data.gens.values():
        out = data.outcome(g.record_id)[0].is_refusal(soft=True)
        if out is None:
            continue
        refused[g.prompt_id] = refused.get(g.prompt_id, False) or out
    prompts = [p for p in data.prompts if p.id in refused]
    y = np.asarray([refused[p.id] for p in prompts], dtype=int)
    k = min(folds, int(y.sum()), int(len(y) - y.sum()))
    if len(prompts) < 10 or k < 2:
        return {
            "skipped": f"needs >= 10 prompts and >= 2 of each class (have {len(prompts)} "
            f"prompts, {int(y.sum())} refused)"
        }
    texts = [p.text for p in prompts]
    vec = CountVectorizer(ngram_range=(1, 2), min_df=2, lowercase=True)
    x = vec.fit_transform(texts)
    model = LogisticRegression(max_iter=2000, C=1.0)
    proba = cross_val_predict(
        model, x, y, cv=StratifiedKFold(k, shuffle=True, random_state=0), method="predict_proba"
    )[:, 1]
    acc = float(((proba > 0.5) == y).mean())
    a = auroc(proba[y == 0].tolist(), proba[y == 1].tolist())
    model.fit(x, y)
    vocab = np.asarray(vec.get_feature_names_out())
    coef = model.coef_[0]
    per_cat: dict[str, list[tuple[str, float]]] = {}
    for cat in sorted({p.category for p in prompts}):
        rows = [i for i, p in enumerate(prompts) if p.category == cat]
        present = np.asarray(x[rows].sum(axis=0)).ravel() > 0
        idx = [i for i in np.argsort(-coef) if present[i] and coef[i] > 0][:top]
        per_cat[cat] = [(str(vocab[i]), round(float(coef[i]), 3)) for i in idx]
    return {
        "n_prompts": len(prompts),
        "refused": int(y.sum()),
        "folds": k,
        "cv_accuracy": round(acc, 4),
        "cv_auroc": round(a, 4),
        "majority_baseline": round(float(max(y.mean(), 1 - y.mean())), 4),
        "top_ngrams": per_cat,
    }


def predictor_section(result: dict[str, Any] | None) -> str:
    """The predictor's result as a report.md section ('' when there is none)."""
    if not result:
        return ""
    if "skipped" in result:
        return f"\n## Refusal predictor\n\nSkipped: {result['skipped']}.\n"
    lines = [
        "",
        "## Refusal predictor (prompt text only)",
        "",
        f"Bag of 1-2-grams + logistic regression, one example per prompt, "
        f"{result['folds']}-fold cross-validated: accuracy {result['cv_accuracy']:.1%} "
        f"(majority baseline {result['majority_baseline']:.1%}), AUROC "
        f"{result['cv_auroc']:.3f}, on {result['n_prompts']} prompts "
        f"({result['refused']} refused).",
        "",
        "| category | most predictive n-grams (weight) |",
        "|---|---|",
    ]
    for cat, grams in result["top_ngrams"].items():
        top = ", ".join(f"{md_cell(g)} ({w})" for g, w in grams) or "-"
        lines.append(f"| {md_cell(cat)} | {top} |")
    return "\n".join(lines) + "\n"
