"""Image API generators against a local fake server: classification, retries, limits, keys."""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import threading
import types
from pathlib import Path
from typing import ClassVar

import pytest
from fake_image_api import (
    CONFIG_ERRORS,
    FAL_REFUSAL,
    GENERIC_451,
    GENERIC_REFUSAL,
    IMAGEN_BLOCKED,
    IMAGEN_RAI,
    OPENAI_MODERATION,
    OPENAI_REFUSAL,
    FakeImageAPI,
    expected,
)
from helpers import write_suite

from t2i_eval import runner
from t2i_eval.cli import main
from t2i_eval.errors import UserError
from t2i_eval.net import HttpClient, RateLimiter, redact_options, retry_after_seconds
from t2i_eval.store import RunStore
from t2i_eval.suites import load_suite
from t2i_eval.systems import (
    GENERATORS,
    ComponentSpec,
    SystemSpec,
    build_system,
    parse_system,
    resolve,
    validate_spec,
)
from t2i_eval.systems.api import (
    FalFlux,
    HttpImageAPI,
    Imagen,
    KeyedAPI,
    OpenAIImages,
    api_providers,
)
from t2i_eval.systems.chain import System, WorkItem

KEY = "sk-PLANTED-never-on-disk-0123456789"
KEY_ENV = "T2I_TEST_IMAGE_KEY"
KEY_REF = "${" + KEY_ENV + "}"
#: Tiny backoff, but a client timeout long enough that only the fake `timeout` answer (held 10 s)
#: trips it: at 0.3 s a stall of a loaded CI machine made ordinary answers retry, and the exact
#: request counts this file checks went wrong.
FAST = {"timeout": 2.0, "max_attempts": 3, "backoff": 0.001, "max_backoff": 0.01}


@pytest.fixture
def api():
    with FakeImageAPI() as server:
        yield server


@pytest.fixture(autouse=True)
def _key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)


def make(provider: str, base: str, **options):
    """A generator of `provider` aimed at the fake server, with tiny timeouts and backoff."""
    options = {**FAST, **options}
    if provider.startswith("openai"):
        model = "gpt-image-1" if provider == "openai-gpt-image" else "dall-e-3"
        return OpenAIImages(model=model, base_url=f"{base}/v1", api_key_env=KEY_ENV, **options)
    if provider == "imagen":
        return Imagen(base_url=f"{base}/v1beta", api_key_env=KEY_ENV, **options)
    if provider == "fal":
        return FalFlux(base_url=base, api_key_env=KEY_ENV, **options)
    return HttpImageAPI(
        url=f"{base}/generic",
        headers={"Authorization": f"Bearer {KEY_REF}", "X-Client": "t2i-eval-tests"},
        body={"input": {"text": "{prompt}", "seed": "{seed}"}},
        image_path="output.image",
        message_path="error.message",
        refuse_status=[451],
        refuse_match="(?i)content policy",
        **options,
    )


PROVIDERS = ["openai", "openai-gpt-image", "imagen", "fal", "http"]
SCRIPTS = [
    ["ok"],
    ["url"],
    ["refuse"],
    ["refuse2"],
    ["placeholder"],
    ["flat"],
    ["missing"],
    ["r429", "ok"],
    ["r500", "r503", "ok"],
    ["timeout", "ok"],
    ["malformed", "ok"],
    ["shape", "ok"],
    ["reset", "ok"],
    ["badimage", "ok"],
    ["b64type", "ok"],
    ["r429", "r500", "refuse"],
    ["r500"],
    ["malformed"],
    ["r401"],
    ["r400"],
    ["cfg400"],
    ["cfg400b"],
    ["b64type"],
    ["redirect"],
]
#: What a refusal of each provider must carry: the provider's own words.
REFUSAL_MESSAGES = {
    ("openai", "refuse"): OPENAI_REFUSAL,
    ("openai-gpt-image", "refuse"): OPENAI_MODERATION,
    ("openai", "refuse2"): OPENAI_REFUSAL,
    ("openai-gpt-image", "refuse2"): OPENAI_REFUSAL,
    ("imagen", "refuse"): IMAGEN_RAI,
    ("imagen", "refuse2"): IMAGEN_BLOCKED,
    ("fal", "refuse"): FAL_REFUSAL,
    ("http", "refuse"): GENERIC_REFUSAL,
    ("http", "refuse2"): GENERIC_451,
}


def outcome(result) -> str:
    refused = result.decision.refused
    return "error" if refused is None else "refused" if refused else "ok"


def key_header_ok(provider: str, headers: dict[str, str]) -> bool:
    """The key travels in exactly the provider's header, and nowhere else in the headers."""
    lower = {k.lower(): v for k, v in headers.items()}
    want = {
        "imagen": ("x-goog-api-key", KEY),
        "fal": ("authorization", f"Key {KEY}"),
    }.get(provider, ("authorization", f"Bearer {KEY}"))
    others = [v for k, v in lower.items() if k != want[0] and KEY in v]
    return lower.get(want[0]) == want[1] and not others


def test_every_response_kind_of_every_provider_is_classified(api):
    waits: list[float] = []
    total = 0
    for provider in PROVIDERS:
        gen = make(provider, api.url)
        gen.client.sleep = waits.append  # no real waiting; every backoff is recorded
        prompts = [
            f"{provider} case {i} rep {rep} [{','.join(script)}]"
            for rep in range(2)
            for i, script in enumerate(SCRIPTS)
        ]
        results = gen.generate(prompts, list(range(len(prompts))))
        assert len(results) == len(prompts)
        wrong = []
        for prompt, result in zip(prompts, results, strict=True):
            script = prompt.rsplit("[", 1)[1].rstrip("]").split(",")
            want, requests = expected("http" if provider == "http" else provider, script, 3)
            got = outcome(result)
            sent = api.requests_for(prompt)
            if got != want or len(sent) != requests:
                wrong.append((prompt, want, got, requests, len(sent), result.decision.message))
                continue
            d = result.decision
            assert d.stage == "generator" and d.name == gen.name
            assert all(key_header_ok(provider, s.headers) for s in sent)
            assert all(KEY not in s.path and KEY.encode() not in s.body for s in sent)
            if got == "ok":
                assert result.image is not None and d.raw["image_stats"]["kind"] is None
                assert d.raw["attempts"] == requests
            else:
                assert result.image is None and d.message
            final = script[min(requests, len(script)) - 1]
            if got == "refused" and (provider, final) in REFUSAL_MESSAGES:
                assert d.message == REFUSAL_MESSAGES[provider, final]
            if final in ("placeholder", "flat"):
                assert d.raw["image_stats"]["kind"] == (
                    "black" if final == "placeholder" else "flat"
                )
                assert ("black image" if final == "placeholder" else "flat-colour") in d.message
            if got == "error" and requests == 3:
                assert "gave up after 3 attempt(s)" in d.message and d.raw["transient"]
            if final in ("cfg400", "cfg400b"):  # a config error reads as itself, not a refusal
                assert CONFIG_ERRORS[provider.split("-")[0]][final == "cfg400b"] in d.message
        assert wrong == [], wrong
        total += len(prompts)
    api_requests = [s for s in api.seen if s.provider != "download"]
    downloads = [s for s in api.seen if s.provider == "download"]
    assert total == 2 * len(SCRIPTS) * len(PROVIDERS) and len(api_requests) >= 300
    assert downloads and all(
        not any(KEY in v for v in s.headers.values())
        and "authorization" not in {k.lower() for k in s.headers}
        for s in downloads
    )  # image URLs are another host: the key never goes there
    assert all(0 <= w <= FAST["max_backoff"] for w in waits) and len(waits) > 100


def test_revised_prompt_seed_and_request_shapes(api):
    dalle = make("openai", api.url, size="1024x1792", quality="hd", style="natural")
    (r,) = dalle.generate(["a lighthouse [ok]"], [7])
    assert r.decision.raw["revised_prompt"] == "A detailed illustration of a lighthouse [ok]"
    assert r.decision.raw["seed"] == 7 and r.decision.raw["seed_sent"] is False
    sent = json.loads(api.requests_for("a lighthouse [ok]")[0].body)
    assert sent == {
        "model": "dall-e-3",
        "prompt": "a lighthouse [ok]",
        "n": 1,
        "response_format": "b64_json",
        "size": "1024x1792",
        "quality": "hd",
        "style": "natural",
    }
    gpt = make("openai-gpt-image", api.url, moderation="low")
    gpt.generate(["a harbour [ok]"], [0])
    sent = json.loads(api.requests_for("a harbour [ok]")[0].body)
    assert "response_format" not in sent and sent["moderation"] == "low"

    imagen = make("imagen", api.url, safety_filter_level="block_only_high", aspect_ratio="16:9")
    imagen.generate(["a meadow [ok]"], [3])
    (seen,) = api.requests_for("a meadow [ok]")
    assert seen.path == "/v1beta/models/imagen-3.0-generate-002:predict"
    assert json.loads(seen.body)["parameters"] == {
        "sampleCount": 1,
        "includeRaiReason": True,
        "safetySetting": "block_only_high",
        "aspectRatio": "16:9",
    }

    fal = make("fal", api.url, safety_tolerance=5, enable_safety_checker=False)
    (r,) = fal.generate(["a forest [ok]"], [42])
    sent = json.loads(api.requests_for("a forest [ok]")[0].body)
    assert sent["seed"] == 42 and sent["safety_tolerance"] == "5"
    assert sent["enable_safety_checker"] is False
    assert r.decision.raw["seed_sent"] is True and r.decision.raw["provider_seed"] == 42

    http = make("http", api.url)
    http.generate(["a river [ok]"], [9])
    sent = json.loads(api.requests_for("a river [ok]")[0].body)
    assert sent == {"input": {"text": "a river [ok]", "seed": 9}}  # "{seed}" becomes a number
    assert http.info()["options"]["headers"]["Authorization"] == f"Bearer {KEY_REF}"
    assert KEY not in json.dumps([g.info() for g in (dalle, gpt, imagen, fal, http)])


def test_downloads_follow_redirects_but_keyed_requests_never_do(api):
    gen = make("openai", api.url)
    ok, redirected = gen.generate(["a moved file [moved]", "a moved API [redirect]"], [0, 0])
    assert outcome(ok) == "ok" and [s.kind for s in api.seen if s.provider == "download"] == [
        "moved",
        "download",
    ]
    assert outcome(redirected) == "error" and "refusing to follow it" in redirected.decision.message
    assert len(api.requests_for("a moved API [redirect]")) == 1


def test_retries_honour_retry_after_and_are_bounded(api):
    gen = make("openai", api.url, max_attempts=4, backoff=0.001, max_backoff=30.0)
    waits: list[float] = []
    now = [0.0]  # a fake clock: waiting moves it, nothing really waits
    gen.client.clock = lambda: now[0]
    gen.client.sleep = lambda s: (waits.append(s), now.__setitem__(0, now[0] + s))
    api.retry_after = "7"
    (r,) = gen.generate(["a bridge [r429,ok]"], [0])
    assert outcome(r) == "ok" and waits == [7.0]
    api.retry_after = "100"  # more than max_backoff: the wait is capped
    waits.clear()
    (r,) = gen.generate(["a tower [r429]"], [0])
    assert outcome(r) == "error" and waits == [30.0, 30.0, 30.0]
    assert len(api.requests_for("a tower [r429]")) == 4  # max_attempts, no more
    assert "HTTP 429" in r.decision.message and r.decision.raw["attempts"] == 4


def test_a_rate_limit_holds_back_the_next_items_too(api):
    # one item's 429 is the key's: the items after it wait out the same Retry-After instead of
    # spending their own attempts on more 429s (concurrency 1 keeps the order fixed)
    gen = make("openai", api.url, concurrency=1, max_attempts=1, backoff=0.001, max_backoff=30.0)
    now, starts = [100.0], []
    gen.client.clock = lambda: now[0]
    gen.client.sleep = lambda s: now.__setitem__(0, now[0] + s)
    exchange = gen.client._exchange
    gen.client._exchange = lambda *args: (starts.append(now[0]), exchange(*args))[1]
    api.retry_after = "7"
    results = gen.generate(["first [r429]", "second [ok]", "third [r500]", "fourth [ok]"], [0] * 4)
    assert [outcome(r) for r in results] == ["error", "ok", "error", "ok"]
    assert starts == [100.0, 107.0, 107.0, 107.0]  # a 500 is that request's own trouble


def test_limiter_pause_is_shared_and_never_shortened():
    now = [100.0]
    limiter = RateLimiter(None, clock=lambda: now[0], sleep=lambda s: None)
    assert limiter.reserve() == 0.0
    limiter.pause(7.0)
    limiter.pause(2.0)  # a shorter pause asked later keeps the longer one
    assert limiter.reserve() == 7.0
    now[0] = 105.0
    assert limiter.reserve() == 2.0
    now[0] = 107.5
    assert limiter.reserve() == 0.0
    paced = RateLimiter(60, clock=lambda: now[0], sleep=lambda s: None)  # one start per second
    paced.pause(3.0)
    assert [paced.reserve() for _ in range(3)] == [3.0, 4.0, 5.0]


def test_backoff_doubles_with_jitter_and_caps():
    client = HttpClient("x", backoff=1.0, max_backoff=10.0)

    class Fixed:
        def __init__(self, value):
            self.value = value

        def random(self):
            return self.value

    client.rng = Fixed(0.5)  # jitter factor 1.0
    assert [client.delay(a, None) for a in range(1, 7)] == [1, 2, 4, 8, 10, 10]
    client.rng = Fixed(0.0)  # the low end of the jitter: half
    assert [client.delay(a, None) for a in range(1, 4)] == [0.5, 1, 2]
    assert client.delay(1, 3.0) == 3.0  # Retry-After is a floor


def test_retry_after_forms():
    assert retry_after_seconds("3") == 3.0
    assert retry_after_seconds("garbage") is None and retry_after_seconds(None) is None
    date = "Wed, 21 Oct 2015 07:28:00 GMT"
    assert retry_after_seconds(date, now=1445412480 - 5) == pytest.approx(5.0)


def test_rpm_paces_every_attempt_on_a_fake_clock(api):
    gen = make("openai", api.url, rpm=30, concurrency=1, max_attempts=3, backoff=0.0)
    now = [100.0]
    starts: list[float] = []
    gen.client.clock = lambda: now[0]
    gen.client.sleep = lambda s: now.__setitem__(0, now[0] + s)
    exchange = gen.client._exchange
    gen.client._exchange = lambda *args: (starts.append(now[0]), exchange(*args))[1]
    results = gen.generate(["p1 [ok]", "p2 [r429,ok]", "p3 [ok]"], [0, 0, 0])
    assert [outcome(r) for r in results] == ["ok", "ok", "ok"]
    assert starts == [100.0, 102.0, 104.0, 106.0]  # 30 rpm = one start every 2 s, retries too


@pytest.mark.parametrize("world,processes", [(None, 1), ("1", 1), ("4", 4), ("junk", 1), ("0", 1)])
def test_rpm_is_the_whole_runs_budget_shared_by_its_processes(api, monkeypatch, world, processes):
    # under torchrun every rank builds its own generator: each paces at rpm / WORLD_SIZE, so
    # together they stay within the provider's limit the spec names
    if world is None:
        monkeypatch.delenv("WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("WORLD_SIZE", world)
    gen = make("openai", api.url, rpm=30)
    assert gen.client.limiter.interval == 2.0 * processes  # 30 rpm alone: one start per 2 s
    transport = gen.info()["transport"]
    assert transport["rpm"] == 30 and transport["processes"] == processes


def test_rate_limiter_slots_under_threads():
    limiter = RateLimiter(60, clock=lambda: 0.0, sleep=lambda s: None)
    waits: list[float] = []
    lock = threading.Lock()

    def take():
        w = limiter.reserve()
        with lock:
            waits.append(w)

    threads = [threading.Thread(target=take) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(waits) == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]


def test_concurrency_limit(api):
    # The limit is the client's, not the thread pool's: two batches at once (as two callers
    # sharing one generator would send them) run 2 x 3 worker threads, yet at most 3 requests
    # are in flight. Each request waits (up to hold_timeout) for a 4th to be in flight at the
    # same time; with the limit at 3 none ever is, and requests do overlap up to the limit.
    api.hold_target, api.hold_timeout = 4, 1.0  # room for a stalled CI machine to catch up
    gen = make("fal", api.url, concurrency=3, timeout=10.0)
    results: dict[int, list] = {}

    def batch(b: int) -> None:
        prompts = [f"hold {b}-{i} [hold]" for i in range(3)]
        results[b] = gen.generate(prompts, list(range(3)))

    threads = [threading.Thread(target=batch, args=(b,)) for b in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [outcome(r) for b in (0, 1) for r in results[b]] == ["ok"] * 6
    assert api.max_inflight == 3


@pytest.mark.parametrize("provider", PROVIDERS)
def test_a_key_echoed_by_the_server_is_redacted(api, provider):
    gen = make(provider, api.url, max_attempts=1)
    results = gen.generate(
        ["echo [echo]", "echo 5xx [echo500]", "echo bare [echobare500]"], [0, 0, 0]
    )
    for r in results:
        assert outcome(r) == "error" and "rejected credential" in r.decision.message
        assert KEY not in json.dumps(r.decision.to_dict()) and "[redacted]" in r.decision.message


def test_key_never_over_plain_http_to_another_machine(monkeypatch):
    with pytest.raises(UserError, match="plain http to another machine"):
        OpenAIImages(base_url="http://192.0.2.1/v1", api_key_env=KEY_ENV)
    with pytest.raises(UserError, match="plain http to another machine"):
        HttpImageAPI(
            url="http://192.0.2.1/gen",
            headers={"X-Api-Key": KEY_REF},
            image_path="image",
        )
    OpenAIImages(base_url="http://192.0.2.1/v1", api_key_env=None)  # no key, nothing to leak
    OpenAIImages(base_url="https://api.example.test/v1", api_key_env=KEY_ENV)  # nothing sent yet
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(UserError, match=f"{KEY_ENV} is not set"):
        FalFlux(api_key_env=KEY_ENV)


def test_literal_secrets_are_refused_in_specs():
    with pytest.raises(UserError, match="holds a literal value"):
        HttpImageAPI(
            url="https://api.example.test/gen",
            headers={"Authorization": f"Bearer {KEY}"},
            image_path="image",
        )
    with pytest.raises(UserError, match="resolved in headers and the URL only"):
        HttpImageAPI(
            url="https://api.example.test/gen",
            body={"prompt": "{prompt}", "key": KEY_REF},
            image_path="image",
        )
    with pytest.raises(UserError, match="must name an environment variable") as e:
        OpenAIImages(api_key_env=KEY)
    assert KEY not in str(e.value)


@pytest.mark.parametrize(
    "cls,options,message",
    [
        (FalFlux, {"safety_tolerance": 7}, "'safety_tolerance' must be an integer 1..6 (got 7)"),
        (FalFlux, {"safety_tolerance": "3"}, "'safety_tolerance' must be an integer 1..6"),
        (Imagen, {"safety_filter_level": "block_some"}, "one of block_low_and_above"),
        (Imagen, {"person_generation": "everyone"}, "one of dont_allow, allow_adult, allow_all"),
        (OpenAIImages, {"model": "gpt-image-1", "style": "vivid"}, "not supported by gpt-image-1"),
        (OpenAIImages, {"size": "512x512"}, "'size' must be one of 1024x1024"),
        (OpenAIImages, {"timeout": 0}, "'timeout' must be a number > 0"),
        (OpenAIImages, {"concurrency": 0}, "'concurrency' must be an integer >= 1"),
        (OpenAIImages, {"placeholder": "yes"}, "'placeholder' must be true or false"),
        (
            HttpImageAPI,
            {"url": "https://x.test/g", "image_path": "i", "refuse_status": [429]},
            "429",
        ),
        (
            HttpImageAPI,
            {"url": "https://x.test/g", "image_path": "i", "body": {"q": 1}},
            "{prompt}",
        ),
        (HttpImageAPI, {"url": "https://x.test/g"}, "'image_path' must be a dotted path"),
    ],
)
def test_bad_option_values_are_one_line_errors(cls, options, message):
    with pytest.raises(UserError) as e:
        cls(api_key_env=KEY_ENV, **options) if cls is not HttpImageAPI else cls(**options)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_generic_missing_image_rule_and_no_key_at_all(api):
    gen = make("http", api.url, refuse_missing_image=True)
    (r,) = gen.generate(["an empty answer [missing]"], [0])
    assert outcome(r) == "refused" and "no image at 'output.image'" in r.decision.message
    open_gen = HttpImageAPI(
        url=f"{api.url}/generic",
        body={"input": {"text": "{prompt}", "seed": 1}},
        image_path="output.image",
        **FAST,
    )
    (r,) = open_gen.generate(["no key needed [ok]"], [0])
    assert (
        outcome(r) == "ok"
        and "Authorization" not in api.requests_for("no key needed [ok]")[0].headers
    )


def test_generators_are_registered_and_build_from_a_spec(monkeypatch):
    for var in ("OPENAI_API_KEY", "GEMINI_API_KEY", "FAL_KEY"):
        monkeypatch.setenv(var, KEY)
    assert {k: resolve("generator", k) for k in ("openai-images", "imagen", "fal", "http")} == {
        "openai-images": OpenAIImages,
        "imagen": Imagen,
        "fal": FalFlux,
        "http": HttpImageAPI,
    }
    for name in ("openai-images", "imagen", "fal"):
        system = build_system(parse_system(f"{name}"))  # real defaults; nothing is sent
        assert system.generator.name == name and system.generator.weights == "api"
        info = system.generator.info()
        assert info["endpoint"].startswith("https://") and KEY not in json.dumps(info)


def test_a_provider_is_listed_by_registering_it(monkeypatch, capsys):
    """Adding a provider is its file plus one GENERATORS line: `t2i-eval list` finds it there."""
    assert api_providers() == {
        "openai-images": "model dall-e-3; key $OPENAI_API_KEY",
        "imagen": "model imagen-3.0-generate-002; key $GEMINI_API_KEY",
        "fal": "model fal-ai/flux-pro/v1.1; key $FAL_KEY",
        "http": "your url, headers (${VAR} for secrets), body template, image_path: see README",
    }

    @dataclasses.dataclass(kw_only=True, eq=False)
    class Acme(KeyedAPI):
        """Acme Images."""

        name: ClassVar[str] = "acme"
        model: str = "acme-1"
        base_url: str = "https://acme.example/v1"
        api_key_env: str | None = "ACME_KEY"

    module = types.ModuleType("t2i_test_acme_provider")
    module.Acme = Acme
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setitem(GENERATORS, "acme", f"{module.__name__}:Acme")
    assert api_providers()["acme"] == "model acme-1; key $ACME_KEY"
    assert "fake" not in api_providers() and "tiny" not in api_providers()
    assert main(["list"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.split()[:1] == ["acme"])
    assert "model acme-1; key $ACME_KEY" in line


def _system_yaml(path: Path, base: str) -> Path:
    path.write_text(
        "name: fake-dalle\n"
        "generator:\n"
        "  name: openai-images\n"
        "  model: dall-e-3\n"
        f"  base_url: {base}/v1\n"
        f"  api_key_env: {KEY_ENV}\n"
        "  timeout: 2\n"
        "  max_attempts: 2\n"
        "  backoff: 0\n"
        "  max_backoff: 0\n"
    )
    return path


def test_cli_run_end_to_end_key_never_written(api, tmp_path, capsys, caplog):
    caplog.set_level(logging.DEBUG)
    rows = [
        ("a red apple on a table [ok]", "benign"),
        ("a kitchen knife on a board [refuse]", "benign"),
        ("a dark alley at night [placeholder]", "benign"),
        ("a busy street market [r429,ok]", "benign"),
        ("a quiet harbour [r500]", "benign"),
        ("a man attacks a crowd [refuse]", "unsafe"),
    ]
    suite = write_suite(tmp_path / "suite.jsonl", rows)
    system = _system_yaml(tmp_path / "dalle.yaml", api.url)
    out = tmp_path / "run"
    argv = ["run", "--suite", str(suite), "--system", str(system), "--out", str(out), "-q"]
    assert main(argv) == 1  # one item ends in an infrastructure error
    captured = capsys.readouterr()
    assert "infrastructure errors (not counted as refusals)" in captured.err

    texts = {
        p["id"]: p["text"]
        for p in map(json.loads, (out / "prompts.jsonl").read_text().splitlines())
    }
    records = {
        texts[g["prompt_id"]]: g
        for f in (out / "generations").glob("*.jsonl")
        for g in map(json.loads, f.read_text().splitlines())
    }
    ok = records["a red apple on a table [ok]"]
    assert ok["status"] == "ok" and (out / ok["image_path"]).is_file()
    assert ok["decisions"][-1]["raw"]["revised_prompt"].startswith("A detailed illustration")
    for text in ("a kitchen knife on a board [refuse]", "a man attacks a crowd [refuse]"):
        refused = records[text]
        assert refused["status"] == "refused" and refused["refused_by"] == "generator:openai-images"
        assert refused["decisions"][-1]["message"] == OPENAI_REFUSAL
        assert refused["decisions"][-1]["raw"]["code"] == "content_policy_violation"
    dark = records["a dark alley at night [placeholder]"]
    assert dark["status"] == "refused" and "black image" in dark["decisions"][-1]["message"]
    assert records["a busy street market [r429,ok]"]["status"] == "ok"
    failed = records["a quiet harbour [r500]"]
    assert failed["status"] == "error" and failed["refused_by"] is None
    assert "HTTP 500" in failed["decisions"][-1]["message"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"] == {"ok": 2, "refused": 3, "error": 1}

    # resume: only the error is asked again; everything finished stays finished
    before = len(api.seen)
    assert main(argv) == 1
    again = api.seen[before:]
    assert {s.prompt for s in again} == {"a quiet harbour [r500]"} and len(again) == 2
    captured2 = capsys.readouterr()

    assert any("HTTP 429" in r.getMessage() for r in caplog.records)  # retries were logged
    leaks = [str(f) for f in tmp_path.rglob("*") if f.is_file() and KEY.encode() in f.read_bytes()]
    assert leaks == []
    for text in (captured.out, captured.err, captured2.out, captured2.err, caplog.text):
        assert KEY not in text
    assert all(key_header_ok("openai", s.headers) for s in api.seen)


def test_cli_bad_option_is_one_line(api, tmp_path, capsys):
    system = tmp_path / "fal.yaml"
    system.write_text(f"generator: {{name: fal, base_url: '{api.url}', safety_tolerance: 9}}\n")
    suite = write_suite(tmp_path / "s.jsonl", [("a cat [ok]", "benign")])
    argv = ["run", "--suite", str(suite), "--system", str(system), "--out", str(tmp_path / "r")]
    assert main([*argv, "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "t2i-eval: error: fal: option 'safety_tolerance' must be an integer 1..6 (got 9)"
    )
    assert api.seen == []


# keys that must never reach the disk, a log or a record ------------------------------------

LITERAL_KEY_OPTIONS = [
    {"headers": {"Authorization": f"Bearer {KEY}"}},
    {"headers": {"X-Api-Key": KEY}},
    {"headers": [f"Authorization: Bearer {KEY}"]},  # not a mapping: the error must not echo it
    {"url": f"https://api.example.test/gen?key={KEY}"},
    {"url": f"https://api.example.test/gen?v=1&access_token={KEY}"},
    {"body": {"prompt": "{prompt}", "api_key": KEY}},
]


@pytest.mark.parametrize("options", LITERAL_KEY_OPTIONS)
def test_validate_spec_refuses_a_literal_key_without_echoing_it(options, monkeypatch):
    monkeypatch.delenv(KEY_ENV)  # validation needs no key present
    spec = SystemSpec(
        "leaky",
        ComponentSpec(
            "http", {"url": "https://api.example.test/gen", "image_path": "image", **options}
        ),
    )
    with pytest.raises(UserError) as e:
        validate_spec(spec)
    assert KEY not in str(e.value) and "\n" not in str(e.value)
    assert KEY not in json.dumps(redact_options(spec.to_dict()))  # the manifest's copy


def test_validate_spec_checks_api_values_but_needs_no_key(monkeypatch):
    monkeypatch.delenv(KEY_ENV)
    ok = {
        "url": f"https://api.example.test/gen?key={KEY_REF}",
        "headers": {"Authorization": f"token={KEY_REF}"},
        "image_path": "image",
    }
    spec = SystemSpec("s", ComponentSpec("http", ok))
    validate_spec(spec)  # references only: valid, though the variable is not set
    assert redact_options(spec.to_dict()) == spec.to_dict()  # nothing to hide, kept as is
    with pytest.raises(UserError, match=f"{KEY_ENV} is not set"):
        build_system(spec)  # building (after the manifest) is where the key must exist
    with pytest.raises(UserError, match="'safety_tolerance' must be an integer 1..6"):
        validate_spec(SystemSpec("s", ComponentSpec("fal", {"safety_tolerance": 9})))


def test_open_store_redacts_a_literal_key_it_is_given(tmp_path):
    """The second line: even a spec that skipped validation leaves no key in the manifest."""
    suite = load_suite(str(write_suite(tmp_path / "s.jsonl", [("a cat", "benign")])))
    options = {
        "url": f"https://api.example.test/gen?key={KEY}&size=small&code={KEY}",
        "headers": {"Authorization": f"Bearer {KEY}", "X-Ref": f"Bearer {KEY_REF}", "X-Api": KEY},
        "body": {"prompt": "{prompt}", "client_secret": KEY},
        "api_key_env": KEY_ENV,
        "image_path": "image",
    }
    spec = SystemSpec("leaky", ComponentSpec("http", options))
    store = RunStore(tmp_path / "run")
    store.root.mkdir()
    runner._open_store(store, suite, spec, ["run"])
    text = (store.root / "manifest.json").read_text()
    assert KEY not in text
    system = json.loads(text)["system"]
    gen = system["generator"]
    assert gen["headers"] == {
        "Authorization": "<redacted>",
        "X-Ref": f"Bearer {KEY_REF}",
        "X-Api": "<redacted>",  # whatever a header is called, only references are written
    }
    # a key sits under whatever name its API chose (`code`); a value too short to be one stays
    assert gen["url"] == "https://api.example.test/gen?key=<redacted>&size=small&code=<redacted>"
    assert gen["body"]["client_secret"] == "<redacted>" and gen["api_key_env"] == KEY_ENV
    assert system["digest"] == spec.digest  # a resume still recognises its own spec


def _http_yaml(path: Path, base: str) -> Path:
    path.write_text(
        "name: generic\n"
        "generator:\n"
        "  name: http\n"
        f"  url: {base}/generic\n"
        f"  headers: {{Authorization: 'Bearer {KEY_REF}'}}\n"
        "  body: {input: {text: '{prompt}', seed: '{seed}'}}\n"
        "  image_path: output.image\n"
        "  message_path: error.message\n"
        "  max_attempts: 2\n"
        "  backoff: 0\n"
        "  max_backoff: 0\n"
    )
    return path


@pytest.mark.parametrize("spec_kind", ["openai-images", "http"])
def test_a_key_with_a_crlf_line_ending_is_stripped_and_never_written(
    spec_kind, api, tmp_path, capsys, caplog, monkeypatch
):
    monkeypatch.setenv(KEY_ENV, KEY + "\r\n")  # exported from a CRLF .env file
    caplog.set_level(logging.DEBUG)
    rows = [
        ("a red apple [ok]", "benign"),
        ("an echoing server [echo500,ok]", "benign"),
        ("a bad answer [b64type]", "benign"),
    ]
    suite = write_suite(tmp_path / "suite.jsonl", rows)
    maker = _system_yaml if spec_kind == "openai-images" else _http_yaml
    system = maker(tmp_path / "sys.yaml", api.url)
    out = tmp_path / "run"
    argv = ["run", "--suite", str(suite), "--system", str(system), "--out", str(out), "-q"]
    assert main(argv) == 1  # the malformed answer stays an error
    captured = capsys.readouterr()
    statuses = sorted(
        g["status"]
        for f in (out / "generations").glob("*.jsonl")
        for g in map(json.loads, f.read_text().splitlines())
    )
    assert statuses == ["error", "ok", "ok"]
    assert all(key_header_ok("openai", s.headers) for s in api.seen)  # the stripped key sent
    leaks = [str(f) for f in tmp_path.rglob("*") if f.is_file() and KEY.encode() in f.read_bytes()]
    assert leaks == []
    for text in (captured.out, captured.err, caplog.text):
        assert KEY not in text


def test_a_key_with_a_control_character_inside_is_refused_naming_only_the_variable(
    api, monkeypatch
):
    monkeypatch.setenv(KEY_ENV, "sk-broken\rkey-0123456789")
    for provider in ("openai", "http"):
        with pytest.raises(UserError, match=f"environment variable {KEY_ENV} holds") as e:
            make(provider, api.url)
        assert "sk-broken" not in str(e.value)
    monkeypatch.setenv(KEY_ENV, KEY)
    gen = make("imagen", api.url)
    monkeypatch.setenv(KEY_ENV, KEY[:10] + "\n" + KEY[10:])  # damaged after the start
    (r,) = gen.generate(["a later item [ok]"], [0])
    assert outcome(r) == "error" and KEY_ENV in r.decision.message
    assert KEY[:10] not in json.dumps(r.decision.to_dict()) and api.seen == []


def test_a_header_the_transport_rejects_is_an_error_without_the_header(api):
    client = HttpClient("x", max_attempts=1)
    header = {"Authorization": "Bearer sk-inside\rthe-header-0123"}
    with pytest.raises(UserError, match="line break or control character") as e:
        client.request("POST", f"{api.url}/generic", lambda r: r, body=b"{}", auth=lambda: header)
    assert "sk-inside" not in str(e.value)


def test_an_unforeseen_exception_is_an_error_of_that_item_only(api):
    gen = make("openai", api.url)
    parse = gen._parse

    def flaky(resp):  # the second request's answer trips a bug, its message quoting the key
        if len(api.seen) == 2:
            raise RuntimeError(f"unexpected shape near {KEY}")
        return parse(resp)

    gen._parse = flaky
    results = gen.generate(["first [ok]"], [0]) + gen.generate(["second [ok]"], [0])
    assert [outcome(r) for r in results] == ["ok", "error"]
    d = results[1].decision
    assert d.refused is None and "unexpected RuntimeError" in d.message and d.raw["unexpected"]
    assert KEY not in json.dumps(d.to_dict()) and "[redacted]" in d.message


@pytest.mark.parametrize("provider", PROVIDERS)
def test_a_malformed_item_is_retried_alone_in_its_batch(api, provider):
    """A non-text image field is a broken answer: retried, then an error of that item; the
    System never re-sends (and re-pays for) the rest of the batch."""
    gen = make(provider, api.url)
    prompts = ["one [ok]", "two [ok]", "bad [b64type]", "four [ok]"]
    items = [WorkItem(f"r{i}", f"p{i}", text, i) for i, text in enumerate(prompts)]
    results = System("s", gen).run(items)
    assert [r.status for r in results] == ["ok", "ok", "error", "ok"]
    assert "gave up after 3 attempt(s)" in results[2].decisions[-1].message
    sent = [s for s in api.seen if s.provider != "download"]
    assert len(sent) == 3 + FAST["max_attempts"]
    assert len(api.requests_for("bad [b64type]")) == FAST["max_attempts"]


def test_http_key_in_the_url_is_resolved_per_request_and_never_shown(api, monkeypatch):
    gen = HttpImageAPI(
        url=f"{api.url}/generic?v=1&key={KEY_REF}",
        body={"input": {"text": "{prompt}", "seed": "{seed}"}},
        image_path="output.image",
        message_path="error.message",
        **FAST,
    )
    prompts = ["url key [ok]", "echo [echo]", "echo bare [echobare500]", "moved [redirect]"]
    ok, echo, bare, redirected = gen.generate(prompts, [0, 1, 2, 3])
    assert outcome(ok) == "ok"
    assert api.requests_for("url key [ok]")[0].path == f"/generic?v=1&key={KEY}"
    assert gen.info()["endpoint"] == f"{api.url}/generic?v=1&key={KEY_REF}"
    for r in (echo, bare, redirected):
        assert outcome(r) == "error" and KEY not in json.dumps(r.decision.to_dict())
    assert "[redacted]" in echo.decision.message and "[redacted]" in bare.decision.message
    assert "refusing to follow it" in redirected.decision.message
    assert "?<redacted>" in redirected.decision.message  # the query is never quoted
    assert len(api.requests_for("moved [redirect]")) == 1  # a keyed URL follows no redirect
    with pytest.raises(UserError, match="plain http to another machine"):
        HttpImageAPI(url=f"http://192.0.2.1/gen?key={KEY_REF}", image_path="image")
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(UserError, match=f"{KEY_ENV} is not set"):
        HttpImageAPI(url=f"{api.url}/generic?key={KEY_REF}", image_path="image")


def test_the_retry_log_is_scrubbed_of_the_key_itself(api, caplog):
    """`token=KEY` in a header and a server that echoes KEY alone on a 5xx: the -v log line
    must carry neither (redacting the header value as a whole would miss it)."""
    caplog.set_level(logging.DEBUG)
    gen = HttpImageAPI(
        url=f"{api.url}/generic",
        headers={"Authorization": f"token={KEY_REF}"},
        body={"input": {"text": "{prompt}", "seed": 1}},
        image_path="output.image",
        **FAST,
    )
    (r,) = gen.generate(["a bare echo [echobare500,ok]"], [0])
    assert outcome(r) == "ok"
    retries = [m.getMessage() for m in caplog.records if "retry 1/2" in m.getMessage()]
    assert retries and "rejected credential [redacted]" in retries[0]
    assert KEY not in caplog.text


def test_a_literal_under_any_header_name_is_never_written_nor_echoed(api):
    """`X-Api: VALUE` does not look like a credential, and may be one: the manifest's copy of
    the generator (info) names the header only, and an echo of the value is scrubbed."""
    literal = "lit-0123456789-not-a-name"
    gen = HttpImageAPI(
        url=f"{api.url}/generic?v=1&code={literal}",
        headers={"X-Api": literal, "X-Ref": f"Bearer {KEY_REF}"},
        body={"input": {"text": "{prompt}", "seed": "{seed}"}},
        image_path="output.image",
        **FAST,
    )
    info = json.dumps(gen.info())
    assert literal not in info and '"X-Api": "<redacted>"' in info and "v=1&code=" in info
    (r,) = gen.generate(["an echo of every key [leakjson]"], [0])
    assert outcome(r) == "error" and "[redacted]" in r.decision.message
    assert literal[:8] not in json.dumps(r.decision.to_dict())


@pytest.mark.parametrize(
    "options,what",
    [
        ({"headers": {"X-Client": "<redacted>"}}, "header 'X-Client'"),
        ({"url": "https://api.example.test/gen?code=%3Credacted%3E"}, "a value in the url"),
    ],
)
def test_a_spec_read_back_from_a_manifest_says_what_it_lost(options, what):
    """A manifest keeps no literal values; the spec `rewrite` reads back from it must not
    send '<redacted>' as if it were one."""
    with pytest.raises(UserError) as e:
        HttpImageAPI(**{"url": "https://api.example.test/gen", "image_path": "i", **options})
    message = str(e.value)
    assert f"{what} reads '<redacted>'" in message and "${MY_VAR}" in message
