"""Train a prompt guard: a linear or MLP head (a probe) on a frozen text encoder, from labelled
suites (benign/unsafe; any suite `run` takes: files, specs, recipes, built-ins).

  t2i-eval train-guard --train core --out guards/core-minilm
  t2i-eval train-guard --train a.csv --train b.suite.yaml --encoder clip-text:tiny --head mlp \\
      --counterexamples outputs/RUN --counterexamples-from-unsafe --seed 1 --out guards/mine
  t2i-eval run --suite OTHER --system probe:guards/core-minilm      (guards-only)
  t2i-eval run --suite OTHER --system 'probe:guards/core-minilm>tiny'

Encoders: minilm (all-MiniLM-L6-v2, shipped, offline), st:ID_OR_PATH (any sentence-transformers
model), clip-text:MODEL_OR_PATH (a T2I pipeline's CLIP text encoder at [EOS]; `tiny` is the
offline random-weight one). The threshold is chosen on out-of-fold scores of the training data
only (--target-unsafe-refusal, default 0.9, or --max-overrefusal). Writes DIR/guard.json (the
card: encoder and digest, head, training suites with digests and counts, counterexamples, seed,
thresholds, cross-validated metrics) and DIR/head.safetensors.
With --leave-one-source-out, trains once per held-out suite and writes the transfer matrix.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

from ..errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command's options (kept light: no heavy import here)."""
    parser.add_argument(
        "--train",
        action="append",
        required=True,
        metavar="SUITE",
        help="a labelled suite (repeat for several sources); NAME=SUITE+SUITE joins the files of "
        "one source (e.g. overt=OVERT_mini.csv+OVERT_unsafe_dev.csv), so a held-out source is "
        "held out whole",
    )
    parser.add_argument(
        "--encoder",
        default="minilm",
        metavar="E",
        help="minilm (default), st:ID_OR_PATH or clip-text:MODEL_OR_PATH",
    )
    parser.add_argument("--head", default="linear", choices=("linear", "mlp"))
    parser.add_argument(
        "--counterexamples",
        action="append",
        default=[],
        metavar="RUN_DIR",
        help="add the refused benign prompts of a `t2i-eval triggers` run as benign examples",
    )
    parser.add_argument(
        "--counterexamples-from-unsafe",
        nargs="?",
        const="rule",
        default=None,
        metavar="REWRITER",
        help="add benign twins of the unsafe training prompts made by a rewriter "
        "(rule: the rewrite lexicon, offline, the default; llm:MODEL)",
    )
    parser.add_argument("--seed", type=int, default=0)
    rule = parser.add_mutually_exclusive_group()
    rule.add_argument(
        "--target-unsafe-refusal",
        type=float,
        default=None,
        metavar="F",
        help="threshold refusing this share of training unsafe prompts (0.9)",
    )
    rule.add_argument(
        "--max-overrefusal",
        type=float,
        default=None,
        metavar="F",
        help="threshold refusing at most this share of training benign prompts",
    )
    parser.add_argument(
        "--per-category",
        action="store_true",
        help="also choose one threshold per category (recorded in the card)",
    )
    parser.add_argument("--cv-folds", type=int, default=5, metavar="K")
    parser.add_argument("--out", required=True, metavar="DIR")
    parser.add_argument(
        "--leave-one-source-out",
        action="store_true",
        help="train on all suites but one, test on that one, for each suite",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def _check(args: argparse.Namespace) -> Path:
    """Flag values, before anything loads or is written."""
    from .card import CARD

    if args.cv_folds < 2:
        raise UserError(f"--cv-folds must be >= 2 (got {args.cv_folds})")
    for flag in ("target_unsafe_refusal", "max_overrefusal"):
        v = getattr(args, flag)
        if v is not None and not 0 <= v <= 1:
            raise UserError(f"--{flag.replace('_', '-')} must be between 0 and 1 (got {v})")
    out = Path(args.out)
    if args.leave_one_source_out:
        from ..outputs import check_output_dir
        from .loso import FIX, OWNED

        check_output_dir(out, OWNED, FIX)
        return out
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a folder; give a folder for the guard")
    if out.is_dir() and any(out.iterdir()) and not (out / CARD).is_file():
        raise UserError(
            f"--out {out}: a non-empty folder that holds no trained guard; give a new folder "
            "(an existing guard folder is overwritten)"
        )
    return out


#: `--train NAME=A+B`: one source made of several suite files.
_JOINED = re.compile(r"([A-Za-z0-9_.-]+)=(.+)")


def _load_train(refs: list[str]) -> list[Any]:
    """One suite per `--train`; `NAME=A+B` is one source from several files (`loso.merge_sources`
    keeps prompts the files share once)."""
    from ..suites import load_suite
    from .loso import merge_sources

    suites = []
    for ref in refs:
        joined = _JOINED.fullmatch(ref)
        if joined is None:
            suites.append(load_suite(ref))
            continue
        parts = [p for p in joined.group(2).split("+") if p]
        if not parts:
            raise UserError(f"--train {ref}: give NAME=SUITE[+SUITE...]")
        suites.append(merge_sources(joined.group(1), [load_suite(p) for p in parts]))
    return suites


def _counterexamples(args: argparse.Namespace, train: list[Any]) -> tuple[list[Any], int]:
    from .counterexamples import dedupe, from_triggers_run, from_unsafe

    prompts = [p for s in train for p in s.prompts]
    extra = [p for run in args.counterexamples for p in from_triggers_run(run)]
    if args.counterexamples_from_unsafe:
        extra += from_unsafe(prompts, args.counterexamples_from_unsafe)
    return dedupe(extra, prompts)


def _summary(card: dict[str, Any], out: Path) -> str:
    from ..stats import fmt_rate
    from .card import sources_text

    t = card["threshold"]
    lines = [
        f"trained: {card['head']['kind']} head on {card['encoder']['id']} "
        f"({card['encoder']['weights']} weights), seed {card['seed']}",
        f"sources: {sources_text(card)}",
        f"threshold {t['value']:.4f} ({t['rule']}, chosen on {t['chosen_on']})",
    ]
    cv = card.get("cv")
    if cv:
        a, r = cv["all"], cv["all"]["at_threshold"]
        lines.append(
            f"cross-validated ({cv['folds']} folds): AUROC {a['auroc']}, FPR at 95% TPR "
            f"{a['fpr_at_95_tpr']}; at the threshold benign over-refusal "
            f"{fmt_rate(r['benign_refused'], r['benign_n'])}, unsafe refusal "
            f"{fmt_rate(r['unsafe_refused'], r['unsafe_n'])}"
        )
    ce = card.get("counterexamples") or {}
    if ce.get("added") or ce.get("dropped_duplicates"):
        lines.append(
            f"counterexamples: {ce.get('added', 0)} added "
            f"({ce.get('dropped_duplicates', 0)} dropped as already in the training data)"
        )
        for label, m in (ce.get("effect") or {}).items():
            r = m["at_threshold"]
            lines.append(
                f"  {label}: on the training suites (out-of-fold) AUROC {m['auroc']}, benign "
                f"over-refusal {fmt_rate(r['benign_refused'], r['benign_n'])}, unsafe refusal "
                f"{fmt_rate(r['unsafe_refused'], r['unsafe_n'])}"
            )
    lines.append(f"written: {out}/guard.json, {out}/head.safetensors")
    lines.append(f"use it: t2i-eval run --suite SUITE --system probe:{out}")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    """`t2i-eval train-guard`: load the suites, train, save the guard, print its card's summary."""
    from .encoders import load_encoder

    out = _check(args)
    train = _load_train(args.train)
    extra, dropped = _counterexamples(args, train)
    progress = not args.quiet
    if args.leave_one_source_out:
        from .loso import leave_one_source_out

        folder = leave_one_source_out(
            train,
            encoder=args.encoder,
            head=args.head,
            seed=args.seed,
            out=out,
            counterexamples=extra,
            progress=progress,
            folds=args.cv_folds,
        )
        print(f"written: {folder}")
        return 0
    from .train import counterexample_effect, train_probe

    encoder = load_encoder(args.encoder)
    options = dict(
        encoder=encoder,
        head=args.head,
        seed=args.seed,
        target_unsafe_refusal=args.target_unsafe_refusal,
        max_overrefusal=args.max_overrefusal,
        per_category=args.per_category,
        cv_folds=args.cv_folds,
        progress=progress,
    )
    probe = train_probe(train, counterexamples=extra, **options)
    probe.card["counterexamples"]["dropped_duplicates"] = dropped
    probe.card["counterexamples"]["from"] = {
        "triggers_runs": [str(r) for r in args.counterexamples],
        "from_unsafe": args.counterexamples_from_unsafe,
    }
    if extra:
        without = train_probe(train, **options)
        probe.card["counterexamples"]["effect"] = counterexample_effect(probe, without)
    probe.save(out)
    print(_summary(probe.card, out))
    return 0
