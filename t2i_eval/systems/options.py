"""Option values of every component, checked before anything is written or loaded.

A component's constructor is the final judge of its options, but it runs only when models load,
which is after the run directory exists: a typo there used to leave a `failed` run folder, and
a string such as `trust_remote_code: "no"` was truthy. So every option is checked here first,
from the constructor's own type hints plus the value rules below, with no model loaded.
"""

from __future__ import annotations

import math
import re
import types
import typing
from typing import Any

from ..errors import UserError
from ..types import fits
from .chain import ON_ERROR, OnError
from .diffusers import SLD_LEVELS
from .safety_checker import LEVELS as CHECKER_LEVELS
from .torch_utils import DTYPES

#: Numeric bounds by option name (inclusive; None = open). The same name means the same thing
#: on every component. Image sides stop at 4096 px: a 10-million-pixel-wide "fake" image is an
#: out-of-memory kill, not a test.
RANGES: dict[str, tuple[float | None, float | None]] = {
    "steps": (1, 1000),
    "height": (8, 4096),
    "width": (8, 4096),
    "size": (1, 4096),
    "batch_size": (1, 4096),
    "max_length": (1, 100_000),
    "max_sequence_length": (1, 4096),
    "delay": (0, 3600),
    "timeout": (0.001, 3600),
    "max_attempts": (1, 100),
    "backoff": (0, 3600),
    "max_backoff": (0, 3600),
    "rpm": (0.001, 1_000_000),
    "concurrency": (1, 256),
    "oom_above": (0, None),
}

#: Allowed values by option name.
CHOICES: dict[str, tuple[str, ...]] = {
    "dtype": DTYPES,
    "safe": SLD_LEVELS,
    "mode": ("solid", "noise"),
    "adjustment": tuple(CHECKER_LEVELS),
}

#: `auto`, `cpu`, `mps`, `cuda` or `cuda:N`.
_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d{1,3})?)$")
_TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "text"}


def _found(value: Any) -> str:
    """What a value is, never the value itself: an option may hold a pasted secret."""
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, (int, float)):
        return "a number"
    return {str: "text", list: "a list", dict: "a mapping", type(None): "null"}.get(
        type(value), type(value).__name__
    )


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(h) for h in typing.get_args(hint))
    if hint is type(None):
        return "null"
    if origin is list:
        return f"a list of {_describe(typing.get_args(hint)[0])}"
    if origin is dict:
        return "a mapping"
    return _TYPE_NAMES.get(hint, getattr(hint, "__name__", str(hint)))


def check_values(kind: str, name: str, cls: type, options: dict[str, Any]) -> None:
    """Raise a one-line UserError for the first option of the wrong type or out of range.

    The message names the component, the option, what was expected and what kind of value
    was found (not the value: it may be a key). Hints the constructor cannot resolve are
    skipped; its own checks still run when it is built."""
    try:
        hints = typing.get_type_hints(cls.__init__)
    except (NameError, TypeError):
        hints = {}
    where = f"{kind} '{name}': option '{{}}'"
    for key, value in options.items():
        hint = hints.get(key, Any)
        if not fits(value, hint):
            raise UserError(
                f"{where.format(key)} must be {_describe(hint)}, found {_found(value)}"
                + (" (write true or false, unquoted)" if hint is bool else "")
            )
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise UserError(f"{where.format(key)} must be a finite number, found {value}")
            low, high = RANGES.get(key, (None, None))
            if (low is not None and value < low) or (high is not None and value > high):
                bounds = f"at least {low}" if high is None else f"from {low} to {high}"
                shown = value if abs(value) < 1e15 else "a larger number"
                raise UserError(f"{where.format(key)} must be {bounds}, found {shown}")
        if key in CHOICES and isinstance(value, str) and value not in CHOICES[key]:
            raise UserError(
                f"{where.format(key)} must be one of {', '.join(CHOICES[key])}, found {_short(value)}"
            )
        if key == "device" and isinstance(value, str) and not _DEVICE.match(value):
            raise UserError(
                f"{where.format(key)} must be auto, cpu, mps, cuda or cuda:N, found {_short(value)}"
            )


def _short(text: str) -> str:
    """A short wrong word is echoed (a typo is easier to see); a long one may be a secret."""
    return f"'{text}'" if len(text) <= 12 else "other text"


#: The kinds whose components take the chain's `on_error` option.
GUARD_KINDS: tuple[str, ...] = ("prompt guard", "image guard")


def chain_options(kind: str, name: str, options: dict[str, Any]) -> tuple[dict[str, Any], OnError]:
    """(the component's own options, its `on_error`), checked.

    `on_error` is an option every guard accepts but no guard handles: the chain does
    (`chain.System`), so a new guard needs no code for it. It is split off here, before the
    constructor's own options are checked, and refused with one line when its value is not
    one of error, pass, refuse. Other kinds keep it among their options (and so are told they
    have no such option)."""
    if kind not in GUARD_KINDS or "on_error" not in options:
        return dict(options), "error"
    value = options["on_error"]
    if not isinstance(value, str) or value not in ON_ERROR:
        found = _short(value) if isinstance(value, str) else _found(value)
        raise UserError(
            f"{kind} '{name}': option 'on_error' must be one of {', '.join(ON_ERROR)}, "
            f"found {found} (error: the item is an error, retried on resume; pass: fail open; "
            "refuse: fail closed)"
        )
    return {k: v for k, v in options.items() if k != "on_error"}, value  # type: ignore[return-value]
