"""Where the project's data folders (`prompts/`, `judges/`, `guards/`) live."""

from __future__ import annotations

import os
import site
import sys
import sysconfig
from pathlib import Path

from .errors import UserError

_PACKAGE_PARENT = Path(__file__).resolve().parent.parent
#: Where a wheel puts the data folders, below an install prefix (see pyproject's data-files).
_SHARE = Path("share") / "t2i-eval"


def _candidates() -> list[Path]:
    """Places to look, in order: beside the package (a checkout), then the install prefixes."""
    prefixes = [sysconfig.get_path("data"), sys.prefix, site.getuserbase()]
    seen: list[Path] = [_PACKAGE_PARENT]
    for prefix in prefixes:
        path = Path(prefix) / _SHARE
        if path not in seen:
            seen.append(path)
    return seen


def data_root() -> Path:
    """The folder holding `prompts/`, `judges/` and `guards/`.

    Data is kept apart from code at the repository root (see STYLE.md). A checkout (editable
    install) finds it beside the package; a wheel installs it under `<prefix>/share/t2i-eval/`.
    `T2I_EVAL_DATA` overrides both, e.g. to try edited judge specs without reinstalling.
    """
    env = os.environ.get("T2I_EVAL_DATA")
    if env:
        root = Path(env)
        if not (root / "prompts").is_dir():
            raise UserError(
                f"T2I_EVAL_DATA={env}: {root / 'prompts'} does not exist. Point it at the folder "
                "holding prompts/, judges/ and guards/, or unset it."
            )
        return root
    candidates = _candidates()
    for root in candidates:
        if (root / "prompts").is_dir():
            return root
    looked = ", ".join(str(c) for c in candidates)
    raise UserError(
        f"data folders not found (looked in {looked}). Reinstall t2i-eval, or set T2I_EVAL_DATA "
        "to the folder holding prompts/, judges/ and guards/."
    )


def data_dir(name: str) -> Path:
    """One of the data folders, e.g. `data_dir("judges")`."""
    return data_root() / name
