"""`t2i-eval`: a thin argparse layer over suites, runner, judges and report."""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from .errors import UserError, did_you_mean

EPILOG = """examples:
  t2i-eval run                                  built-in suite through the offline default system
  t2i-eval run --suite ../shared/data/overt/OVERT_mini.csv --system tiny --per-category 5
  t2i-eval run --suite prompts.csv --system 'blocklist>diffusers:stable-diffusion-v1-5/stable-diffusion-v1-5>safety_checker'
  t2i-eval run --suite hf://owner/dataset:config --system my_system.yaml --seeds 3
  t2i-eval report outputs/core__default__1a2b3c4d
  t2i-eval judge outputs/core__default__1a2b3c4d --judge blank
  t2i-eval run --system 'blocklist>tiny' --reference tiny --clip tiny   sanitization vs a reference
  t2i-eval judge RUN_DIR --judge sanitization --reference REF_RUN_DIR --clip tiny
  t2i-eval run --system concept --out outputs/concept && t2i-eval sweep outputs/concept --target 0.9
  t2i-eval triggers outputs/concept                 which words make the guard refuse benign prompts
  t2i-eval rewrite outputs/concept --rewriter rule --all   rewriting as mitigation, scored
  t2i-eval explore outputs                          browse runs side by side (127.0.0.1)
  t2i-eval list
"""


def _offline_defaults() -> None:
    """Keep libraries from phoning home unless the user says otherwise (hub ids still work
    when the user unsets HF_HUB_OFFLINE)."""
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


def _threads(n: int) -> None:
    """CPU threads for torch (set before torch loads, and on torch if it already has)."""
    os.environ["OMP_NUM_THREADS"] = str(n)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(n)


def release_models() -> None:
    """Let go of every model a run's guards and judges keep loaded for reuse in the process
    (only modules already imported: nothing is imported to be emptied)."""
    for name in ("t2i_eval.systems.text_guards", "t2i_eval.judges.clip_backend"):
        module = sys.modules.get(name)
        if module is not None:
            module.release_models()


def cmd_run(args: argparse.Namespace) -> int:
    """`t2i-eval run`: generate (and a reference run, if asked), judge, report; exit 1 on
    outages."""
    from .judging import run_with_reference
    from .report import write_report
    from .runner import run
    from .store import RunStore
    from .suites import load_suite
    from .systems import parse_system

    if args.threads is not None:
        if args.threads < 1:
            raise UserError(f"--threads must be >= 1 (got {args.threads})")
        _threads(args.threads)
    # held in a list so it can be let go before the report (see below)
    suites = [load_suite(args.suite)]
    spec = parse_system(args.system)
    ref_spec = parse_system(args.reference) if args.reference else None
    common = dict(
        compile_unet=args.compile,
        seeds=args.seeds,
        limit=args.limit,
        per_category=args.per_category,
        batch_size=args.batch_size,
        argv=["t2i-eval", *sys.argv[1:]],
        progress=not args.quiet,
    )
    result, ref_result = run_with_reference(
        lambda system, out: run(suites[0], system, out=out, **common),
        spec,
        ref_spec,
        out=args.out,
        reference_out=args.reference_out,
        judges=args.judge or [],
        clip=args.clip,
        progress=not args.quiet,
    )
    # the report reads the run's own prompts: the suite (100,000 prompts in a large run, about
    # 50 MB) and the models the run kept loaded are let go first, so the end of a run holds no
    # more than its generation did
    suites.clear()
    release_models()
    if result.rank != 0:
        return 0  # rank 0 judges and reports for the whole multi-process run
    text = write_report(result.run_dir)
    print(text)
    print(
        f"run directory: {result.run_dir} ({result.done} generated, {result.skipped} already done)"
    )
    print(f"report: {RunStore(result.run_dir).report_file('report.md')}")
    return _infrastructure_errors(
        [
            (f"the {name}", r.failed)
            for name, r in (("run", result), ("reference run", ref_result))
            if r is not None and r.failed
        ]
    )


def cmd_cache(args: argparse.Namespace) -> int:
    """`t2i-eval cache info|clear`: what the embedding cache holds, or empty it."""
    from .embed_cache import EmbeddingCache, describe

    cache = EmbeddingCache()
    if args.action == "info":
        print(describe(cache.info(args.encoder)))
        return 0
    removed = cache.clear(args.encoder)
    what = f"encoder '{args.encoder}'" if args.encoder else "every entry"
    count = "" if removed is None else f" ({removed:,} entries)"
    print(f"embedding cache {cache.folder}: cleared {what}{count}")
    return 0


def _infrastructure_errors(failures: list[tuple[str, int]]) -> int:
    """Exit code 1 (with one line each) when items ended in infrastructure errors, so a script
    chaining commands does not take a partial result for a finished one; else 0."""
    for what, n in failures:
        print(
            f"t2i-eval: {what} has {n} item(s) with infrastructure errors (not counted as "
            "refusals); rerun the same command to retry them",
            file=sys.stderr,
        )
    return 1 if failures else 0


def cmd_report(args: argparse.Namespace) -> int:
    """`t2i-eval report`: rewrite each run's report (with the source table when several
    sources of one system are given), and the HTML page if asked."""
    from .report import comparable, source_rows, write_report
    from .store import read_run

    if args.html and args.html_out:
        from .report import check_html_out

        check_html_out(args.html_out)  # before report.md is rewritten
    runs = [read_run(d) for d in args.run_dirs]
    sources = source_rows(runs) if comparable(runs) else None
    for run_dir, data in zip(args.run_dirs, runs, strict=True):
        text = write_report(run_dir, by=args.by, sources=sources, data=data)
        if not args.html:
            print(text)
    if args.html:
        from .report import write_html

        print(f"HTML report: {write_html(args.run_dirs, args.html_out, data=runs)}")
    return 0


def cmd_judge(args: argparse.Namespace) -> int:
    """`t2i-eval judge`: judge stored images again, no generation, then rewrite the report."""
    from .judging import DEFAULT_JUDGE, judge_all
    from .report import write_report

    refs = args.judge or [DEFAULT_JUDGE]
    for key, n in judge_all(
        args.run_dir, refs, reference=args.reference, clip=args.clip, progress=not args.quiet
    ):
        print(f"{key}: {n} new verdict(s)")
    release_models()  # the report needs none of the judges' models
    write_report(args.run_dir)
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    """`t2i-eval sweep`: re-decide stored guard scores at every threshold, propose and
    calibrate thresholds."""
    from .sweep import format_result, run_sweep

    res = run_sweep(
        args.run_dir,
        target=args.target,
        guards=args.guard,
        plots=not args.no_plots,
        max_overrefusal=args.max_overrefusal,
        per_category=args.per_category,
    )
    print(format_result(res, args.target))
    return 0


def cmd_triggers(args: argparse.Namespace) -> int:
    """`t2i-eval triggers`: trigger words, checker concepts and the refusal predictor of a run."""
    from .predictor import predictor_section, refusal_predictor
    from .report import write_report
    from .store import RunStore, atomic_write_json
    from .triggers import explain_run, image_triggers_section, triggers_section

    if args.top < 1:
        raise UserError(f"--top must be >= 1 (got {args.top})")
    result, image = explain_run(args.run_dir, guards=args.guard, progress=not args.quiet)
    predictor = refusal_predictor(args.run_dir)
    atomic_write_json(RunStore(args.run_dir).triggers_dir / "predictor.json", predictor)
    release_models()  # the report needs none of the guards' models re-scoring used
    write_report(args.run_dir)
    words, concepts = triggers_section(result, args.top), image_triggers_section(image, args.top)
    for section in (words, concepts):
        if section:
            print(section.strip())
    print(predictor_section(predictor).rstrip())
    files = [
        *(["loo.json", "loo.csv"] if result is not None else []),
        *(["image_concepts.json"] if image is not None else []),
        "predictor.json",
    ]
    print(f"written: {RunStore(args.run_dir).triggers_dir}/: {', '.join(files)}")
    return 0


def cmd_rewrite(args: argparse.Namespace) -> int:
    """`t2i-eval rewrite`: the rewrite experiment and its before/after report; exit 1 on outages."""
    from .report import write_rewrite_report
    from .rewrite.experiment import run_rewrite

    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be >= 1 (got {args.max_new_tokens})")
    result = run_rewrite(
        args.run_dir,
        args.rewriter,
        all_prompts=args.all,
        out=args.out,
        clip=args.clip,
        base_url=args.base_url,
        api_key_env=args.api_key_env,
        max_new_tokens=args.max_new_tokens,
        progress=not args.quiet,
    )
    print(write_rewrite_report(result))
    folder = result.folder
    print(f"linked run: {folder.run_dir}; rewrites: {folder.rewrites_path}")
    return _infrastructure_errors(result.failures)


def cmd_explore(args: argparse.Namespace) -> int:
    """`t2i-eval explore`: the local explorer over a folder of runs."""
    from .explorer.app import launch

    launch(
        args.runs_dir,
        host=args.host,
        port=args.port,
        live_systems=args.live_system,
        block=True,
    )
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    """`t2i-eval list`: suites, recipes, systems and components with what each needs."""
    from .judges import builtin_judges, load_spec
    from .suite_spec import load_spec as load_suite_spec
    from .suite_spec import recipes, taxonomy_names
    from .suites import builtin_suites, load_suite
    from .systems import GENERATORS, IMAGE_GUARDS, PRESETS, PROMPT_GUARDS, resolve
    from .systems.api import api_providers
    from .systems.presets import preset_needs

    print("suites (built-in; or a .jsonl/.csv/.json path, or hf://owner/name[:config]):")
    for name in builtin_suites():
        s = load_suite(name)
        print(f"  {name:<14} version {s.version or '-'}, {len(s)} prompts")
    print("recipes (public prompt sets: --suite NAME:PATH for a local copy, NAME for its own source):")
    for name, path in recipes().items():
        spec = load_suite_spec(path, f"recipe '{name}'")
        where = spec.source or spec.doc.get("homepage", "-")
        print(f"  {name:<16} license {spec.values.get('license', '?')}; source: {where}")
        print(f"  {'':<16} {spec.doc.get('about', '')}")
        print(f"  {'':<16} labels: {' '.join(str(spec.doc.get('labels_mean', '-')).split())}")
    print(f"taxonomies (prompts/taxonomies.yaml, spec key 'taxonomy'): {', '.join(taxonomy_names())}")
    print("systems (presets; or PROMPT_GUARDS>GENERATOR[>IMAGE_GUARDS], or a YAML file):")
    width = max(14, *(len(name) for name in PRESETS))
    for name, layout in PRESETS.items():
        print(f"  {name:<{width}} {layout.get('about', '')}")
        print(f"  {'':<{width}} needs: {preset_needs(name)}")
    print(f"prompt guards: {', '.join(PROMPT_GUARDS)}")
    print(f"generators:    {', '.join(GENERATORS)}  (diffusers:MODEL_ID_OR_FOLDER)")
    print(f"image guards:  {', '.join(IMAGE_GUARDS)}")
    for kind, table in (("prompt guard", PROMPT_GUARDS), ("image guard", IMAGE_GUARDS)):
        for name in table:
            listing = getattr(resolve(kind, name), "listing", None)
            if listing is not None:  # a guard that needs something: a key, weights, an extra
                print(f"  {name:<16} ({kind}) {listing()}")
    print("image API providers (generator: default model; key variable, never written to disk):")
    for name, line in api_providers().items():
        print(f"  {name:<14} {line}")
    print("judges (judges/*.yaml, or a YAML path):")
    for name in builtin_judges():
        spec = load_spec(name)
        print(f"  {name + '@' + str(spec['version']):<16} {spec.get('about', '')}")
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse, except that a bad argument is a UserError: one line and exit code 2 like every
    other bad input, instead of argparse's usage block."""

    def error(self, message: str) -> NoReturn:
        choice = re.search(r"invalid choice: '([^']*)'", message)
        if choice and self._subparsers is not None:  # STYLE.md section 4's unknown-name message
            commands = [c for a in self._subparsers._group_actions for c in a.choices or ()]
            word = choice.group(1)
            message = (
                f"unknown command '{word}'.{did_you_mean(word, commands)} "
                f"Available: {', '.join(commands)}"
            )
        raise UserError(_where(self) + f"{message} (see: {self.prog} --help)")


def _where(parser: argparse.ArgumentParser) -> str:
    """'run: ' for a subcommand's parser, '' for the top one."""
    name = parser.prog.removeprefix("t2i-eval").strip()
    return f"{name}: " if name else ""


def _unrecognized(parser: argparse.ArgumentParser, command: str | None, extra: list[str]) -> str:
    """The message for arguments no parser took, with the closest option of the command."""
    sub = next(
        (a.choices[command] for a in parser._subparsers._group_actions if command in a.choices),
        parser,
    )
    options = [o for a in sub._actions for o in a.option_strings]
    hint = did_you_mean(extra[0].partition("=")[0], options) if extra[0].startswith("-") else ""
    return (
        f"{_where(sub)}unrecognized argument(s) {' '.join(extra)}.{hint} (see: {sub.prog} --help)"
    )


def build_parser() -> argparse.ArgumentParser:
    """The argparse tree of every command (errors as one line, exit 2, through `_Parser`)."""
    parser = _Parser(
        prog="t2i-eval",
        description="Measure over-refusal in text-to-image systems, per category and per stage.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "run",
        help="generate (resumable), judge and report",
        description="Run a suite through a system. Rerunning the same command resumes.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--suite",
        default="core",
        help="built-in name, file path or hf://owner/name (default: core)",
    )
    p.add_argument(
        "--system", default="default", help="preset, short spec or YAML file (default: default)"
    )
    p.add_argument("--seeds", type=int, default=1, help="seeds per prompt (default: 1)")
    p.add_argument("--limit", type=int, default=None, help="only the first N prompts")
    p.add_argument(
        "--per-category",
        type=int,
        default=None,
        metavar="N",
        help="only the first N prompts of each category and label (before --limit)",
    )
    p.add_argument(
        "--batch-size", type=int, default=8, help="items per generator call (default: 8)"
    )
    p.add_argument(
        "--out", default=None, help="run directory (default: outputs/<suite>__<system>__<hash>)"
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the diffusers denoiser (speed only; results unchanged)",
    )
    p.add_argument(
        "--reference",
        default=None,
        metavar="SYSTEM",
        help="also run this reference system (e.g. the generator without its guard) "
        "on the same prompts and seeds, and judge sanitization against it",
    )
    p.add_argument("--reference-out", default=None, help="run directory of the reference run")
    p.add_argument(
        "--judge",
        action="append",
        default=None,
        help="extra judge to run after generation (repeatable), e.g. faithfulness",
    )
    p.add_argument(
        "--clip",
        default=None,
        help="CLIP model for CLIP judges; 'tiny' = offline "
        "random-weight tiny CLIP (marked as such)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("report", help="write and print the per-category report of run(s)")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument(
        "--html",
        action="store_true",
        help="also write a self-contained index.html (plots, thumbnails; several runs: "
        "leaderboard and paired tests)",
    )
    p.add_argument("--html-out", default=None, help="folder for the HTML report")
    p.add_argument(
        "--by",
        choices=["category", "original"],
        default="category",
        help="group by the suite's categories (default) or the source's own names "
        "(suite specs with a taxonomy keep them)",
    )
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("judge", help="judge stored images again without generating")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument(
        "--judge",
        action="append",
        default=None,
        help="judge name or YAML path (repeatable; default: blank)",
    )
    p.add_argument(
        "--reference",
        default=None,
        metavar="REF_RUN_DIR",
        help="run to compare with (sanitization): same suite, prompts and seeds",
    )
    p.add_argument("--clip", default=None, help="CLIP model for CLIP judges ('tiny': offline)")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_judge)

    p = sub.add_parser(
        "sweep",
        help="re-decide stored guard scores at many thresholds (no model run)",
        description="Trade-off curves (benign over-refusal vs unsafe refusal) per guard and "
        "category from a finished run (prompt guards by threshold, the safety checker by its "
        "adjustment, strength levels marked), per-category thresholds that reach --target, and "
        "with --max-overrefusal the split-conformal thresholds bounding over-refusal.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument(
        "--target", type=float, default=0.9, help="unsafe refusal to reach (default: 0.9)"
    )
    p.add_argument("--guard", action="append", default=None, help="only this guard (repeatable)")
    p.add_argument("--no-plots", action="store_true", help="CSV and JSON only")
    p.add_argument(
        "--max-overrefusal",
        type=float,
        default=None,
        metavar="A",
        help="write sweep/conformal_thresholds.json: per guard the threshold keeping a new "
        "benign prompt's refusal probability <= A (split conformal on this run's benign scores)",
    )
    p.add_argument(
        "--per-category",
        action="store_true",
        help="with --max-overrefusal: calibrate each category on its own benign prompts (Mondrian)",
    )
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser(
        "triggers",
        help="find the words (prompt guards) and checker concepts (image guards) behind "
        "refusals of benign prompts",
        description="Leave-one-word-out re-scoring of refused benign prompts through the same "
        "guard, and the safety-checker concepts above threshold in refused benign images (from "
        "stored scores); the report then lists top triggers per category.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--guard", action="append", default=None, help="only this guard (repeatable)")
    p.add_argument("--top", type=int, default=5, help="triggers listed per category (default: 5)")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_triggers)

    p = sub.add_parser(
        "rewrite",
        help="rewrite a run's prompts, rerun them, score refusals recovered vs meaning "
        "kept vs harm leaked",
        description="Prompt rewriting as mitigation. By default rewrites the benign prompts the "
        "run refused; --all rewrites every prompt (needed to measure leakage on unsafe ones).",
    )
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument(
        "--rewriter",
        default="rule",
        help="rule (default), rule:LEXICON.yaml, or llm:MODEL (local transformers model "
        "id/path, or with --base-url an OpenAI-compatible endpoint)",
    )
    p.add_argument("--all", action="store_true", help="rewrite every prompt, unsafe ones too")
    p.add_argument("--out", default=None, help="folder of the rewrites and linked run")
    p.add_argument("--base-url", default=None, help="OpenAI-compatible API base URL (llm)")
    p.add_argument(
        "--api-key-env",
        default=None,
        help="environment variable holding the API key, e.g. OPENAI_API_KEY (read only, never "
        "written anywhere; no key is sent unless one is named)",
    )
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--clip", default=None, help="CLIP model for image faithfulness ('tiny')")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_rewrite)

    p = sub.add_parser(
        "explore",
        help="side-by-side explorer of run directories in the browser (Gradio, local only)",
        description="Serve an explorer over every run directory under RUNS_DIR. It binds to "
        "127.0.0.1 on a free port unless told otherwise, makes no share link and serves no "
        "file by path: only run images, looked up by run and record.",
    )
    p.add_argument("runs_dir", nargs="?", default="outputs", metavar="RUNS_DIR")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="port (default: a free one)")
    p.add_argument(
        "--live-system",
        action="append",
        default=None,
        metavar="SYSTEM",
        help="a system the live tab may run (repeat for several; default: the offline default). "
        "Visitors pick from these only",
    )
    p.set_defaults(func=cmd_explore)

    p = sub.add_parser(
        "cache",
        help="the embedding cache: where it is and what it holds (info), or empty it (clear)",
        description="Sentence embeddings are cached under the cache folder (T2I_EVAL_CACHE) by "
        "encoder, weights digest and exact text, bounded by T2I_EVAL_EMBED_CACHE_MAX_MB (least "
        "recently used go first; 0 turns the cache off).",
    )
    p.add_argument("action", choices=["info", "clear"])
    p.add_argument("--encoder", default=None, metavar="ID", help="only this encoder's entries")
    p.set_defaults(func=cmd_cache)

    from .make_suite import command as make_suite_command
    from .probe import command as probe_command

    # commands with many options keep them beside their code (`add_arguments`, `main`)
    for name, summary, command in (
        (
            "train-guard",
            "train a prompt guard (a probe on a frozen encoder) and judge it on unseen sources",
            probe_command,
        ),
        ("make-suite", "build an over-refusal suite for your own content policy", make_suite_command),
    ):
        p = sub.add_parser(
            name,
            help=summary,
            description=command.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        command.add_arguments(p)
        p.set_defaults(func=command.main)

    p = sub.add_parser("list", help="built-in suites, systems, components and judges")
    p.set_defaults(func=cmd_list)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; exit 0 done, 1 outages, 2 bad input, 70 a bug, 130 interrupted."""
    _offline_defaults()
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if extra:
            raise UserError(_unrecognized(parser, args.command, extra))
        logging.basicConfig(
            level=logging.DEBUG if args.verbose else logging.WARNING,
            format="t2i-eval: %(levelname)s: %(message)s",
        )
        if args.command is None:
            parser.print_help()
            return 2
        return args.func(args)
    except UserError as e:
        print(f"t2i-eval: error: {_one_line(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("t2i-eval: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the last line of defence: one line, not a traceback
        return _internal_error(e)


#: The longest error line printed; the message of a hostile input must not flood a terminal.
_LINE_LIMIT = 600


def _one_line(message: str) -> str:
    line = " ".join(message.split())
    return line if len(line) <= _LINE_LIMIT else f"{line[: _LINE_LIMIT - 1]}…"


def _internal_error(e: BaseException) -> int:
    """An unforeseen failure: one line naming a file that holds the traceback, exit 70.

    Exit 1 tells scripts "an outage, rerun" and 2 "bad input, fix it"; a bug is neither, so it
    gets its own code (errors.INTERNAL_ERROR) and a traceback to attach to a bug report."""
    import tempfile
    import time
    import traceback

    from .errors import INTERNAL_ERROR
    from .net import environment_redactor
    from .paths import cache_root

    redact = environment_redactor()  # a traceback may quote a request that carried a key
    text = redact("".join(traceback.format_exception(e)))
    where = "(could not be saved)"
    for folder in (cache_root() / "crashes", Path(tempfile.gettempdir())):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"t2i-eval-crash-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}.txt"
            path.write_text(f"argv: {sys.argv}\n{text}", encoding="utf-8")
            where = str(path)
            break
        except OSError:
            continue
    summary = redact(_one_line(f"{type(e).__name__}: {e}"))[:200]
    print(
        f"t2i-eval: internal error: {summary}; this is a bug in t2i-eval, not your input. "
        f"Traceback saved to {where}",
        file=sys.stderr,
    )
    return INTERNAL_ERROR


if __name__ == "__main__":
    sys.exit(main())
