"""No credential reaches the disk or a log, however a server echoes it back.

End to end through the CLI: every image API generator and the `http` generator against a
loopback server that echoes the request's key in every form a server may (raw inside JSON at
the 200-character cut, in an HTML page, JSON-escaped, URL-quoted, base64 of `user:KEY`, a dump
of the request headers, a redirect target, slowly), then the `llm` rewriter against the same
server. Afterwards no run of MIN_SECRET_RUN characters of the key, nor of its encoded forms,
may be anywhere in the run directories, the cache folder, stdout, stderr or the `-v` log.
"""

from __future__ import annotations

import base64
import json
import logging
from pathlib import Path
from urllib.parse import quote, quote_plus

import pytest
from fake_image_api import LEAKS, FakeImageAPI
from helpers import write_suite

from t2i_eval.cli import main
from t2i_eval.net import MARK, MIN_SECRET_RUN

#: '/', '+' and '=' make its JSON-escaped, URL-quoted and base64 forms all differ from it.
KEY = "sk-Leak/Te+st=Key/0a9Z+q7w=="
KEY_ENV = "T2I_TEST_LEAK_KEY"
#: A literal value under a header whose name does not look like a credential (`X-Api`).
LITERAL = "lit/X-Api+Secret=77Qz/w1"
TRANSPORT = "  timeout: 2\n  max_attempts: 2\n  backoff: 0\n  max_backoff: 0\n"
GENERATORS = {
    "openai-images": "  base_url: {api}/v1\n  api_key_env: " + KEY_ENV + "\n",
    "imagen": "  base_url: {api}/v1beta\n  api_key_env: " + KEY_ENV + "\n",
    "fal": "  base_url: '{api}'\n  api_key_env: " + KEY_ENV + "\n",
    "http": (
        "  url: '{api}/generic?key=${{" + KEY_ENV + "}}'\n"
        "  headers: {{Authorization: 'Bearer ${{" + KEY_ENV + "}}', X-Api: '" + LITERAL + "'}}\n"
        "  body: {{input: {{text: '{{prompt}}', seed: '{{seed}}'}}}}\n"
        "  image_path: output.image\n"
        "  message_path: error.message\n"
    ),
}
#: Echoes whose record must show the key was there and was cut out (the others never carry
#: the answer's text: a redirect is refused unread, a dribbled answer times out).
ECHOED = set(LEAKS) - {"leakredirect", "leakslow"}


def encoded_forms(key: str) -> list[str]:
    """The key and what it looks like escaped, quoted and in base64 (padding and the
    characters shared with `user:` dropped, so only what depends on the key remains)."""
    return [
        key,
        json.dumps(key).strip('"').replace("/", "\\/"),
        quote(key, safe=""),
        quote_plus(key),
        base64.b64encode(key.encode()).decode()[:-4],
        base64.b64encode(f"user:{key}".encode()).decode()[8:-4],
    ]


def runs_of(secret: str) -> set[bytes]:
    return {
        form[i : i + MIN_SECRET_RUN].encode()
        for form in encoded_forms(secret)
        for i in range(len(form) - MIN_SECRET_RUN + 1)
    }


def leaks(blobs: dict[str, bytes]) -> list[tuple[str, str]]:
    """(where, run) for every run of a secret found."""
    found = []
    for secret in (KEY, LITERAL):
        for run in runs_of(secret):
            found += [(where, run.decode()) for where, data in blobs.items() if run in data]
    return sorted(found)


def files_under(*roots: Path) -> dict[str, bytes]:
    return {str(f): f.read_bytes() for root in roots for f in root.rglob("*") if f.is_file()}


@pytest.fixture
def api(monkeypatch, tmp_path):
    monkeypatch.setenv(KEY_ENV, KEY)
    monkeypatch.setenv("T2I_EVAL_CACHE", str(tmp_path / "cache"))
    with FakeImageAPI() as server:
        yield server


def _spec(tmp_path: Path, generator: str, api: str) -> Path:
    path = tmp_path / "specs" / f"{generator}.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(
        f"name: leaky-{generator}\ngenerator:\n  name: {generator}\n"
        + GENERATORS[generator].format(api=api)
        + TRANSPORT
    )
    return path


def _suite(tmp_path: Path, kinds: list[str]) -> Path:
    rows = [(f"a harbour at dawn {i} [{kind}]", "benign") for i, kind in enumerate(kinds)]
    return write_suite(tmp_path / f"suite-{len(kinds)}.jsonl", rows)


def _records(run: Path) -> dict[str, dict]:
    texts = {
        p["id"]: p["text"]
        for p in map(json.loads, (run / "prompts.jsonl").read_text().splitlines())
    }
    return {
        texts[g["prompt_id"]].rsplit("[", 1)[1].rstrip("]"): g
        for f in (run / "generations").glob("*.jsonl")
        for g in map(json.loads, f.read_text().splitlines())
    }


def test_no_run_of_the_key_reaches_a_file_or_a_log(api, tmp_path, capsys, caplog, monkeypatch):
    import t2i_eval.rewrite.rewriters as rewrite

    pytest.importorskip("sentence_transformers")  # the rewrite report's similarity model
    monkeypatch.setattr(rewrite.time, "sleep", lambda s: None)  # the rewriter's backoff
    caplog.set_level(logging.DEBUG)
    kinds = ["ok", *LEAKS]
    suite = _suite(tmp_path, kinds)
    outputs = []
    for generator in GENERATORS:
        out = tmp_path / "runs" / generator
        argv = ["run", "--suite", str(suite), "--system", str(_spec(tmp_path, generator, api.url))]
        assert main(["-v", *argv, "--out", str(out), "-q"]) == 1  # the echoes are errors
        outputs.append(capsys.readouterr())
        records = _records(out)
        assert set(records) == set(kinds) and records["ok"]["status"] == "ok", generator
        for kind in LEAKS:
            assert records[kind]["status"] == "error", (generator, kind)
        messages = {k: r["decisions"][-1]["message"] for k, r in records.items()}
        assert [k for k in ECHOED if MARK not in messages[k]] == [], (generator, messages)
        assert "refusing to follow" in messages["leakredirect"]
        assert "timed out" in messages["leakslow"]
        assert (out / "manifest.json").is_file() and (out / "report" / "summary.json").is_file()
    manifest = json.loads((tmp_path / "runs" / "http" / "manifest.json").read_text())
    assert manifest["system"]["generator"]["headers"] == {
        "Authorization": "Bearer ${" + KEY_ENV + "}",
        "X-Api": "<redacted>",
    }
    seen = {s.kind for s in api.seen}
    assert set(LEAKS) <= seen  # every echo was played

    # the llm rewriter against the same server: its errors (5xx echoes) and its answers (the
    # key inside the rewritten text) go to rewrites.jsonl, the plan, the linked run
    parent = tmp_path / "runs" / "parent"
    kinds = [k for k in kinds if k != "leakslow"]  # the rewriter's 60 s timeout: no dribbling
    argv = ["run", "--suite", str(_suite(tmp_path, kinds)), "--out", str(parent), "-q"]
    assert main([*argv, "--system", str(_spec(tmp_path, "openai-images", api.url))]) == 1
    rewritten = tmp_path / "runs" / "rewritten"
    argv = ["rewrite", str(parent), "--rewriter", "llm:echo", "--base-url", f"{api.url}/v1"]
    argv += ["--api-key-env", KEY_ENV, "--all", "--out", str(rewritten), "-q"]
    assert main(["-v", *argv]) == 1  # the echoing rewrites are errors
    outputs.append(capsys.readouterr())
    rows = [json.loads(x) for x in (rewritten / "rewrites.jsonl").read_text().splitlines()]
    by_kind = {r["original"].rsplit("[", 1)[1].rstrip("]"): r for r in rows}
    assert by_kind["ok"]["status"] == "ok" and MARK in by_kind["ok"]["text"]
    assert all(by_kind[k]["status"] == "error" for k in kinds if k != "ok")
    assert all(MARK in by_kind[k]["details"]["error"] for k in ECHOED)
    assert any(s.provider == "chat" for s in api.seen)

    blobs = files_under(tmp_path / "runs", tmp_path / "cache")
    for i, captured in enumerate(outputs):
        blobs[f"stdout {i}"] = captured.out.encode()
        blobs[f"stderr {i}"] = captured.err.encode()
    blobs["log"] = caplog.text.encode()
    assert any("retry 1/1" in r.getMessage() for r in caplog.records)  # -v logged the retries
    assert leaks(blobs) == []
    assert len(blobs) > 20


def test_the_checker_itself_finds_every_form():
    """The assertion above is only as good as `leaks`: it must see each encoded form."""
    for form in encoded_forms(KEY):
        assert leaks({"x": f"..{form[3:14]}..".encode()}) != [], form
    assert leaks({"x": f"..{KEY[: MIN_SECRET_RUN - 1]}..".encode()}) == []
