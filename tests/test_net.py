"""net.py on its own: the redactor's forms and cut, and a timeout that bounds a whole attempt."""

from __future__ import annotations

import base64
import html
import json
import time
from urllib.parse import quote, quote_plus

import pytest
from fake_image_api import DRIBBLE_EVERY, FakeImageAPI

from t2i_eval.net import (
    MARK,
    MIN_SECRET_RUN,
    HttpClient,
    Redactor,
    TransientError,
    environment_redactor,
)

#: '/', '+' and '=' make every encoding of it differ from the key itself.
KEY = "sk-Rd4c/T+est=Key/9f3Xq+Zw=="


def runs(key: str, n: int = MIN_SECRET_RUN) -> set[str]:
    return {key[i : i + n] for i in range(len(key) - n + 1)}


def leaked(text: str, key: str = KEY) -> list[str]:
    return sorted(r for r in runs(key) if r in text)


def lower_hex(quoted: str) -> str:
    return "".join(c.lower() if c in "0123456789ABCDEF" else c for c in quoted)


ECHOES = {
    "raw": KEY,
    "json": json.dumps({"k": KEY}),
    "json with \\/": json.dumps(KEY).replace("/", "\\/"),
    "json \\u escapes": "".join(f"\\u{ord(c):04x}" if c in "/+=" else c for c in KEY),
    "quote": quote(KEY, safe=""),
    "quote, lower-case hex": lower_hex(quote(KEY, safe="")),
    "quote_plus": quote_plus(KEY),
    "quoted inside JSON inside HTML": html.escape(json.dumps(quote(KEY, safe=""))),
    "html references": "".join(f"&#x{ord(c):x};" for c in KEY),
    "base64 user:key": base64.b64encode(f"alice:{KEY}".encode()).decode(),
    "base64 :key": base64.b64encode(f":{KEY}".encode()).decode(),
    "base64 key:": base64.b64encode(f"{KEY}:".encode()).decode(),
    "base64 key": base64.b64encode(KEY.encode()).decode(),
    "url-safe base64": base64.urlsafe_b64encode(f"bo:{KEY}".encode()).decode(),
    "a header dump": f"Authorization: Bearer {KEY}\r\nHost: x",
    "cut by the server": KEY[:-5] + "...",
}


@pytest.mark.parametrize("form", list(ECHOES))
def test_every_form_a_server_may_echo_is_redacted(form):
    echo = ECHOES[form]
    redact = Redactor([f"Bearer {KEY}"])
    out = redact(f"<p>error near {echo} here</p>")
    assert MARK in out and out.startswith("<p>error near ") and out.endswith(" here</p>")
    assert leaked(out) == []
    for encoded in (quote(KEY, safe=""), base64.b64encode(KEY.encode()).decode()):
        assert leaked(out, encoded) == []


@pytest.mark.parametrize("at", range(185, 206, 4))
def test_a_key_straddling_the_cut_leaves_nothing_behind(at):
    """The old order (cut at 200, then redact) left the key's first characters in the record."""
    text = "x" * at + KEY + "y" * 50
    out = Redactor([KEY])(text, limit=200)
    assert leaked(out) == [] and out.startswith("x" * min(at, 200))
    assert len(out) <= 200 + len(MARK)  # the cut stays a cut
    assert Redactor([KEY])("x" * 10 + KEY, limit=5) == "xxxxx"


def test_ordinary_text_is_left_alone():
    redact = Redactor([KEY])
    text = "HTTP 500: upstream timed out (sk-other, Bearer, Key, ==, /+)"
    assert redact(text) == text
    assert Redactor([])(text, limit=8) == text[:8] and not Redactor(["short"])
    assert KEY not in repr(redact) and "runs" in repr(redact)


def test_scrub_reaches_into_records_and_exceptions():
    redact = Redactor([KEY])
    record = {"error": f"bad {KEY}", "nested": [quote(KEY, safe=""), 3], KEY: True}
    assert leaked(json.dumps(redact.scrub(record))) == []
    e = TransientError(f"HTTP 500: {KEY}")
    redact.exception(e)
    assert leaked(e.message) == [] and leaked(str(e)) == []


@pytest.mark.parametrize("kind", ["dribble", "dribblebody"])
def test_timeout_is_a_deadline_for_the_whole_attempt(kind):
    """A server sending one byte every 0.4 s never trips a per-read timeout of 1.5 s; the
    attempt must still end at about 1.5 s (it used to take as long as the server liked)."""
    timeout = 1.5
    with FakeImageAPI() as api:
        client = HttpClient("t", timeout=timeout, max_attempts=1)
        body = json.dumps({"input": {"text": f"slow [{kind}]"}}).encode()
        start = time.monotonic()
        with pytest.raises(TransientError, match=r"timed out: no complete answer within 1.5 s"):
            client.request("POST", f"{api.url}/generic", lambda r: r, body=body)
        took = time.monotonic() - start
    assert timeout > DRIBBLE_EVERY  # each read is quick: only a deadline can stop it
    assert took < timeout + 2.0, took  # generous margin; the dribble would last 8 s or more


def test_an_answer_within_the_deadline_is_whole():
    with FakeImageAPI() as api:
        client = HttpClient("t", timeout=5.0, max_attempts=1)
        body = json.dumps({"input": {"text": "fast [ok]", "seed": 1}}).encode()
        resp = client.request("POST", f"{api.url}/generic", lambda r: r, body=body)
    assert resp.status == 200 and "image" in resp.json()["output"]


def test_environment_redactor_knows_every_credential_variable(monkeypatch):
    monkeypatch.setenv("SOME_API_KEY", KEY)
    monkeypatch.setenv("PLAIN_NAME", "value-of-a-plain-variable")
    text = f"Traceback ... {quote(KEY, safe='')} ... value-of-a-plain-variable"
    assert leaked(environment_redactor()(text)) == []
    assert "value-of-a-plain-variable" in environment_redactor()(text)
    assert MARK in environment_redactor(["PLAIN_NAME"])(text).rsplit("...", 1)[1]
