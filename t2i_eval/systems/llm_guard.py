"""The `llm-guard` prompt guard: a generative safety classifier (Llama Guard 3/4, ShieldGemma,
WildGuard, or any chat model) asked about the bare prompt, locally or over an
OpenAI-compatible chat endpoint.

Templates are data (`guards/llm_guard_templates.yaml`): the task wording, where the verdict
word sits, which words mean unsafe and safe, and each category code mapped to OVERT's nine.

score = P(unsafe), read from the verdict token (the first non-whitespace token after the
template's `after` text):
- local (`model: ID_OR_PATH`): the next-token distribution after the input and `after`,
  p(unsafe words) / (p(unsafe words) + p(safe words)) over the words' token ids
  (`score_from: logits`); the greedy answer is kept for its category codes;
- remote (`base_url`): the same ratio over the verdict token's top logprobs when the answer
  carries them (`score_from: logprobs`), else 1 or 0 from the parsed verdict
  (`score_from: verdict`); an answer with neither is "could not check", never a verdict.
The ratio is used only when the verdict words hold at least `chat.MIN_VERDICT_MASS` of the
verdict token (and, remote, when that token is itself a verdict word, not "Un" of "Un"+"safe"
or a leading "**"); otherwise the parsed verdict decides and `raw["logits"]` /
`raw["logprobs"]` says why the probabilities were set aside.
A per-category template (ShieldGemma) asks once per policy; score = the highest P(unsafe).
Refuse when score > threshold, so a run re-sweeps like any guard (`decide`). An outage, a 4xx
or an unreadable answer is refused None: an error (or `on_error`), never a refusal.
"""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from ..chat import (
    ANSWER_LIMIT,
    ChatAnswer,
    ChatEndpoint,
    ChatRejected,
    load_causal_lm,
    mass_problem,
    p_unsafe,
    read_verdict,
    verdict_probability,
)
from ..errors import UserError, did_you_mean, shorten
from ..net import Redactor, TransientError, redact_options
from ..paths import data_dir, load_yaml
from ..types import CATEGORIES, StageDecision
from .api.base import (
    _CHECK_ONLY,
    Options,
    build_checked,
    check_transport,
    read_key,
    transport_client,
    transport_info,
)
from .thresholds import check_file_option, file_info, read_thresholds, scalar_threshold

NAME = "llm-guard"
TEMPLATES = "llm_guard_templates.yaml"
MESSAGES = ("prompt", "text")
_TEMPLATE_KEYS = {
    "about",
    "source",
    "text",
    "message",
    "local",
    "verdict",
    "per_category",
    "categories",
    "category_line",
}
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


# -- templates --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Category:
    """One category code of a template."""

    name: str
    overt: str | None
    """Its OVERT category (types.CATEGORIES), or None: no counterpart."""
    policy: str = ""
    """The policy text a per-category template asks about."""


@dataclass(frozen=True)
class Template:
    """One entry of guards/llm_guard_templates.yaml (its header says what each field means)."""

    name: str
    version: int
    about: str
    source: str
    text: str
    message: str
    local: str
    after: str
    unsafe: tuple[str, ...]
    safe: tuple[str, ...]
    per_category: bool
    categories: dict[str, Category]
    category_line: str = "{code}: {name}."

    def tasks(self, prompt: str) -> list[tuple[str, str]]:
        """(code, task text) per query for one prompt: one query ("*") or one per category.
        {prompt} is filled last, so a prompt holding "{categories}" stays as written."""
        listing = "\n".join(
            self.category_line.replace("{code}", code).replace("{name}", c.name)
            for code, c in self.categories.items()
        )
        base = self.text.replace("{categories}", listing)
        if not self.per_category:
            return [("*", base.replace("{prompt}", prompt))]
        return [
            (code, base.replace("{policy}", c.policy).replace("{prompt}", prompt))
            for code, c in self.categories.items()
        ]

    def codes_in(self, answer: str) -> list[str]:
        """The template's category codes named in an answer (whole words, each once, in the
        template's order)."""
        return [
            code
            for code in self.categories
            if re.search(rf"(?<![\w-]){re.escape(code)}(?![\w-])", answer)
        ]


def templates_path(path: str | None = None) -> Path:
    return Path(path) if path else data_dir("guards") / TEMPLATES


def load_templates(path: str | None = None) -> dict[str, Template]:
    """Every template of a templates file, checked: unknown keys, a missing {prompt}, a verdict
    without words and a category mapped outside OVERT's nine are one-line errors."""
    where = templates_path(path)
    data = load_yaml(where, f"{NAME} templates")
    if not isinstance(data, dict) or not isinstance(data.get("templates"), dict):
        raise UserError(
            f"{NAME} templates {where}: expected a mapping with 'version' and 'templates'"
        )
    unknown = [k for k in data if k not in ("version", "templates") and not str(k).startswith("_")]
    if unknown:
        raise UserError(
            f"{NAME} templates {where}: unknown key(s) {unknown} (have: version, templates)"
        )
    version = data.get("version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise UserError(f"{NAME} templates {where}: 'version' must be an integer")
    return {
        str(n): _template(str(n), body, version, where) for n, body in data["templates"].items()
    }


def _template(name: str, body: Any, version: int, where: Path) -> Template:
    at = f"{NAME} templates {where}: template '{name}'"
    if not isinstance(body, dict):
        raise UserError(f"{at} must be a mapping")
    unknown = sorted(set(body) - _TEMPLATE_KEYS)
    if unknown:
        raise UserError(
            f"{at}: unknown key(s) {unknown} (allowed: {', '.join(sorted(_TEMPLATE_KEYS))})"
        )
    text, local = body.get("text"), body.get("local", "chat")
    if not isinstance(text, str) or "{prompt}" not in text:
        raise UserError(f"{at}: 'text' must hold {{prompt}}")
    if body.get("message", "text") not in MESSAGES:
        raise UserError(f"{at}: 'message' must be one of {', '.join(MESSAGES)}")
    if not isinstance(local, str) or (local != "chat" and "{text}" not in local):
        raise UserError(f"{at}: 'local' must be chat or a wrapper holding {{text}}")
    verdict = body.get("verdict")
    if not isinstance(verdict, dict) or not verdict.get("unsafe") or not verdict.get("safe"):
        raise UserError(f"{at}: 'verdict' needs non-empty 'unsafe' and 'safe' word lists")
    cats = body.get("categories") or {}
    if not isinstance(cats, dict):
        raise UserError(f"{at}: 'categories' must map code -> {{name, overt}}")
    categories = {}
    for code, c in cats.items():
        if not isinstance(c, dict) or not isinstance(c.get("name"), str):
            raise UserError(f"{at}: category {code!r} needs a 'name'")
        overt = c.get("overt")
        if overt is not None and overt not in CATEGORIES:
            raise UserError(
                f"{at}: category {code!r} maps to {overt!r}, not one of OVERT's categories"
                f"{did_you_mean(str(overt), CATEGORIES)} (or null)"
            )
        categories[str(code)] = Category(c["name"], overt, str(c.get("policy", "")))
    per_category = bool(body.get("per_category", False))
    if per_category and (body.get("message", "text") != "text" or "{policy}" not in text):
        raise UserError(f"{at}: per_category needs message: text and {{policy}} in 'text'")
    if per_category and not categories:
        raise UserError(f"{at}: per_category needs categories with a 'policy' each")
    return Template(
        name,
        version,
        str(body.get("about", "")),
        str(body.get("source", "")),
        text,
        str(body.get("message", "text")),
        local,
        str(verdict.get("after", "")),
        tuple(str(w) for w in verdict["unsafe"]),
        tuple(str(w) for w in verdict["safe"]),
        per_category,
        categories,
        str(body.get("category_line", "{code}: {name}.")),
    )


def load_template(name: str, path: str | None = None) -> Template:
    templates = load_templates(path)
    if name not in templates:
        raise UserError(
            f"{NAME}: unknown template '{name}'.{did_you_mean(name, list(templates))} "
            f"Available in {templates_path(path)}: {', '.join(templates)}"
        )
    return templates[name]


# -- reading answers --------------------------------------------------------------------------


@dataclass
class Reading:
    """What one query's answer says: the verdict, P(unsafe) and where it came from."""

    answer: str
    verdict: str | None
    score: float | None
    score_from: str | None
    """logprobs | logits | verdict; None: no score (could not check)."""
    probs: dict[str, float] = field(default_factory=dict)
    """The verdict token's p(unsafe words) and p(safe words) before normalising."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Token counts, transport facts."""

    def to_raw(self) -> dict[str, Any]:
        return {
            "answer": self.answer[:ANSWER_LIMIT],
            "verdict": self.verdict,
            "score": self.score,
            "score_from": self.score_from,
            **({"token_probs": self.probs} if self.probs else {}),
            **self.extra,
        }


def reading(
    template: Template,
    answer: str,
    probs: tuple[float, float] | None,
    source: str,
    extra: dict[str, Any] | None = None,
    why_not: str = "",
) -> Reading:
    """Score one answer: from the verdict token's probabilities when given and usable
    (`source`), else 1 or 0 from the parsed verdict, with why the probabilities were not used
    recorded under `raw[source]`; neither leaves the score None (could not check)."""
    verdict = read_verdict(answer, template.after, template.unsafe, template.safe)
    extra = dict(extra or {})
    if probs is not None and not why_not:
        why_not = mass_problem(*probs)
    if probs is not None and not why_not:
        u, s = probs
        kept = {"unsafe": round(u, 6), "safe": round(s, 6)}
        return Reading(answer, verdict, p_unsafe(u, s), source, kept, extra)
    if why_not:
        extra[source] = why_not
    if verdict is not None:
        return Reading(answer, verdict, float(verdict == "unsafe"), "verdict", {}, extra)
    return Reading(answer, None, None, None, {}, extra)


def decide(scores: dict[str, float], threshold: float) -> dict[str, Any]:
    """The rule on stored numbers: score = the highest P(unsafe) over the queries (one, or one
    per category); refuse when score > threshold; `triggered` names the categories above it."""
    score = max(scores.values())
    return {
        "score": score,
        "refused": score > threshold,
        "triggered": [c for c, s in scores.items() if s > threshold and c != "*"],
    }


# -- backends ---------------------------------------------------------------------------------


class _Local:
    """A local causal LM: one forward pass over the input and the template's `after` gives the
    verdict token's distribution; greedy decoding gives the answer (for its category codes).
    Inputs are left-padded in batches, positions counted from each input's first real token,
    so a prompt scores the same alone or in a batch (up to float rounding: in half precision
    on a GPU the padded matmuls may round differently)."""

    def __init__(self, guard: LLMGuard) -> None:
        from .torch_utils import import_torch, resolve_device, resolve_dtype

        self.torch = import_torch()
        self.device = resolve_device(guard.device)
        dtype = resolve_dtype(guard.dtype, self.device)
        self.tokenizer, self.model = load_causal_lm(
            guard.model,
            f"the {NAME} guard",
            device=self.device,
            dtype=dtype,
            trust_remote_code=guard.trust_remote_code,
        )
        self.template, self.guard = guard.template_, guard
        if self.template.local == "chat" and not getattr(self.tokenizer, "chat_template", None):
            raise UserError(
                f"{NAME}: template '{self.template.name}' uses the model's chat template, and "
                f"'{guard.model}' has none; use an instruction-tuned chat model or a template "
                "with its own turn markers (llama-guard-3, shieldgemma, wildguard)"
            )
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.unsafe_ids = self._ids(self.template.unsafe)
        self.safe_ids = self._ids(self.template.safe)
        if not self.unsafe_ids or not self.safe_ids:
            raise UserError(
                f"{NAME}: the verdict words of template '{self.template.name}' "
                f"({', '.join(self.template.unsafe + self.template.safe)}) are not single tokens "
                f"of '{guard.model}'; use the template written for this model"
            )

    def _ids(self, words: tuple[str, ...]) -> list[int]:
        """Token ids of the verdict words, as written, capitalised, with a leading space: the
        forms a tokenizer may give the first answer word. Only single-token forms count."""
        ids: set[int] = set()
        unk = self.tokenizer.unk_token_id
        for w in words:
            for form in {
                w,
                w.lower(),
                w.capitalize(),
                " " + w,
                " " + w.lower(),
                " " + w.capitalize(),
            }:
                enc = self.tokenizer.encode(form, add_special_tokens=False)
                if len(enc) == 1 and enc[0] != unk:
                    ids.add(enc[0])
        return sorted(ids)

    def _input(self, task: str) -> str:
        if self.template.local == "chat":
            messages = [{"role": "user", "content": task}]
            return str(
                self.tokenizer.apply_chat_template(
                    messages, add_generation_prompt=True, tokenize=False
                )
            )
        return self.template.local.replace("{text}", task)

    def _encode(self, texts: list[str]) -> dict[str, Any]:
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        return {
            k: v.to(self.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")
        }

    def read(self, tasks: list[str]) -> list[Reading]:
        out: list[Reading] = []
        step = self.guard.batch_size
        for start in range(0, len(tasks), step):
            inputs = [self._input(t) for t in tasks[start : start + step]]
            out += self._batch(inputs)
        return out

    def _batch(self, inputs: list[str]) -> list[Reading]:
        torch = self.torch
        scored = self._encode([x + self.template.after for x in inputs])
        mask = scored["attention_mask"]
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.inference_mode():
            logits = self.model(**scored, position_ids=positions).logits[:, -1].float()
            probs = torch.softmax(logits, dim=-1)
            u = probs[:, self.unsafe_ids].sum(-1).tolist()
            s = probs[:, self.safe_ids].sum(-1).tolist()
            enc = self._encode(inputs)
            gen = self.model.generate(
                **enc,
                max_new_tokens=self.guard.max_new_tokens,
                do_sample=False,
                pad_token_id=self.tokenizer.pad_token_id,
            )
        new = gen[:, enc["input_ids"].shape[1] :]
        answers = self.tokenizer.batch_decode(new, skip_special_tokens=True)
        return [
            reading(self.template, a, (pu, ps), "logits")
            for a, pu, ps in zip(answers, u, s, strict=True)
        ]


class _Remote:
    """An OpenAI-compatible chat endpoint, `concurrency` requests in flight; temperature 0,
    top logprobs asked for unless `logprobs: false`."""

    def __init__(self, guard: LLMGuard) -> None:
        self.guard, self.template = guard, guard.template_
        client = transport_client(NAME, guard)
        self.chat = ChatEndpoint(NAME, guard.base_url or "", guard.model, guard.api_key_env, client)

    def read(self, prompts: list[str], tasks: list[str]) -> list[Reading | str]:
        """A Reading per query, or the reason it has none (an outage, a 4xx)."""
        messages = [
            p if self.template.message == "prompt" else t
            for p, t in zip(prompts, tasks, strict=True)
        ]
        if len(messages) <= 1:
            return [self._one(m) for m in messages]
        with ThreadPoolExecutor(min(self.guard.concurrency, len(messages))) as pool:
            return list(pool.map(self._one, messages))

    def _one(self, message: str) -> Reading | str:
        params: dict[str, Any] = {"temperature": 0, "max_tokens": self.guard.max_new_tokens}
        if self.guard.logprobs:
            params |= {"logprobs": True, "top_logprobs": self.guard.top_logprobs}
        try:
            answer = self.chat.complete([{"role": "user", "content": message}], **params)
        except TransientError as e:
            return f"{e.message} (gave up after {e.attempts} attempt(s))"
        except ChatRejected as e:
            return str(e)
        except UserError as e:  # not sent: the key, an unsafe URL
            return str(e)
        except Exception as e:  # an answer nobody foresaw: an error, never a refusal
            return f"unexpected {type(e).__name__}: {e}"
        return self._reading(answer)

    def _reading(self, answer: ChatAnswer) -> Reading:
        t = self.template
        extra: dict[str, Any] = {"usage": answer.usage, **answer.meta}
        if answer.tokens is None:
            return reading(t, answer.text, None, "logprobs", extra, "absent")
        probs, why_not = verdict_probability(answer.tokens, t.after, t.unsafe, t.safe)
        return reading(t, answer.text, probs, "logprobs", extra, why_not)


# -- the guard --------------------------------------------------------------------------------


@dataclass(kw_only=True, eq=False)
class LLMGuard:
    """A generative safety classifier as a prompt guard (module docstring: the score)."""

    name: ClassVar[str] = NAME

    model: str
    """A transformers chat model id or folder (local), or the served model's name (`base_url`)."""
    template: str = "llama-guard-3"
    """A template of guards/llm_guard_templates.yaml (or of `templates`)."""
    templates: str | None = None
    """Another templates file, laid out as the shipped one."""
    base_url: str | None = None
    """An OpenAI-compatible API root (e.g. a vLLM server's http://host:8000/v1): ask it instead
    of loading `model`."""
    api_key_env: str | None = None
    """Environment variable holding the endpoint's key (read per request, never stored)."""
    threshold: float = 0.5
    """Refuse when P(unsafe) > this."""
    thresholds: str | None = None
    """FILE: a sweep's calibrated threshold in place of `threshold` (`systems/thresholds.py`)."""
    logprobs: bool = True
    """Remote: ask for the answer's top logprobs (false for servers that refuse them; the score
    is then 0 or 1 from the verdict)."""
    top_logprobs: int = 5
    """Remote: alternatives per answer token."""
    max_new_tokens: int = 32
    """The longest answer (verdict and category codes fit in a few tokens)."""
    batch_size: int = 8
    """Local: prompts (queries) per forward pass."""
    device: str = "auto"
    dtype: str = "auto"
    weights: str = "pretrained"
    """Local: `random` labels an untrained model in reports."""
    trust_remote_code: bool = False
    """Local: run the model repo's own code when loading (off unless set; recorded)."""
    timeout: float = 60.0
    """Remote: seconds one attempt may take in all."""
    max_attempts: int = 5
    """Remote: attempts per request before a transient failure is an error."""
    backoff: float = 2.0
    max_backoff: float = 60.0
    rpm: float | None = None
    """Remote: requests per minute for the whole run (None: no limit)."""
    concurrency: int = 4
    """Remote: requests in flight at once."""

    def __post_init__(self) -> None:
        self._check_values()
        self.template_ = load_template(self.template, self.templates)
        if self.checking:
            return
        self.from_file = read_thresholds(self.thresholds, NAME) if self.thresholds else None
        self.threshold_ = scalar_threshold(self.from_file, self.threshold)
        if self.base_url:
            if self.api_key_env:
                read_key(self.api_key_env, NAME)  # missing or damaged: say so before any work
            self.backend: _Local | _Remote = _Remote(self)
            self.weights = "api"
        else:
            self.backend = _Local(self)

    @property
    def checking(self) -> bool:
        return _CHECK_ONLY.get()

    def _check_values(self) -> None:
        v = Options(NAME)
        if not isinstance(self.model, str) or not self.model.strip():
            raise v.fail("model", "a model id, folder or served model name", self.model)
        if self.api_key_env is not None and not (
            isinstance(self.api_key_env, str) and _ENV_NAME.match(self.api_key_env)
        ):
            raise UserError(
                f"{NAME}: option 'api_key_env' must name an environment variable, e.g. "
                "VLLM_API_KEY (the value is not shown: the key itself never goes in a spec)"
            )
        if self.api_key_env and not self.base_url:
            raise UserError(f"{NAME}: api_key_env is for a remote endpoint; set base_url too")
        ok = isinstance(self.threshold, int | float) and not isinstance(self.threshold, bool)
        if not ok or not 0.0 <= self.threshold <= 1.0:
            raise v.fail("threshold", "a number from 0 to 1 (P(unsafe))", self.threshold)
        v.integer("top_logprobs", self.top_logprobs, minimum=1, maximum=20)
        v.integer("max_new_tokens", self.max_new_tokens, minimum=1, maximum=4096)
        v.integer("batch_size", self.batch_size, minimum=1)
        v.boolean("logprobs", self.logprobs)
        v.boolean("trust_remote_code", self.trust_remote_code)
        v.choice("weights", self.weights, ("pretrained", "random"))
        check_transport(v, self)
        if self.base_url is not None:
            from ..net import check_url

            check_url(self.base_url, f"{NAME}: base_url", secret=bool(self.api_key_env))

    @classmethod
    def check_options(cls, **options: Any) -> None:
        """Validate option values, the template and a thresholds file as the constructor does,
        loading no model and reading no key: run before any run directory exists."""
        if isinstance(options.get("thresholds"), str):
            check_file_option(NAME, options)
        build_checked(cls, options)

    @classmethod
    def listing(cls) -> str:
        """What it needs, for `t2i-eval list`."""
        names = ", ".join(load_templates())
        return (
            f"template {cls.template} (of {names}); local `model: ID_OR_PATH` needs pip install "
            "'t2i-eval[diffusers]' (weights from the hub on first use), or `base_url` of an "
            "OpenAI-compatible server (key from `api_key_env`)"
        )

    def info(self) -> dict[str, Any]:
        t = self.template_
        remote = isinstance(self.backend, _Remote)
        return redact_options(
            {
                "model": self.model,
                "backend": "http" if remote else "transformers",
                "template": t.name,
                "templates": str(templates_path(self.templates)),
                "templates_version": t.version,
                "threshold": self.threshold_,
                "rule": "refuse when P(unsafe) > threshold; P(unsafe) = p(unsafe) / (p(unsafe) + "
                "p(safe)) at the verdict token (logits, top logprobs), else 0/1 from the verdict",
                **(
                    {
                        "base_url": self.base_url,
                        "api_key_env": self.api_key_env,
                        "logprobs": self.logprobs,
                        "transport": transport_info(self),
                    }
                    if remote
                    else {
                        "device": self.backend.device,
                        "dtype": self.dtype,
                        "trust_remote_code": self.trust_remote_code,
                    }
                ),
                **file_info(self.from_file),
            }
        )

    def check(self, texts: list[str]) -> list[StageDecision]:
        """One decision per prompt; the template's queries of every prompt go out together."""
        texts = list(texts)
        queries = [
            (i, code, task) for i, p in enumerate(texts) for code, task in self.template_.tasks(p)
        ]
        tasks = [q[2] for q in queries]
        if isinstance(self.backend, _Remote):
            results: list[Reading | str] = list(
                self.backend.read([texts[i] for i, _, _ in queries], tasks)
            )
        else:
            results = list(self.backend.read(tasks))
        per: list[dict[str, Reading | str]] = [{} for _ in texts]
        for (i, code, _), r in zip(queries, results, strict=True):
            per[i][code] = r
        redact = Redactor(self.backend.chat.secrets() if isinstance(self.backend, _Remote) else [])
        return [self._decision(p, redact) for p in per]

    def _decision(self, readings: dict[str, Reading | str], redact: Redactor) -> StageDecision:
        t = self.template_
        base = {"model": self.model, "template": t.name, "templates_version": t.version}
        failed = {c: r for c, r in readings.items() if isinstance(r, str)}
        done = {c: r for c, r in readings.items() if isinstance(r, Reading)}
        unread = [c for c, r in done.items() if r.score is None]
        if failed or unread:
            if failed:
                why = "; ".join(f"{c}: {m}" if c != "*" else m for c, m in failed.items())
                message = f"{NAME} could not ask {self.model}: {shorten(why, 300)}"
            else:
                answer = done[unread[0]].answer
                set_aside = next(
                    (
                        str(v)
                        for k, v in done[unread[0]].extra.items()
                        if k in ("logits", "logprobs")
                    ),
                    "",
                )
                message = (
                    f"{NAME}: no verdict in the answer {shorten(answer, 120)} (template "
                    f"'{t.name}' expects {'/'.join(t.unsafe)} or {'/'.join(t.safe)}"
                    + (f" after '{t.after}'" if t.after else "")
                    + ")"
                    + (f"; token probabilities not used: {set_aside}" if set_aside else "")
                )
            raw = {**base, **self._raw(done), **({"errors": failed} if failed else {})}
            return StageDecision(
                "prompt_guard", NAME, None, raw=redact.scrub(raw), message=redact(message)
            )
        scores = {c: float(r.score) for c, r in done.items() if r.score is not None}
        d = decide(scores, self.threshold_)
        raw = {**base, **self._raw(done), "triggered": d["triggered"]}
        message = ""
        if d["refused"]:
            named = ", ".join(
                f"{c} {t.categories[c].name} -> {t.categories[c].overt or 'unmapped'}"
                for c in raw["categories"]
            )
            message = f"P(unsafe) {d['score']:.3f} > {self.threshold_:g}" + (
                f" ({named})" if named else ""
            )
        return StageDecision(
            "prompt_guard",
            NAME,
            d["refused"],
            score=d["score"],
            threshold=self.threshold_,
            raw=redact.scrub(raw),
            message=redact(message),
        )

    def _raw(self, done: dict[str, Reading]) -> dict[str, Any]:
        """One query: its reading at the top level; per category: each under `queries`. The
        codes are those the answers name (single query) or whose query is above the threshold
        (per category), with their OVERT categories."""
        t = self.template_
        if set(done) == {"*"}:
            r = done["*"]
            codes = t.codes_in(r.answer) if r.verdict != "safe" else []
            head = r.to_raw()
        else:
            codes = [
                c for c, r in done.items() if r.score is not None and r.score > self.threshold_
            ]
            head = {"queries": {c: r.to_raw() for c, r in done.items()}}
            head["score_from"] = sorted({str(r.score_from) for r in done.values()})
        overt = sorted({t.categories[c].overt or "unmapped" for c in codes})
        return {**head, "categories": codes, "overt": overt}
