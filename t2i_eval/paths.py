"""Where the project's data folders (`prompts/`, `judges/`, `guards/`) live."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import UserError

_PACKAGE_PARENT = Path(__file__).resolve().parent.parent


def data_root() -> Path:
    """The folder holding `prompts/`, `judges/` and `guards/`.

    Data is kept apart from code at the repository root (see STYLE.md); an editable install
    finds it beside the package. `T2I_EVAL_DATA` points elsewhere, e.g. for a wheel install.
    """
    env = os.environ.get("T2I_EVAL_DATA")
    root = Path(env) if env else _PACKAGE_PARENT
    if not (root / "prompts").is_dir():
        raise UserError(
            f"data folder not found: {root / 'prompts'} does not exist. Install t2i-eval from a "
            "checkout (pip install -e .) or set T2I_EVAL_DATA to the folder holding prompts/ and judges/."
        )
    return root


def data_dir(name: str) -> Path:
    """One of the data folders, e.g. `data_dir("judges")`."""
    return data_root() / name
