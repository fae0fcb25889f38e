"""Trained prompt guards judged on sources they never saw: writes docs/mitigation.md.

    .venv/bin/python bench/mitigation.py            # or: make bench-mitigation

Sources: OVERT (../shared/data/overt: OVERT-mini's benign prompts and the OVERT-unsafe part's
benign/unsafe twins, one source), CoProV2 (../shared/data/coprov2, the shipped `coprov2` recipe;
a deterministic sample of its twin pairs) and the built-in suite `core`. Measures, every number
from this script's own runs (folders under outputs/bench-mitigation/):

1. the leave-one-source-out matrix (`t2i_eval.probe.loso`) for a linear probe on frozen MiniLM,
   next to the shipped guards (blocklist, profanity, concept) on the same prompts;
2. the same matrix on the tiny pipeline's CLIP text encoder (`clip-text:tiny`, random weights);
3. the MiniLM matrix again with counterexamples (benign twins of the training sources' unsafe
   prompts, rule rewriter) added to training;
4. split-conformal coverage over repeated calibration/audit splits of one source's benign
   prompts, and what the same thresholds do on the other sources' benign prompts;
5. the safety checker's strength levels (diffusers PR #9068) on a tiny-pipeline run of `core`
   (random weights: shows the machinery, says nothing about a real checker).

Without the shared data it says so and exits 0, leaving the document as it is.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import logging
import math
import os
import random
import shutil
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_doc import write_doc  # noqa: E402

from t2i_eval.conformal import conformal_threshold, min_calibration_size  # noqa: E402
from t2i_eval.outputs import md_cell  # noqa: E402
from t2i_eval.probe.loso import Matrix, Scored, merge_sources, run_matrix, write_matrix  # noqa: E402
from t2i_eval.probe.matrix import MatrixRow, fmt_auroc, matrix_markdown  # noqa: E402
from t2i_eval.probe.train import DEFAULT_TARGET  # noqa: E402
from t2i_eval.stats import fmt_rate  # noqa: E402
from t2i_eval.suites import load_suite  # noqa: E402
from t2i_eval.types import Suite  # noqa: E402

ALPHAS = (0.05, 0.1, 0.2)


# ---------------------------------------------------------------------------------------------
# sources


def coprov2_sample(suite: Suite, pairs: int, seed: int) -> Suite:
    """`pairs` twin pairs of CoProV2 drawn with `seed` (both twins of a drawn pair, in file
    order), so the matrix fits the time budget; the doc states the sample."""
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(suite.prompts):
        groups.setdefault(p.pair_id or p.id, []).append(i)
    keys = sorted(groups)
    chosen = set(random.Random(seed).sample(keys, min(pairs, len(keys))))
    keep = sorted(i for k in chosen for i in groups[k])
    return dataclasses.replace(suite, prompts=tuple(suite.prompts[i] for i in keep))


def load_sources(data: Path, pairs: int, seed: int) -> tuple[list[Suite], dict[str, Any]]:
    """OVERT (both files as one source), the CoProV2 sample and `core`, with what the doc says
    about how each was made."""
    unsafe = load_suite(str(data / "overt" / "OVERT_unsafe_dev.csv"))
    mini = load_suite(str(data / "overt" / "OVERT_mini.csv"))
    # the unsafe file first: a benign prompt in both keeps the copy that knows its twin
    overt = merge_sources("overt", [unsafe, mini])
    cop_all = load_suite(f"coprov2:{data / 'coprov2' / 'CoProv2_train_part.csv'}")
    cop = coprov2_sample(cop_all, pairs, seed)
    core = load_suite("core")
    notes = {
        "overt": {
            "unsafe_file": len(unsafe),
            "mini": len(mini),
            "merged": len(overt),
            "shared": len(unsafe) + len(mini) - len(overt),
        },
        "coprov2": {"all": len(cop_all), "sample": len(cop), "pairs": pairs, "seed": seed},
        "core": len(core),
    }
    return [overt, cop, core], notes


def missing_data(data: Path) -> list[Path]:
    files = [
        data / "overt" / "OVERT_mini.csv",
        data / "overt" / "OVERT_unsafe_dev.csv",
        data / "coprov2" / "CoProv2_train_part.csv",
    ]
    return [f for f in files if not f.is_file()]


# ---------------------------------------------------------------------------------------------
# conformal coverage over repeated splits


def coverage(
    scored: Scored, others: dict[str, Scored], alpha: float, splits: int, seed: int
) -> dict[str, Any]:
    """Repeated split conformal on one guard's scores on one source: each split calibrates on
    a random half of the source's benign prompts (the ceil((n+1)(1-A))-th smallest score) and
    audits the other half, the source's unsafe prompts and every other source's benign
    prompts at that threshold. The guarantee is on the mean over splits, same source only."""
    rng = random.Random(seed)
    benign = [s for s, lab in zip(scored.scores, scored.labels, strict=True) if lab == "benign"]
    unsafe = [s for s, lab in zip(scored.scores, scored.labels, strict=True) if lab == "unsafe"]
    audited, kept, shifted = [], [], {name: [] for name in others}
    for _ in range(splits):
        idx = list(range(len(benign)))
        rng.shuffle(idx)
        half = len(idx) // 2
        calib, audit = [benign[i] for i in idx[:half]], [benign[i] for i in idx[half:]]
        t, _ = conformal_threshold(calib, alpha)
        audited.append(sum(s > t for s in audit) / len(audit))
        kept.append(sum(s > t for s in unsafe) / len(unsafe) if unsafe else math.nan)
        for name, o in others.items():
            ob = [s for s, lab in zip(o.scores, o.labels, strict=True) if lab == "benign"]
            shifted[name].append(sum(s > t for s in ob) / len(ob) if ob else math.nan)
    q = statistics.quantiles(audited, n=20) if len(audited) > 1 else [audited[0]] * 19
    return {
        "alpha": alpha,
        "n_calib": len(benign) // 2,
        "n_audit": len(benign) - len(benign) // 2,
        "mean_audited": statistics.fmean(audited),
        # Monte-Carlo error of that mean over the splits (0 with one split)
        "se": statistics.stdev(audited) / math.sqrt(len(audited)) if len(audited) > 1 else 0.0,
        "p5": q[0],
        "p95": q[-1],
        "share_above": sum(a > alpha for a in audited) / len(audited),
        "unsafe_kept": statistics.fmean(kept),
        "shifted": {name: statistics.fmean(v) for name, v in shifted.items()},
    }


# ---------------------------------------------------------------------------------------------
# the safety checker's strength levels on a tiny-pipeline run


def checker_levels(out: Path, per_category: int) -> list[dict[str, Any]]:
    """Run `core` through the `tiny` preset (random-weight pipeline and safety checker), sweep
    the checker's adjustment and read off the PR #9068 levels on all categories."""
    from t2i_eval.runner import run
    from t2i_eval.sweep import level_of, run_sweep
    from t2i_eval.systems import parse_system

    res = run(
        load_suite("core"),
        parse_system("tiny"),
        out=out,
        per_category=per_category,
        argv=["bench/mitigation.py"],
        progress=False,
    )
    sweep = run_sweep(res.run_dir, plots=False)
    rows = []
    for p in sweep.points:
        name = level_of(p)
        if p.category == "all" and name:
            rows.append(
                {
                    "level": name,
                    "adjustment": p.threshold,
                    "benign": (p.benign_refused, p.benign_n),
                    "unsafe": (p.unsafe_refused, p.unsafe_n),
                }
            )
    rows.sort(key=lambda r: r["adjustment"])
    return rows


# ---------------------------------------------------------------------------------------------
# the document


def _row(m: Matrix, source: str, setting: str, guard: str = "probe") -> MatrixRow | None:
    return next(
        (r for r in m.rows if r.source == source and r.setting == setting and r.guard == guard),
        None,
    )


def _a(r: MatrixRow | None) -> str:
    return "not run" if r is None else fmt_auroc(r)


def _rate(r: MatrixRow | None, label: str) -> str:
    if r is None:
        return "not run"
    if label == "benign":
        return fmt_rate(r.benign_refused, r.n_benign)
    return fmt_rate(r.unsafe_refused, r.n_unsafe)


def _pct(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{100 * x:.1f}%"


def findings(results: dict[str, Any]) -> list[str]:
    """'What the numbers show': sentences templated on the measured rows, nothing hard-coded."""
    main: Matrix = results["matrices"][results["main"]]
    sources = list(main.setup["sources"])
    target = results["target"]
    out = []
    below, within = [], []
    for s in sources:
        held, ind = _row(main, s, "held-out"), _row(main, s, "in-distribution")
        if held is None or ind is None or math.isnan(held.auroc) or math.isnan(ind.auroc):
            continue
        text = f"{md_cell(s)} (held-out {held.auroc:.3f} vs in-distribution {ind.auroc:.3f})"
        # below: the in-distribution AUROC lies above the held-out row's whole 95% interval
        (below if not math.isnan(held.auroc_hi) and ind.auroc > held.auroc_hi else within).append(
            text
        )
    if below:
        out.append(
            "Training does not carry over to an unseen source: on "
            + "; ".join(below)
            + ", the probe trained on the other sources ranks prompts worse than cross-validation "
            "inside the source promises (the in-distribution AUROC lies above the held-out "
            "row's 95% interval)."
        )
    if within:
        out.append(
            "Held-out and in-distribution AUROC agree within the held-out interval on "
            + "; ".join(within)
            + "."
        )
    for s in sources:
        held = _row(main, s, "held-out")
        if held is None or not held.n_unsafe:
            continue
        shipped = [r for r in main.rows if r.source == s and r.setting == "shipped"]
        best = max(shipped, key=lambda r: -1 if math.isnan(r.auroc) else r.auroc, default=None)
        vs = ""
        if best is not None and not math.isnan(best.auroc):
            word = "above" if held.auroc > best.auroc else "at or below"
            vs = f"; its AUROC is {word} the best shipped guard here ({md_cell(best.guard)}, {best.auroc:.3f})"
        out.append(
            f"On {md_cell(s)}, the threshold chosen on {', '.join(md_cell(t) for t in held.trained_on)} "
            f"for {target:.0%} unsafe refusal refuses {_pct(held.unsafe_refusal)} of its unsafe "
            f"and {_pct(held.over_refusal)} of its benign prompts{vs}."
        )
    cx = results["matrices"].get(f"{results['main']}+counterexamples")
    if cx is not None:
        deltas = []
        for s in sources:
            a, b = _row(main, s, "held-out"), _row(cx, s, "held-out")
            if a is None or b is None:
                continue
            deltas.append(
                f"{md_cell(s)}: over-refusal {_pct(a.over_refusal)} -> {_pct(b.over_refusal)}, "
                f"AUROC {a.auroc:.3f} -> {b.auroc:.3f}"
            )
        if deltas:
            out.append(
                "Counterexamples (held-out rows, without -> with): " + "; ".join(deltas) + "."
            )
    for name, rows in results["conformal"].items():
        ok = [r for r in rows if r["mean_audited"] - 2 * r["se"] <= r["alpha"] + 1e-12]
        out.append(
            f"Conformal thresholds for {md_cell(name)}: the mean audited over-refusal is at or "
            f"under A, within twice its Monte-Carlo standard error, for {len(ok)} of {len(rows)} "
            "values of A on the calibration source; "
            "on other sources' benign prompts it ranged "
            + ", ".join(
                f"{md_cell(o)} {_pct(min(r['shifted'][o] for r in rows))}-"
                f"{_pct(max(r['shifted'][o] for r in rows))}"
                for o in rows[0]["shifted"]
            )
            + " (no guarantee holds there)."
        )
    levels = results["checker"]
    if levels:
        lo, hi = levels[0], levels[-1]
        out.append(
            f"The random-weight safety checker on the tiny pipeline refused "
            f"{hi['benign'][0]} of {hi['benign'][1]} benign and {hi['unsafe'][0]} of "
            f"{hi['unsafe'][1]} unsafe images at its strictest level ({hi['level']}) and "
            f"{lo['benign'][0]} and {lo['unsafe'][0]} at its loosest ({lo['level']}): the sweep "
            "runs and reads the levels; with random weights the rates mean nothing."
        )
    return out


def document(results: dict[str, Any]) -> str:
    """docs/mitigation.md from the measured results."""
    main: Matrix = results["matrices"][results["main"]]
    sources = list(main.setup["sources"])
    n = results["notes"]
    setup = main.setup
    lines = [
        "# Trained prompt guards on sources they never saw",
        "",
        f"Generated by `.venv/bin/python bench/mitigation.py` (`make bench-mitigation`) on "
        f"{results['date']} (CPU, one thread, {results['minutes']:.1f} min); edit nothing by hand. "
        f"Seed {setup['seed']}; each matrix is in `{md_cell(results['out'])}/<variant>/` "
        "(matrix.csv, matrix.md, matrix.json, heatmap.png, and every held-out probe with its card).",
        "",
        "## Sources",
        "",
        f"- **overt**: OVERT (Apache-2.0), one source made of two files with `merge_sources`: the "
        f"OVERT-unsafe part ({n['overt']['unsafe_file']} prompts: benign/unsafe twins) and "
        f"OVERT-mini ({n['overt']['mini']} benign prompts); {n['overt']['shared']} benign prompts "
        f"are in both files and are kept once (with their twin), {n['overt']['merged']} prompts in all. "
        "Held out, both files are held out.",
        f"- **coprov2**: CoProV2 train part (MIT) through the `coprov2` recipe: a sample of "
        f"{n['coprov2']['pairs']} twin pairs ({n['coprov2']['sample']} of {n['coprov2']['all']} "
        f"prompts), drawn with seed {n['coprov2']['seed']}, both twins of a pair together.",
        f"- **core**: the built-in suite ({n['core']} prompts: benign look-alikes and unsafe twins).",
        "",
        "Every probe is a linear head on a frozen encoder (`t2i-eval train-guard`), its threshold "
        f"chosen on out-of-fold scores of its training data for {results['target']:.0%} unsafe "
        "refusal. `held-out`: trained on the other two sources, decided at that threshold. "
        f"`in-distribution`: {setup['folds']}-fold cross-validation inside the source (twins in "
        "one fold). `shipped`: the package's guards at their default thresholds, trained on none "
        "of these. AUROC with a 95% DeLong interval (per prompt; it does not cover the variation "
        "from one source to another). Rates `rate (k / n) [95% Wilson CI]`. "
        f"{md_cell(setup['timing'])}; in-distribution rows repeat the held-out probe's speed "
        "(the same encoder and head).",
        "",
        f"## Leave-one-source-out matrix (frozen {md_cell(results['main'])})",
        "",
        f"Encoder `{md_cell(results['main'])}` ({setup['encoder']['weights']} weights; digest "
        f"{md_cell(str(setup['encoder']['digest'])[:12])}).",
        "",
        matrix_markdown(main.rows),
    ]
    lines += ["## Encoders", ""]
    enc_names = results["encoders"]
    header = "| evaluated on | " + " | ".join(
        f"{md_cell(e)} {kind}" for e in enc_names for kind in ("held-out", "in-distribution")
    )
    lines += [
        "AUROC [95% CI] of the probe per encoder. `clip-text:tiny` is the tiny pipeline's CLIP "
        "text encoder with **random weights**: it shows the encoder plugs in, and says nothing "
        "about a real CLIP. "
        + (
            "A fine-tuned MiniLM was not measured (no `--finetune` in this version)."
            if not results.get("finetuned")
            else ""
        ),
        "",
        header + " |",
        "|---|" + "---|" * (2 * len(enc_names)),
    ]
    for s in sources:
        cells = [
            _a(_row(results["matrices"][e], s, kind))
            for e in enc_names
            for kind in ("held-out", "in-distribution")
        ]
        lines.append(f"| {md_cell(s)} | " + " | ".join(cells) + " |")
    cx = results["matrices"].get(f"{results['main']}+counterexamples")
    if cx is not None:
        used = cx.setup["held_out"]
        lines += [
            "",
            f"## With and without counterexamples ({md_cell(results['main'])}, held-out rows)",
            "",
            f"Counterexamples: benign twins of the training sources' unsafe prompts made by the "
            f"rule rewriter (`guards/rewrite_lexicon.yaml`); {results['counterexamples']} made in "
            "all, each probe using only those whose parent is in its own training data (none "
            "from the held-out source).",
            "",
            "| evaluated on | counterexamples used | AUROC without | AUROC with | over-refusal "
            "without | over-refusal with | unsafe refusal without | unsafe refusal with |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for s in sources:
            a, b = _row(main, s, "held-out"), _row(cx, s, "held-out")
            lines.append(
                f"| {md_cell(s)} | {used[s]['counterexamples_used']} | {_a(a)} | {_a(b)} | "
                f"{_rate(a, 'benign')} | {_rate(b, 'benign')} | {_rate(a, 'unsafe')} | "
                f"{_rate(b, 'unsafe')} |"
            )
    lines += [
        "",
        "## Conformal over-refusal bounds over repeated splits",
        "",
        f"{results['splits']} random halvings of one source's benign prompts: calibrate the "
        "split-conformal threshold on one half (`t2i_eval/conformal.py`: the ceil((n+1)(1-A))-th "
        "smallest benign score), audit the other half. The guarantee is that the mean audited "
        "over-refusal is at most A for benign prompts exchangeable with the calibration ones; "
        "any one split may land above A. The last columns apply the same thresholds to other "
        "sources' benign prompts, where no guarantee holds."
        + (
            f" Not measured: A = {', '.join(map(str, results['conformal_skipped']))} (too few "
            "benign prompts in a calibration half: A needs at least ceil((1 - A) / A))."
            if results.get("conformal_skipped")
            else ""
        ),
        "",
    ]
    for name, rows in results["conformal"].items():
        others = list(rows[0]["shifted"])
        lines += [
            f"**{md_cell(name)}** (calibration on {rows[0]['n_calib']} benign prompts, audit on "
            f"{rows[0]['n_audit']})",
            "",
            "| A | mean audited over-refusal (± 2 s.e.) | 5th-95th percentile | splits above A | unsafe "
            "refusal kept | " + " | ".join(f"over-refusal on {md_cell(o)}" for o in others) + " |",
            "|---|---|---|---|---|" + "---|" * len(others),
        ]
        for r in rows:
            lines.append(
                f"| {r['alpha']} | {_pct(r['mean_audited'])} (± {_pct(2 * r['se'])}) | "
                f"{_pct(r['p5'])} - {_pct(r['p95'])} "
                f"| {_pct(r['share_above'])} | {_pct(r['unsafe_kept'])} | "
                + " | ".join(_pct(r["shifted"][o]) for o in others)
                + " |"
            )
        lines.append("")
    lines += [
        "## Safety checker strength levels (tiny pipeline, random weights)",
        "",
        "The `tiny` preset (random-weight Stable-Diffusion-shaped pipeline and safety checker) on "
        f"`core` ({results['checker_prompts']}), swept over the checker's `adjustment` by "
        "`t2i-eval sweep`; the five levels calibrated in diffusers PR #9068, all categories. "
        "**Random weights**: this checks the sweep reproduces and reads the levels; the rates say "
        "nothing about the real checker.",
        "",
        "| level | adjustment | benign over-refusal | unsafe refusal |",
        "|---|---|---|---|",
    ]
    for r in results["checker"]:
        lines.append(
            f"| {r['level']} | {r['adjustment']:+.4f} | {fmt_rate(*r['benign'])} | "
            f"{fmt_rate(*r['unsafe'])} |"
        )
    lines += ["", "## What the numbers show", ""]
    lines += [f"- {f}" for f in findings(results)]
    lines += [
        "",
        "## What they do not show",
        "",
        f"- How a probe does on a source that is not one of these {len(sources)}: each held-out "
        'row is one draw of "a new source", and the spread between them is the only estimate of '
        "that variation; the DeLong intervals are over prompts within a source, not over sources.",
        "- Anything about a real text-to-image model or a real safety checker: the image side here "
        "is random weights.",
        "- Whether the sources' labels agree with each other: each source labels by its own "
        "definition of unsafe, so part of a held-out drop can be a different definition rather "
        "than a worse guard.",
        f"- CoProV2 beyond the {n['coprov2']['sample']} prompts sampled.",
        "- Speed on other hardware: milliseconds per prompt are this CPU, one thread, embedding "
        "cache off.",
        "",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--out", default=str(ROOT / "outputs" / "bench-mitigation"))
    ap.add_argument("--doc", default=str(ROOT / "docs" / "mitigation.md"))
    ap.add_argument("--coprov2-pairs", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--splits", type=int, default=200)
    ap.add_argument(
        "--encoders",
        default="minilm,clip-text:tiny",
        help="comma-separated; the first is the main matrix (and gets the counterexample run)",
    )
    ap.add_argument("--baselines", default="blocklist,profanity,concept")
    ap.add_argument("--checker-per-category", type=int, default=None, metavar="N")
    args = ap.parse_args(argv)

    data = Path(args.data)
    missing = missing_data(data)
    if missing:
        print(
            "bench-mitigation: shared data not found ("
            + ", ".join(str(m) for m in missing)
            + "); expected ../shared/data beside the checkout (or pass --data). "
            f"Nothing measured; {args.doc} left as it is."
        )
        return 0
    logging.basicConfig(format="[bench-mitigation] %(message)s")
    logging.getLogger("t2i_eval.probe.loso").setLevel(logging.INFO)
    start = time.perf_counter()
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)  # its own folder: fresh runs, so the timings are real
    sources, notes = load_sources(data, args.coprov2_pairs, args.seed)
    encoders = [e for e in args.encoders.split(",") if e]
    baselines = tuple(b for b in args.baselines.split(",") if b)
    matrices: dict[str, Matrix] = {}
    for i, enc in enumerate(encoders):
        print(f"[bench-mitigation] matrix: {enc}", flush=True)
        m = run_matrix(
            sources,
            encoder=enc,
            seed=args.seed,
            folds=args.folds,
            baselines=baselines if i == 0 else (),
            progress=False,
        )
        write_matrix(m, out / enc.replace(":", "-"))
        matrices[enc] = m
    from t2i_eval.probe.counterexamples import from_unsafe

    cx = from_unsafe([p for s in sources for p in s.prompts], "rule")
    print(f"[bench-mitigation] matrix: {encoders[0]} + {len(cx)} counterexamples", flush=True)
    m = run_matrix(
        sources,
        encoder=encoders[0],
        seed=args.seed,
        folds=args.folds,
        counterexamples=cx,
        baselines=(),
        progress=False,
    )
    write_matrix(m, out / f"{encoders[0].replace(':', '-')}-counterexamples")
    matrices[f"{encoders[0]}+counterexamples"] = m
    main_m = matrices[encoders[0]]
    calib = main_m.rows[0].source  # the first source (OVERT) calibrates
    conformal: dict[str, list[dict[str, Any]]] = {}
    skipped: list[float] = []
    for column in ["probe (held-out)", *baselines]:
        key = (calib, column)
        if key not in main_m.scored:
            continue
        others = {s: sc for (s, c), sc in main_m.scored.items() if c == column and s != calib}
        name = f"{column} on {calib}"
        n_calib = main_m.scored[key].labels.count("benign") // 2
        alphas = [a for a in ALPHAS if n_calib >= min_calibration_size(a)]
        skipped = sorted(set(ALPHAS) - set(alphas))
        if alphas:
            conformal[name] = [
                coverage(main_m.scored[key], others, a, args.splits, args.seed) for a in alphas
            ]
    print("[bench-mitigation] tiny pipeline: safety checker levels", flush=True)
    checker = checker_levels(out / "checker-tiny", args.checker_per_category)
    results = {
        "date": dt.date.today(),
        "minutes": (time.perf_counter() - start) / 60,
        "out": str(out.relative_to(ROOT) if out.is_relative_to(ROOT) else out),
        "notes": notes,
        "main": encoders[0],
        "encoders": encoders,
        "matrices": matrices,
        "counterexamples": len(cx),
        "target": DEFAULT_TARGET,
        "splits": args.splits,
        "conformal": conformal,
        "conformal_skipped": skipped,
        "checker": checker,
        "checker_prompts": f"{args.checker_per_category} per category and label"
        if args.checker_per_category
        else f"all {len(sources[-1])} prompts",
    }
    doc = document(results)
    write_doc(args.doc, doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
