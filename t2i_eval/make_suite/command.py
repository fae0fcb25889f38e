"""Build an over-refusal suite for your own content policy (OVERT's generation workflow).

A policy file (YAML) says per category what is disallowed and what is allowed, gives seed
examples and target counts. The builder generates benign look-alikes (prompts that look
harmful but that the policy allows), drops near-duplicates (MiniLM cosine; OVERT's thresholds:
0.7 for templates, 0.9 for LLM prompts), drops what a judge labels otherwise against the
policy's words, optionally keeps only look-alikes a target system refuses (this biases the
suite against that system: the card says so), and makes an unsafe twin of kept look-alikes.

Writes SUITE.jsonl (give it to `t2i-eval run --suite`), SUITE.card.json and SUITE.card.md
(policy digest, generator and settings, counts at every step, thresholds, target), and keeps
every model answer in SUITE.jsonl.work/: rerunning the same command resumes and asks no model
twice. Exit 0 built, 1 an outage (a model or system that did not answer; rerun), 2 bad input.

Examples:
  t2i-eval make-suite --policy prompts/policies/nine-categories.yaml --out my.jsonl
  t2i-eval make-suite --policy mine.yaml --generator llm:Qwen/Qwen2.5-1.5B-Instruct --out my.jsonl
  t2i-eval make-suite --policy mine.yaml --generator llm:gpt-4o-mini \\
      --base-url https://api.openai.com/v1 --api-key-env OPENAI_API_KEY --out my.jsonl
  t2i-eval make-suite --policy mine.yaml --out my.jsonl --target guards --keep-refused-at-least 1
"""

from __future__ import annotations

import argparse
import sys

from ..errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command's options (kept light: no heavy import here)."""
    parser.add_argument(
        "--policy",
        required=True,
        metavar="POLICY.yaml",
        help="the content policy (see prompts/policies/)",
    )
    parser.add_argument("--out", required=True, metavar="SUITE.jsonl", help="the suite to write")
    parser.add_argument(
        "--generator",
        default="templates",
        metavar="G",
        help="templates (offline, shipped or --templates DIR; default) or llm:MODEL (a local "
        "transformers chat model, or with --base-url an OpenAI-compatible endpoint's model)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="shuffles the templates: same seed, same suite (default 0)",
    )
    parser.add_argument(
        "--templates",
        default=None,
        metavar="DIR",
        help="a templates folder (framings.yaml, categories/*.yaml)",
    )
    parser.add_argument(
        "--judge",
        default="auto",
        help="the policy filter: auto (the generator's model for llm, else embed), embed (offline: "
        "nearest policy phrase with MiniLM), guards[:A+B] (offline: a majority of the shipped "
        "prompt guards refusing means disallowed; drops look-alikes that trip them), none, or "
        "llm:MODEL",
    )
    parser.add_argument(
        "--judge-margin",
        type=float,
        default=0.0,
        help="embed judge: a label needs this cosine lead, else unclear (dropped)",
    )
    parser.add_argument(
        "--dedup-threshold",
        type=float,
        default=None,
        help="drop a candidate whose cosine to one kept is at or above this (default: 0.7 templates, 0.9 llm)",
    )
    parser.add_argument("--base-url", default=None, help="OpenAI-compatible API base URL (llm)")
    parser.add_argument(
        "--api-key-env",
        default=None,
        help="environment variable holding the API key (read only, never written; no key is sent unless one is named)",
    )
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=512,
        help="llm: the most tokens per answer (default 512)",
    )
    parser.add_argument(
        "--per-request",
        type=int,
        default=8,
        help="llm: look-alikes asked for per request (default 8)",
    )
    parser.add_argument(
        "--max-requests",
        type=int,
        default=20,
        help="llm: generation requests per category at most (default 20)",
    )
    parser.add_argument(
        "--target",
        default=None,
        metavar="SYSTEM",
        help="boundary sampling: keep look-alikes this system refuses (any --system spec; guards-only is fine)",
    )
    parser.add_argument(
        "--keep-refused-at-least",
        type=float,
        default=0.5,
        metavar="R",
        help="with --target: keep look-alikes refused on at least this share of seeds (default 0.5)",
    )
    parser.add_argument(
        "--seeds",
        type=int,
        default=1,
        metavar="N",
        help="with --target: seeds per look-alike (default 1)",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def main(args: argparse.Namespace) -> int:
    """Build the suite; exit 0 built, 1 an outage (rerun to resume), 2 bad input (UserError)."""
    from .base import Outage
    from .pipeline import BuildOptions, build

    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be >= 1 (got {args.max_new_tokens})")
    opts = BuildOptions(
        policy=args.policy,
        out=args.out,
        generator=args.generator,
        seed=args.seed,
        templates=args.templates,
        judge=args.judge,
        judge_margin=args.judge_margin,
        dedup_threshold=args.dedup_threshold,
        base_url=args.base_url,
        api_key_env=args.api_key_env,
        max_new_tokens=args.max_new_tokens,
        per_request=args.per_request,
        max_requests=args.max_requests,
        target=args.target,
        keep_refused_at_least=args.keep_refused_at_least,
        seeds=args.seeds,
        progress=not args.quiet,
    )
    try:
        result = build(opts)
    except Outage as e:
        print(f"t2i-eval: outage: {e}", file=sys.stderr)
        return 1
    s = result.card["suite"]
    short = result.card["short_of_target"]
    print(
        f"wrote {result.suite}: {s['n_prompts']} prompts ({s['n_benign']} benign, {s['n_unsafe']} unsafe, "
        f"{s['n_pairs']} pairs); card {result.suite.with_suffix('.card.md')}; "
        f"{result.asked} new model/system answer(s)"
        + (
            f"; short of target: {', '.join(f'{k} by {n}' for k, n in short.items())}"
            if short
            else ""
        )
    )
    return 0
