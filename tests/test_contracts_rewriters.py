"""Contracts every rewriter keeps, run over every entry of REWRITERS and every chat backend of
the `llm` rewriter, offline (rewrite/rewriters.py's `Rewriter` says what each must offer).

Each has an offline build (VARIANTS): `rule` with the shipped lexicon, `llm` with the tiny
random-weight GPT-2 chat model (conftest's `tiny_chat_model`), and `llm` over the loopback
fake OpenAI-compatible server in fake_image_api.py (`/v1/chat/completions`, scripted by a
`[kind,...]` suffix on the prompt). A new REWRITERS or CHAT_BACKENDS entry without a build here
fails `test_every_rewriter_and_chat_backend_has_an_offline_contract`.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pytest
from fake_image_api import FakeImageAPI

from t2i_eval.errors import UserError
from t2i_eval.paths import data_dir
from t2i_eval.rewrite.rewriters import (
    CHAT_BACKENDS,
    RAW_LIMIT,
    REWRITERS,
    STATUSES,
    ChatBackend,
    LLMRewriter,
    Rewrite,
    RewriteCache,
    Rewriter,
    build_rewriter,
    rewriter_from_spec,
    validate,
)

KEY_ENV = "T2I_CONTRACT_CHAT_KEY"
KEY = "sk-contract-chat-key-0123456789"
TRIGGERS = {"an old gun in a museum display case": ["gun", "display"]}


@dataclass
class Env:
    """What a build needs: the fake server's URL, a scratch folder, the tiny chat model."""

    url: str
    root: Path
    chat_model: Path | None = None
    """Set for the variants that need it (building it needs torch)."""


@dataclass(frozen=True)
class Variant:
    """One offline build of a rewriter: `build_rewriter(ref(env), **settings(env))`."""

    kind: str
    """Its REWRITERS entry."""
    backend: str | None
    """Its CHAT_BACKENDS entry (the `llm` rewriter), else None."""
    ref: Callable[[Env], str]
    settings: Callable[[Env], dict[str, Any]]
    cases: dict[str, str | None]
    """Prompt -> the status it must get; None where random weights decide (any of STATUSES)."""
    outages: Callable[[Env, pytest.MonkeyPatch], list[tuple[Rewriter, str]]]
    """(a rewriter in an outage, a prompt): each must come back an `error`, never a rewrite."""
    changes: Callable[[Env, Rewriter], list[Rewriter]]
    """The same rewriter with one setting changed each: every one is another cache key."""
    needs: tuple[str, ...] = ()

    @property
    def id(self) -> str:
        return f"{self.kind}-{self.backend}" if self.backend else self.kind


def _quick(rw: Rewriter) -> Rewriter:
    """No real waiting between an HTTP backend's retries (its attempts still all happen)."""
    client = getattr(getattr(rw, "backend", None), "client", None)
    if client is not None:
        client.sleep = lambda seconds: None
    return rw


def _build(v: Variant, env: Env, ref: str | None = None, **changed: Any) -> Rewriter:
    return _quick(build_rewriter(ref or v.ref(env), **{**v.settings(env), **changed}))


def _other_instructions(env: Env, rw: Rewriter) -> Rewriter:
    """The same backend and model with instructions worded otherwise (a new `version`)."""
    path = env.root / "instructions.yaml"
    shipped = (data_dir("guards") / "rewrite_prompt.yaml").read_text(encoding="utf-8")
    path.write_text(shipped.replace("version: 1", "version: 2"), encoding="utf-8")
    assert isinstance(rw, LLMRewriter)
    backend = rw.spec["kind"].partition("-")[2]
    return LLMRewriter(rw.backend, rw.spec["model"], backend, instructions=str(path))


def _other_lexicon(env: Env) -> str:
    path = env.root / "lexicon.yaml"
    shipped = (data_dir("guards") / "rewrite_lexicon.yaml").read_text(encoding="utf-8")
    path.write_text(shipped.replace("gun: [firearm", "gun: [old firearm"), encoding="utf-8")
    return f"rule:{path}"


def _rule_outages(env: Env, mp: pytest.MonkeyPatch) -> list[tuple[Rewriter, str]]:
    """The prompt guards' re-check could not check (None), or failed outright."""

    def cannot(texts: list[str]) -> list[bool | None]:
        return [None] * len(texts)

    def fails(texts: list[str]) -> list[bool | None]:
        raise RuntimeError("guard device lost")

    prompt = "an old gun in a museum display case"
    return [
        (build_rewriter("rule", check=cannot), prompt),
        (build_rewriter("rule", check=fails), prompt),
    ]


def _http_outages(env: Env, mp: pytest.MonkeyPatch) -> list[tuple[Rewriter, str]]:
    """A server that keeps answering 500, then one that drops the connection: in this order,
    because a server that never answered at all aborts the rewrite (a UserError: is it up?)."""
    rw = _build(VARIANT["llm-http"], env)
    return [(rw, "an old gun in a museum [r500]"), (rw, "an old gun in a museum [reset]")]


def _local_outages(env: Env, mp: pytest.MonkeyPatch) -> list[tuple[Rewriter, str]]:
    """The local model runs out of memory mid-generation."""
    rw = _build(VARIANT["llm-transformers"], env)

    def oom(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 MiB")

    mp.setattr(rw.backend.model, "generate", oom)  # type: ignore[attr-defined]
    return [(rw, "an old gun in the museum")]


def _copied_model(env: Env) -> str:
    copy = env.root / "chat-copy"
    if not copy.exists():
        assert env.chat_model is not None
        shutil.copytree(env.chat_model, copy)
    return f"llm:{copy}"


VARIANTS = [
    Variant(
        "rule",
        None,
        lambda e: "rule",
        lambda e: {"triggers": TRIGGERS},
        {
            "an old gun in a museum display case": "ok",
            "a calm lake at dawn": "unchanged",
            " ".join(["a gun on a table"] * 40): "ok",  # its output is longer than RAW_LIMIT
        },
        _rule_outages,
        lambda e, rw: [
            _build(VARIANT["rule"], e, _other_lexicon(e)),
            _build(VARIANT["rule"], e, check=lambda texts: [False] * len(texts)),
            _build(VARIANT["rule"], e, triggers={**TRIGGERS, "a knife": ["knife"]}),
        ],
    ),
    Variant(
        "llm",
        "transformers",
        lambda e: f"llm:{e.chat_model}",
        lambda e: {"max_new_tokens": 8},
        {"an old gun in the museum": None, "a calm sea": None},
        _local_outages,
        lambda e, rw: [
            _build(VARIANT["llm-transformers"], e, _copied_model(e)),
            _build(VARIANT["llm-transformers"], e, max_new_tokens=9),
            _other_instructions(e, rw),
        ],
        needs=("torch", "transformers"),
    ),
    Variant(
        "llm",
        "http",
        lambda e: "llm:contract-chat",
        lambda e: {"base_url": f"{e.url}/v1", "api_key_env": KEY_ENV, "max_new_tokens": 40},
        {"an old gun in a museum [ok]": "ok"},
        _http_outages,
        lambda e, rw: [
            _build(VARIANT["llm-http"], e, "llm:another-chat"),
            _build(VARIANT["llm-http"], e, base_url=f"{e.url}/other/v1"),
            _build(VARIANT["llm-http"], e, max_new_tokens=41),
            _other_instructions(e, rw),
        ],
    ),
]
VARIANT = {v.id: v for v in VARIANTS}
IDS = [v.id for v in VARIANTS]


@pytest.fixture(scope="module")
def server():
    with FakeImageAPI() as api, pytest.MonkeyPatch.context() as mp:
        mp.setenv(KEY_ENV, KEY)
        yield api


@pytest.fixture(params=VARIANTS, ids=IDS)
def variant(
    request: pytest.FixtureRequest, server: FakeImageAPI, tmp_path: Path
) -> tuple[Variant, Rewriter, Env]:
    """(variant, its rewriter built as `t2i-eval rewrite` builds it, what the build used)."""
    v: Variant = request.param
    for module in v.needs:
        mod = pytest.importorskip(module)
        if module == "torch":
            mod.set_num_threads(1)
    env = Env(server.url, tmp_path / "env")
    env.root.mkdir()
    if v.backend == "transformers":
        env.chat_model = request.getfixturevalue("tiny_chat_model")
    return v, _build(v, env), env


def _check_record(r: Rewrite, rw: Rewriter, parent_id: str, original: str) -> None:
    """What every Rewrite keeps, whatever became of it."""
    assert isinstance(r, Rewrite) and r.status in STATUSES
    assert (r.parent_id, r.original, r.rewriter) == (parent_id, original, rw.key)
    json.dumps(asdict(r))  # rewrites.jsonl stores it
    assert KEY not in json.dumps(asdict(r)), "a credential in a record"


def test_every_rewriter_and_chat_backend_has_an_offline_contract() -> None:
    assert {v.kind for v in VARIANTS} == set(REWRITERS), "add a Variant per REWRITERS entry"
    backends = {v.backend for v in VARIANTS if v.kind == "llm"}
    assert backends == set(CHAT_BACKENDS), "add a Variant per CHAT_BACKENDS entry"


def test_interface_the_experiment_uses(variant, tmp_path: Path) -> None:
    v, rw, env = variant
    assert isinstance(rw, Rewriter)
    assert isinstance(rw.key, str) and re.sub(r"[^A-Za-z0-9._-]+", "-", rw.key).strip("-")
    assert isinstance(rw.spec, dict) and rw.spec["kind"] == (
        f"{v.kind}-{v.backend}" if v.backend else v.kind
    )
    json.dumps(rw.spec)  # rewrite_plan.json and the linked run's manifest record it
    assert KEY not in json.dumps(rw.spec)
    text = next(iter(v.cases))
    cache = RewriteCache(tmp_path / "rewrites.jsonl", rw.spec)  # how the experiment calls it
    r = cache.get_or_make("p1", text, lambda: rw.rewrite("p1", text))
    _check_record(r, rw, "p1", text)
    again = RewriteCache(tmp_path / "rewrites.jsonl", rw.spec)  # the next run, from the file
    assert again.get_or_make("p2", text, lambda: pytest.fail("asked twice")) == Rewrite(
        "p2", r.original, r.text, r.status, r.rewriter, r.details
    )


def test_statuses_are_documented_and_raw_answers_kept(variant) -> None:
    v, rw, env = variant
    for i, (text, want) in enumerate(v.cases.items()):
        r = rw.rewrite(f"p{i}", text)
        _check_record(r, rw, f"p{i}", text)
        assert r.status != "error", r.details
        assert want is None or r.status == want, (text, r)
        raw = r.details["raw"]
        assert isinstance(raw, str) and len(raw) <= RAW_LIMIT
        if len(raw) < RAW_LIMIT:  # kept whole: the status is decided again from it
            assert validate(text, raw) == (r.status, r.text)
    if v.kind == "rule":  # the long case's output was cut, as every record's is
        long = max(v.cases, key=len)
        assert len(rw.rewrite("p", long).details["raw"]) == RAW_LIMIT


def test_an_outage_is_an_error_never_a_rewrite(variant, tmp_path: Path) -> None:
    v, _, env = variant
    with pytest.MonkeyPatch.context() as mp:
        broken = v.outages(env, mp)
        assert broken
        for i, (rw, text) in enumerate(broken):
            r = rw.rewrite(f"p{i}", text)
            _check_record(r, rw, f"p{i}", text)
            assert (r.status, r.text) == ("error", ""), r
            assert r.details["error"].strip() and "raw" not in r.details
            assert _asked_again(tmp_path / f"c{i}.jsonl", rw, text), "an error is never reused"


def _asked_again(path: Path, rw: Rewriter, text: str) -> bool:
    """Whether a second run (a new cache over the same file) asks the rewriter again."""
    RewriteCache(path, rw.spec).get_or_make("p", text, lambda: rw.rewrite("p", text))
    asked: list[str] = []

    def make() -> Rewrite:
        asked.append(text)
        return rw.rewrite("p", text)

    RewriteCache(path, rw.spec).get_or_make("p", text, make)
    return asked == [text]


def test_spec_round_trip_rebuilds_the_same_rewriter(variant) -> None:
    v, rw, env = variant
    built = [rw, _build(v, env, _other_lexicon(env))] if v.kind == "rule" else [rw]
    text = next(iter(v.cases))
    for one in built:
        stored = json.loads(json.dumps(one.spec))  # as rewrite_plan.json and the manifest keep it
        back = _quick(rewriter_from_spec(stored, api_key_env=KEY_ENV, triggers=TRIGGERS))
        assert back.key == one.key and back.spec == one.spec  # so the same cached rewrites
        a, b = one.rewrite("p", text), back.rewrite("p", text)
        assert (a.status, a.text) == (b.status, b.text)


def test_the_cache_key_covers_every_setting(variant, tmp_path: Path) -> None:
    v, rw, env = variant
    text = next(iter(v.cases))
    key = RewriteCache(tmp_path / "c.jsonl", rw.spec).key(text)
    assert RewriteCache(tmp_path / "c.jsonl", rw.spec).key(text + " ") != key  # the text
    others = v.changes(env, rw)
    assert others
    keys = [RewriteCache(tmp_path / "c.jsonl", o.spec).key(text) for o in others]
    assert key not in keys and len(set(keys)) == len(keys), [o.spec for o in others]
    assert _build(v, env).spec == rw.spec  # and nothing else: a rebuild finds its rewrites
    if v.backend == "http":  # which variable holds the key changes no answer
        assert _build(v, env, api_key_env=None).spec == rw.spec


def test_a_raw_answer_is_kept_cut_to_the_limit_and_judged_whole() -> None:
    class Rambling(ChatBackend):
        def chat(self, system: str, user: str) -> str:
            return "a harbour at dawn " * 200

    r = LLMRewriter(Rambling(), "m", "http").rewrite("p", "a quiet harbour at dawn")
    assert r.details["raw"] == ("a harbour at dawn " * 200)[:RAW_LIMIT]
    assert r.status == "overlong"  # decided on the whole answer, not on the part kept


def test_unknown_rewriters_are_named_with_the_closest_and_the_available() -> None:
    with pytest.raises(UserError) as e:
        build_rewriter("rul:lexicon.yaml")
    assert str(e.value) == (
        "Unknown rewriter 'rul'. Did you mean 'rule'? Available: rule, llm "
        "(--rewriter rule, rule:LEXICON.yaml or llm:MODEL)"
    )
    with pytest.raises(UserError, match="needs a model id"):
        build_rewriter("llm")
    with pytest.raises(UserError, match="kind 'llm-carrier-pigeon' is no rewriter"):
        rewriter_from_spec({"kind": "llm-carrier-pigeon", "model": "m"})
