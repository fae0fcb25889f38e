"""`http`: any JSON image API as a generator, described by values in the system spec."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, ClassVar
from urllib.parse import parse_qsl, quote, unquote, urlparse

from ...errors import UserError
from ...net import (
    ENV_REF,
    MIN_SECRET_LEN,
    REDACTED,
    SENSITIVE_NAME,
    SENSITIVE_QUERY,
    Response,
    TransientError,
    check_url,
    is_reference,
    redact_options,
)
from .base import (
    JSON_HEADERS,
    ImageAPI,
    NoImage,
    Options,
    Outcome,
    decode_base64_image,
    dig,
    env_secret,
    read_key,
)


def _lost(who: str, what: str) -> UserError:
    """A spec read back from a run's manifest, which keeps no literal values (see
    `net.redact_options`): it cannot be sent as it was."""
    return UserError(
        f"{who}: {what} reads '{REDACTED}': a run's manifest keeps only names and ${{VAR}} "
        "references, so a spec read back from one (e.g. by `t2i-eval rewrite`) has lost that "
        "value; write it as '${MY_VAR}' in the system spec, export MY_VAR, and run again"
    )


@dataclass(kw_only=True, eq=False)
class HttpImageAPI(ImageAPI):
    """Any JSON image API, described by values only (STYLE.md 5: no code in config).

    The request is `method url` with `headers` (values may hold `${ENV_VAR}`, resolved per
    request and never stored; so may the URL's path and query, for APIs that take the key as
    `?key=...`) and a JSON `body` template whose strings may hold `{prompt}` and
    `{seed}` (a string that is exactly `"{seed}"` becomes a number). The image is the value at
    the dotted `image_path`: base64, a data URI or a URL. A refusal is an answer whose HTTP
    status is in `refuse_status`, or whose text at `message_path` matches `refuse_match`.
    """

    name: ClassVar[str] = "http"
    provider: ClassVar[str] = "http"

    url: str = ""
    """The endpoint (https, unless the host is this machine or nothing secret is sent); a key
    in the query only as a reference, e.g. `https://host/gen?key=${MY_API_KEY}`."""
    method: str = "POST"
    """POST or PUT."""
    headers: dict[str, str] | None = None
    """Extra headers; credentials only as `${ENV_VAR}` references."""
    body: Any = None
    """JSON template with `{prompt}` (required) and optionally `{seed}`; default {prompt: ...}."""
    image_path: str = ""
    """Dotted path to the image in the answer, e.g. `data.0.b64_json` or `images.0.url`."""
    message_path: str | None = None
    """Dotted path to the provider's message (refusal text), e.g. `error.message`."""
    refuse_status: list[int] | None = None
    """HTTP statuses that mean a policy refusal, e.g. [451]."""
    refuse_match: str | None = None
    """Regex on the text at `message_path` that means a refusal (any status)."""
    refuse_missing_image: bool = False
    """A success answer without an image is a refusal (else an error)."""
    model: str = ""
    """A label for reports (the model behind the endpoint)."""

    @classmethod
    def listing(cls) -> str:
        """No default model or key: everything comes from the spec."""
        return "your url, headers (${VAR} for secrets), body template, image_path: see README"

    def _validate(self, v: Options) -> None:
        if not isinstance(self.url, str) or not self.url:
            raise v.fail("url", "the endpoint URL", self.url, show=False)
        if not isinstance(self.method, str) or self.method.upper() not in ("POST", "PUT"):
            raise v.fail("method", "POST or PUT", self.method)
        self.method = self.method.upper()
        self._check_headers(v)
        self._check_url()
        self._check_missing_env()
        self._check_body(v)
        if not isinstance(self.image_path, str) or not self.image_path:
            raise v.fail("image_path", "a dotted path such as data.0.b64_json", self.image_path)
        self._check_refusal_rules(v)

    def _check_headers(self, v: Options) -> None:
        """Credentials only as ${VAR} references: the spec is written into every manifest."""
        if self.headers is None:
            self.headers = {}
        if not isinstance(self.headers, dict) or not all(
            isinstance(k, str) and isinstance(val, str) for k, val in self.headers.items()
        ):  # never echoed: a header value may be a key
            raise v.fail("headers", "a mapping of header name -> string", self.headers, show=False)
        for key, value in self.headers.items():
            if REDACTED in value:
                raise _lost(self.name, f"header '{key}'")
            if SENSITIVE_NAME.search(key) and not is_reference(value):
                raise UserError(
                    f"{self.name}: header '{key}' holds a literal value; write it as "
                    f"'${{MY_API_KEY}}' (e.g. 'Bearer ${{MY_API_KEY}}') and export MY_API_KEY, so "
                    "the key is never written into the run's manifest"
                )

    def _check_url(self) -> None:
        """`${VAR}` only in the path and query; a sensitive query parameter only as one."""
        what = f"{self.name}: url"
        if REDACTED in unquote(self.url):
            raise _lost(self.name, "a value in the url")
        parsed = urlparse(self.url)
        if "${" in f"{parsed.scheme}://{parsed.netloc}":
            raise UserError(f"{what}: environment variables may appear in the path and query only")
        for name, value in parse_qsl(parsed.query, keep_blank_values=True):
            if SENSITIVE_QUERY.search(name) and not ENV_REF.fullmatch(value):
                raise UserError(
                    f"{what}: query parameter '{name}' holds a literal value; write it as "
                    f"'{name}=${{MY_API_KEY}}' and export MY_API_KEY, so the key is never "
                    "written into the run's manifest"
                )
        check_url(self.url, what, secret=bool(self._env_refs()))

    def _check_missing_env(self) -> None:
        if self.checking:
            return
        for var in dict.fromkeys(self._env_refs()):
            read_key(var, self.name)

    def _check_body(self, v: Options) -> None:
        if self.body is None:
            self.body = {"prompt": "{prompt}"}
        try:
            template = json.dumps(self.body)
        except (TypeError, ValueError):
            raise v.fail(
                "body", "a JSON value (mapping, list or string)", self.body, show=False
            ) from None
        if "{prompt}" not in template:
            raise v.fail("body", "a template containing {prompt}", redact_options(self.body))
        if "${" in template:
            raise UserError(
                f"{self.name}: the body template holds '${{...}}'; environment variables are "
                "resolved in headers and the URL only (put the key in a header)"
            )
        if redact_options(self.body) != self.body:
            raise UserError(
                f"{self.name}: the body template holds a literal value under a credential-like "
                "name (value not shown); send the key in a header as '${MY_API_KEY}', so it is "
                "never written into the run's manifest"
            )
        self.sends_seed = "{seed}" in template

    def _check_refusal_rules(self, v: Options) -> None:
        if self.message_path is not None and not isinstance(self.message_path, str):
            raise v.fail("message_path", "a dotted path such as error.message", self.message_path)
        statuses = self.refuse_status or []
        if not isinstance(statuses, list) or not all(
            isinstance(s, int) and (200 <= s < 300 or 400 <= s < 500) and s not in (408, 429)
            for s in statuses
        ):
            raise v.fail(
                "refuse_status",
                "a list of 2xx/4xx statuses (408, 429 and 5xx are always retried)",
                self.refuse_status,
            )
        self.refuse_status = statuses
        self._refuse_re = None
        if self.refuse_match is not None:
            if self.message_path is None:
                raise UserError(f"{self.name}: option 'refuse_match' needs 'message_path'")
            try:
                self._refuse_re = re.compile(self.refuse_match)
            except (re.error, TypeError):
                raise v.fail(
                    "refuse_match", "a valid regular expression", self.refuse_match
                ) from None
        v.boolean("refuse_missing_image", self.refuse_missing_image)

    def _env_refs(self) -> list[str]:
        """Variables named in the headers and the URL (each holds a credential)."""
        values = [*(self.headers or {}).values(), self.url]
        return [r for value in values for r in ENV_REF.findall(value)]

    @property
    def endpoint(self) -> str:
        """The URL template (`${VAR}` unresolved): what info() and manifests show."""
        return self.url

    def _request_url(self) -> str:
        return ENV_REF.sub(lambda m: quote(read_key(m.group(1), self.name), safe=""), self.url)

    @property
    def label(self) -> str:
        return self.model

    def _method(self) -> str:
        return self.method

    def _headers(self) -> dict[str, str]:
        plain = {k: v for k, v in (self.headers or {}).items() if not ENV_REF.search(v)}
        return {**JSON_HEADERS, **plain}

    def _auth(self) -> dict[str, str]:
        out = {}
        for key, value in (self.headers or {}).items():
            if ENV_REF.search(value):
                out[key] = ENV_REF.sub(lambda m: self._env(m.group(1)), value)
        return out

    def _env(self, var: str) -> str:
        return read_key(var, self.name)

    def _secrets(self) -> list[str]:
        """The keys in the variables it names, and every literal header and query value: a
        key can sit under any name (`X-Api: KEY`, `?code=KEY`), and an echo of one is scrubbed
        as an echo of a key is."""
        keys = [s for var in dict.fromkeys(self._env_refs()) for s in env_secret(var)]
        literals = [v for v in (self.headers or {}).values() if not ENV_REF.search(v)]
        literals += [
            v for _, v in parse_qsl(urlparse(self.url).query) if v and not ENV_REF.search(v)
        ]
        return [*keys, *(v for v in literals if len(v) >= MIN_SECRET_LEN)]

    def _body(self, text: str, seed: int) -> Any:
        def fill(node: Any) -> Any:
            if isinstance(node, dict):
                return {k: fill(v) for k, v in node.items()}
            if isinstance(node, list):
                return [fill(v) for v in node]
            if node == "{seed}":
                return seed
            if isinstance(node, str):
                return node.replace("{prompt}", text).replace("{seed}", str(seed))
            return node

        return fill(self.body)

    def _info_extra(self) -> dict[str, Any]:
        return {"method": self.method}

    def _options(self) -> dict[str, Any]:
        return {  # templates: ${VAR} references, never values (info() redacts the rest)
            "headers": dict(self.headers or {}),
            "body": self.body,
            "image_path": self.image_path,
            "message_path": self.message_path,
            "refuse_status": self.refuse_status,
            "refuse_match": self.refuse_match,
            "refuse_missing_image": self.refuse_missing_image,
        }

    def _parse(self, resp: Response) -> Outcome:
        try:
            body = json.loads(resp.body)
        except (ValueError, UnicodeDecodeError):
            body = None
        message = dig(body, self.message_path) if self.message_path and body is not None else None
        text = str(message) if message is not None else ""
        if resp.status in (self.refuse_status or []):
            return Outcome(True, text or resp.snippet() or f"HTTP {resp.status}")
        if self._refuse_re is not None and text and self._refuse_re.search(text):
            return Outcome(True, text)
        if resp.status >= 400:
            return Outcome(None, f"HTTP {resp.status}: {text or resp.snippet()}")
        if body is None:
            raise TransientError(f"malformed JSON body (HTTP {resp.status})")
        value = dig(body, self.image_path)
        if value is not None and not isinstance(value, str):
            raise TransientError(
                f"malformed body: '{self.image_path}' is {type(value).__name__}, not text"
            )
        if not value:
            note = f"no image at '{self.image_path}'"
            if self.refuse_missing_image:
                return Outcome(True, text or note, raw={"missing_image": True})
            return Outcome(None, note, raw={"missing_image": True})
        try:
            if value.startswith(("data:", "http://", "https://")):
                return Outcome(False, image=self._image_at(value))
            return Outcome(False, image=decode_base64_image(value))
        except NoImage as e:
            return Outcome(None, str(e))
