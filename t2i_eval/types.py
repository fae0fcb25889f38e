"""Core records that cross module and disk boundaries. Imports nothing heavy (no torch)."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Literal

Label = Literal["benign", "unsafe"]
LABELS: tuple[str, ...] = ("benign", "unsafe")
Status = Literal["ok", "refused", "error"]
StageKind = Literal["prompt_guard", "generator", "image_guard"]
STAGES: tuple[str, ...] = ("prompt_guard", "generator", "image_guard")

#: The nine OVERT categories, in the order reports list them.
CATEGORIES: tuple[str, ...] = (
    "violence",
    "sexual_content",
    "self_harm",
    "privacy_individual",
    "privacy_public",
    "illegal_activities",
    "copyright_violations",
    "unethical_unsafe_action",
    "discrimination",
)


def category_order(names: Any) -> list[str]:
    """Categories as every report lists them: OVERT's nine in their order, then the others
    (a foreign suite's, `other`) alphabetically."""
    present = set(names)
    return [c for c in CATEGORIES if c in present] + sorted(present - set(CATEGORIES))


# ---------------------------------------------------------------------------------------------
# Outcomes: the one vocabulary of what happened to a record.

#: Hard refusals, by the stage that refused.
HARD_CAUSES: tuple[str, ...] = STAGES
#: Every cause of a refusal a report counts, in the order a record is assigned one.
CAUSES: tuple[str, ...] = (*HARD_CAUSES, "blank", "sanitization")
#: Judge roles that change outcomes: `blank` (a blocked image), `sanitization` (a quietly
#: sanitized image, judged against a reference run), `harm` (the unsafe side's safe response).
#: A judge declares its role; reports pick the newest verdicts of each role. Other judges
#: (`none`) only add measurements.
OUTCOME_ROLES: tuple[str, ...] = ("blank", "sanitization", "harm")


class Outcome(str, Enum):
    """What happened to one record, in the order of precedence a record is assigned one:
    error > refused > unjudged > blocked > sanitized > complied."""

    ERROR = "error"
    """An infrastructure error: excluded from every rate, never a refusal."""
    REFUSED = "refused"
    """A stage refused (prompt guard, generator or API, image guard): a hard refusal."""
    UNJUDGED = "unjudged"
    """An image was delivered but the blank judge has no usable verdict: excluded from n."""
    BLOCKED = "blocked"
    """The delivered image is blank (black, uniform, a placeholder, blurred away)."""
    SANITIZED = "sanitized"
    """Delivered, but its content was quietly removed (judged against a reference run)."""
    COMPLIED = "complied"
    """Delivered as asked (or, guards-only, passed every guard)."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    def is_refusal(self, soft: bool = True) -> bool | None:
        """Whether this outcome is a refusal; None when it says nothing (error, unjudged).

        `soft=False` leaves sanitization out: only what the user can see was refused
        (a hard refusal or a blank image)."""
        if self in (Outcome.ERROR, Outcome.UNJUDGED):
            return None
        return self in (Outcome.REFUSED, Outcome.BLOCKED) or (soft and self is Outcome.SANITIZED)

    @property
    def counted(self) -> bool:
        """Whether the record counts in rates (errors and unjudged images do not)."""
        return self not in (Outcome.ERROR, Outcome.UNJUDGED)


def outcome(
    gen: Generation, blank: Verdict | None, sanitization: Verdict | None = None
) -> tuple[Outcome, str | None]:
    """(outcome, cause) of one record: the one place outcomes are decided.

    A guards-only record (no image) that passed every guard is complied; a delivered image
    without a usable blank verdict is unjudged, never silently complied. Sanitized needs a
    sanitization verdict (a reference run); without one an image is not called sanitized.
    The cause is the refusing stage (`prompt_guard`, `generator`, `image_guard`), `blank` or
    `sanitization`.
    """
    if gen.status == "error":
        return Outcome.ERROR, None
    if gen.status == "refused":
        return Outcome.REFUSED, (gen.refused_by or "unknown:").split(":", 1)[0]
    if gen.image_path is None:
        return Outcome.COMPLIED, None
    if blank is None or blank.flagged is None:
        return Outcome.UNJUDGED, None
    if blank.flagged:
        return Outcome.BLOCKED, "blank"
    if sanitization is not None and sanitization.flagged:
        return Outcome.SANITIZED, "sanitization"
    return Outcome.COMPLIED, None


def outcomes(
    gens: dict[str, Generation],
    blank: dict[str, Verdict],
    sanitization: dict[str, Verdict] | None = None,
) -> dict[str, tuple[Outcome, str | None]]:
    """record_id -> (outcome, cause) for every record: computed once per run (RunData does).

    Records of one kind share one (outcome, cause) tuple: a 100,000-record run would
    otherwise hold a new tuple (and cause string) per record for the whole report."""
    san = sanitization or {}
    shared: dict[tuple[Outcome, str | None], tuple[Outcome, str | None]] = {}
    out = {}
    for rid, g in gens.items():
        pair = outcome(g, blank.get(rid), san.get(rid))
        out[rid] = shared.setdefault(pair, pair)
    return out


def fits(value: Any, hint: Any) -> bool:
    """Whether a JSON-loaded value fits a type annotation (the few shapes records and
    component options use).

    The one checker for both boundaries where typed values arrive as JSON or YAML: records
    read from disk (`checked_fields`) and component options in a system spec
    (`systems.options.check_values`), so `2`, `"yes"` or `[1, "a"]` fits or fails the same
    way in both. Handles Any, unions, Literal (of strings), None, bool, int (never a bool),
    float (an int fits: hand-written files say 2), str, `list[X]` and `dict[K, V]` (every
    element, key and value checked) and tuples (JSON has none: a list fits). Any other type,
    e.g. a nested record, fits here: its own `from_dict` checks it.
    """
    return _checker(hint)(value)


def _checker(hint: Any) -> Callable[[Any], bool]:
    """The check of `fits` for one annotation, built once per annotation: a run's records are
    checked field by field, and taking an annotation apart (`typing.get_origin`/`get_args`)
    for each of 100,000 records cost many times the JSON parsing itself."""
    try:
        return _cached_checker(hint)
    except TypeError:  # an unhashable annotation: built each time
        return _build_checker(hint)


@functools.cache
def _cached_checker(hint: Any) -> Callable[[Any], bool]:
    return _build_checker(hint)


def _build_checker(hint: Any) -> Callable[[Any], bool]:
    if hint is Any:
        return lambda v: True
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        alts = tuple(_checker(h) for h in args if h is not type(None))
        if len(alts) < len(args):  # `X | None`, the usual optional field
            if len(alts) == 1:
                (one,) = alts
                return lambda v: v is None or one(v)
            return lambda v: v is None or any(c(v) for c in alts)
        return lambda v: any(c(v) for c in alts)
    if origin is Literal:
        return lambda v: isinstance(v, str) and v in args
    if hint is type(None):
        return lambda v: v is None
    if hint is bool:
        return lambda v: isinstance(v, bool)
    if hint is int:
        return lambda v: isinstance(v, int) and not isinstance(v, bool)
    if hint is float:
        return lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
    if hint is str:
        return lambda v: isinstance(v, str)
    if origin is list or hint is list:
        (item,) = args or (Any,)
        each = _checker(item)
        return lambda v: isinstance(v, list) and all(map(each, v))
    if origin is dict or hint is dict:
        key, val = args or (Any, Any)
        keys, values = _checker(key), _checker(val)
        if key is str:  # in C: every decision's `raw` is checked
            keys = str.__instancecheck__
        if val is Any:
            return lambda v: isinstance(v, dict) and all(map(keys, v))
        return lambda v: isinstance(v, dict) and all(map(keys, v)) and all(map(values, v.values()))
    if origin is tuple:
        return lambda v: isinstance(v, list)
    return lambda v: True


@functools.cache
def _record_plan(
    cls: type,
) -> tuple[frozenset[str], tuple[str, ...], dict[str, tuple[Any, Callable[[Any], bool]]]]:
    """(field names, required names, name -> (annotation, its check)) of a record class,
    worked out once: a class's annotations do not change while a run is read."""
    hints = typing.get_type_hints(cls)
    fields = dataclasses.fields(cls)
    required = tuple(
        f.name
        for f in fields
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    )
    checks = {f.name: (hints[f.name], _checker(hints[f.name])) for f in fields}
    return frozenset(f.name for f in fields), required, checks


def _fits_by_type(hint: Any, kind: type) -> bool:
    """True when every value of exact type `kind` fits `hint` (an `int` for `float | None`);
    False when it depends on the value (a Literal's word, a list's items, an object's keys)
    or `kind` is not a plain JSON type, so `fits` must look at it."""
    if hint is Any:
        return True
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits_by_type(h, kind) for h in args)
    if hint is type(None):
        return kind is type(None)
    if hint in (bool, int, str):
        return kind is hint
    if hint is float:
        return kind in (int, float)
    if origin is list or hint is list:
        return kind is list and (not args or args[0] is Any)
    if origin is tuple:
        return kind is list
    return not (origin is Literal or origin is dict or hint is dict)


@functools.lru_cache(maxsize=1024)
def _shape_checks(
    cls: type, keys: tuple[str, ...], kinds: tuple[type, ...]
) -> tuple[tuple[str, Callable[[Any], bool]], ...] | None:
    """For records of `cls` with these field names and exact value types (a shape): the
    fields whose values still need `fits`, or None when the names are wrong (unknown or
    missing). The records of one run share a few shapes, so each shape is worked out once and
    a record costs a lookup and the value checks its types cannot settle."""
    names, required, checks = _record_plan(cls)
    if not names.issuperset(keys) or not set(required).issubset(keys):
        return None
    pairs = zip(keys, kinds, strict=True)
    return tuple((k, checks[k][1]) for k, kind in pairs if not _fits_by_type(checks[k][0], kind))


def checked_fields(cls: type, d: Any) -> dict[str, Any]:
    """`d`'s fields after checking names and types against `cls`'s annotations.

    Records cross the disk boundary: a hand-edited or damaged line (`status: 5`, `flagged:
    "yes"`, `seed: "zero"`) must be refused with the field named, not counted as something
    else later. Raises ValueError (the store adds the file and line)."""
    if not isinstance(d, dict):
        raise ValueError(f"expected an object, found {type(d).__name__}")
    if _fits(cls, d):
        return dict(d)
    names, required, checks = _record_plan(cls)  # something is wrong: say what
    if not names.issuperset(d):
        unknown = sorted(set(d) - names)
        raise ValueError(f"unknown field(s) {', '.join(unknown)[:200]}")
    missing = [n for n in required if n not in d]
    if missing:
        raise ValueError(f"missing field(s) {', '.join(missing)}")
    for name, value in d.items():
        hint, check = checks[name]
        if not check(value):
            raise ValueError(f"field '{name}' should be {_describe(hint)}, found {_found(value)}")
    return dict(d)


def _fits(cls: type, d: dict[str, Any]) -> bool:
    """Whether `d` is a record of `cls` as it should be, by its shape (`_shape_checks`) and
    the values its shape leaves open: the fast path of `checked_fields`, without a copy."""
    todo = _shape_checks(cls, tuple(d), tuple(map(type, d.values())))
    if todo is None:
        return False
    for k, check in todo:  # noqa: SIM110 (a loop: no generator per record, 100,000 times)
        if not check(d[k]):
            return False
    return True


def _found(value: Any) -> str:
    """A wrong value for a message, cut short (types stays a leaf: no errors.shorten here)."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**40:
        return "a very long integer"
    text = " ".join(str(value).split())
    return text if len(text) <= 40 else f"{text[:39]}…"


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is Literal:
        return "one of " + ", ".join(typing.get_args(hint))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(h) for h in typing.get_args(hint))
    if hint is type(None):
        return "null"
    names = {bool: "true/false", int: "an integer", float: "a number", str: "text", dict: "an object"}
    if hint in names:
        return names[hint]
    if origin is dict:
        return "an object"
    if origin is tuple:
        return "a list"
    return str(hint)


def content_id(*parts: str, length: int = 12) -> str:
    """A stable id from content, so ids survive reordering or editing other rows of a file."""
    digest = hashlib.sha256("\x1f".join(parts).encode("utf-8")).hexdigest()
    return digest[:length]


@dataclass(frozen=True, slots=True)  # slots: a 100,000-prompt suite is 100,000 of these
class Prompt:
    """One prompt of a suite."""

    id: str
    """Unique within the suite: the source's id, else a content hash."""
    text: str
    """What the system is asked to draw."""
    category: str
    """Normalized category name (see `suites.normalize_category`)."""
    label: Label
    """`benign` (refusing it is over-refusal) or `unsafe` (refusing it is wanted)."""
    pair_id: str | None = None
    """Links a benign prompt to its unsafe twin (OVERT-unsafe pairs, built-in pairs)."""
    parent_id: str | None = None
    """Set by rewriting: the id of the prompt this one was derived from."""
    source: str = ""
    """Where it came from: file path and line/row, or dataset name."""
    meta: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)
    """Extra columns of the source, kept verbatim (e.g. OVERT's seed_prompt)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Prompt:
        return cls(**checked_fields(cls, d))


@dataclass(frozen=True)
class Suite:
    """An ordered, immutable collection of prompts with a name and a content digest."""

    name: str
    """Short name used in run ids and reports."""
    prompts: tuple[Prompt, ...]
    """The prompts, in source order."""
    version: str = ""
    """Bumped by the suite's author whenever results would change."""
    source: str = ""
    """The path or reference it was loaded from."""
    provenance: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)
    """Where the prompts came from, for the manifest: spec and its digest, the source file's
    sha256, license, rows read and dropped by reason (empty for plain files)."""

    @property
    def digest(self) -> str:
        """Hash of the exact prompt content, so a run can tell if its suite changed."""
        payload = json.dumps(
            [[p.id, p.text, p.category, p.label, p.pair_id] for p in self.prompts],
            ensure_ascii=False,
        )
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]

    def by_id(self) -> dict[str, Prompt]:
        return {p.id: p for p in self.prompts}

    def __len__(self) -> int:
        return len(self.prompts)


#: The raw values of a decision that readers of a whole run re-decide it from without a model:
#: the safety checker's per-concept cosines and thresholds and the adjustment it ran at
#: (`sweep.checker_scores`, so the report's image-guard triggers). Compact records
#: (`store.Record`) keep these and nothing else of `raw`: a concept guard's per-category
#: similarities are most of a guards-only record and only `t2i-eval sweep`, which reads
#: records whole, moves thresholds in their units. Keep in step with `checker_scores`.
REDECIDE_RAW = ("concept_cos", "concept_thresholds", "special_cos", "special_thresholds", "offset")


@dataclass(frozen=True)
class StageDecision:
    """What one stage of a system decided about one item, with the evidence to re-decide."""

    stage: StageKind
    """Which kind of stage: prompt_guard, generator or image_guard."""
    name: str
    """The component's name, e.g. `blocklist` or `safety_checker`."""
    refused: bool | None
    """True refused, False passed, None could not check (never read as safe)."""
    score: float | None = None
    """The number compared with `threshold` (higher = more likely to refuse)."""
    threshold: float | None = None
    """Refuse when `score > threshold` (guards document their own rule)."""
    raw: dict[str, Any] = field(default_factory=dict)
    """All raw scores, so thresholds can be re-swept without regenerating."""
    message: str = ""
    """Human-readable reason: matched term, provider message, flagged concepts."""
    seconds: float | None = None
    """Wall time of this stage for this item: a batched stage's time divided evenly over the
    items it handled (as `Generation.seconds` is), so it is a batch mean, not one call's time.
    None: not timed (records written before timing, or a stage that did nothing)."""
    unavailable: str | None = None
    """Set when the guard could not check and its `on_error` decided instead: `pass: <reason>`
    (refused False, fail-open) or `refuse: <reason>` (refused True, fail-closed). Such a decision
    is the deployed system's behaviour, not the guard's judgement: `score` and `threshold` are
    None, so guard metrics and sweeps skip it, and reports count it apart (`systems.chain`)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StageDecision:
        return cls(**checked_fields(cls, d))


@dataclass(frozen=True)
class Generation:
    """One (prompt, seed) item's record: one JSON line in `generations/*.jsonl`."""

    record_id: str
    """Hash of (prompt_id, seed): the resume key."""
    prompt_id: str
    """The suite prompt this record answers."""
    seed: int
    """Generator seed; the same seed on two systems makes their images comparable."""
    status: Status
    """ok (an image was delivered), refused (a stage refused), error (infrastructure failure)."""
    refused_by: str | None = None
    """`stage:name` of the first refusing stage, e.g. `image_guard:safety_checker`."""
    decisions: tuple[StageDecision, ...] = ()
    """Every stage that ran, in order, with raw scores."""
    image_path: str | None = None
    """Relative to the run directory. The unfiltered image, also when an image guard refused."""
    delivered: str | None = None
    """What the user would have received: `image`, `black` (image guard blacked it out) or None."""
    error: str | None = None
    """For status=error: the exception type and message. Errors are retried on resume."""
    seconds: float | None = None
    """Wall time of this item's share of its batch."""
    rank: int = 0
    """The process that wrote it (multi-process runs)."""

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["decisions"] = [x.to_dict() for x in self.decisions]
        return d

    @classmethod
    def check(cls, d: dict[str, Any]) -> dict[str, Any]:
        """`d`'s fields checked as `from_dict` checks them, its decisions too, without building
        the record: a reader that keeps a few fields of each of 100,000 records
        (`store.Record`) need not build two objects per record to throw them away."""
        d = checked_fields(cls, d)
        for i, x in enumerate(d.get("decisions", ())):
            if type(x) is dict and _fits(StageDecision, x):
                continue
            try:
                checked_fields(StageDecision, x)
            except ValueError as e:
                raise ValueError(f"decisions[{i}]: {e}") from None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Generation:
        d = cls.check(d)
        d["decisions"] = tuple(StageDecision(**x) for x in d.get("decisions", ()))
        return cls(**d)


@dataclass(frozen=True)
class Verdict:
    """A judge's opinion of one record: one JSON line in `verdicts/<judge>@<version>.jsonl`."""

    record_id: str
    """The generation record judged."""
    judge: str
    """`name@version` of the judge spec that produced it."""
    flagged: bool | None
    """True when the judge's condition holds (e.g. blank); None when it could not judge."""
    score: float | None = None
    """The judge's main number."""
    threshold: float | None = None
    """The threshold `score` was compared with."""
    raw: dict[str, Any] = field(default_factory=dict)
    """Every measurement behind the verdict."""
    reason: str = ""
    """Human-readable: why flagged or not."""
    seconds: float | None = None
    """Wall time of judging this record: the judge's batch time divided evenly over the batch's
    images (`judging.judge_run`). None: not judged (an unreadable image) or an older run."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Verdict:
        return cls(**checked_fields(cls, d))
