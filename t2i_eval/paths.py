"""Where the project's data folders (`prompts/`, `judges/`, `guards/`) live."""

from __future__ import annotations

import os
import site
import sys
import sysconfig
from pathlib import Path
from typing import Any

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


def cache_root() -> Path:
    """Where t2i-eval keeps what it can rebuild: the tiny model, crash reports.

    `T2I_EVAL_CACHE` moves it (tests point it at a temporary folder)."""
    env = os.environ.get("T2I_EVAL_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "t2i-eval"


def data_dir(name: str) -> Path:
    """One of the data folders, e.g. `data_dir("judges")`."""
    return data_root() / name


#: Bounds on a config file: far above any real spec, far below what hurts. A 348-byte file of
#: nested aliases can otherwise expand to millions of values when it is written out again.
YAML_MAX_BYTES = 1 << 20
YAML_MAX_VALUES = 100_000
YAML_MAX_DEPTH = 64


def load_yaml(path: Path, what: str) -> Any:
    """The one YAML loader: safe (values only), bounded, with one-line errors.

    `what` names the file's role in messages ("system spec", "judge spec"). Refused with a
    UserError: a missing, unreadable, non-UTF-8 or oversized file, malformed YAML (with its
    line), nesting deeper than YAML_MAX_DEPTH, and aliases that expand to more than
    YAML_MAX_VALUES values. Returns what the file holds (an empty file gives None).
    """
    import yaml

    where = f"{what} {path}"
    try:
        if path.stat().st_size > YAML_MAX_BYTES:
            raise UserError(f"{where}: larger than {YAML_MAX_BYTES >> 20} MiB; not a config file")
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise UserError(f"{where}: file not found") from None
    except IsADirectoryError:
        raise UserError(f"{where}: is a folder; give a YAML file") from None
    except UnicodeDecodeError:
        raise UserError(f"{where}: not UTF-8; re-save the file as UTF-8") from None
    except OSError as e:
        raise UserError(f"{where}: cannot read ({e.strerror})") from None
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _yaml_size(node, where, {}, 0)
        return loader.construct_document(node)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        at = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None)
        detail = f" ({problem})" if problem else ""
        raise UserError(f"{where}{at}: malformed YAML{detail}") from None
    except RecursionError:
        raise UserError(
            f"{where}: nested more than {YAML_MAX_DEPTH} levels deep; not a config file"
        ) from None
    finally:
        loader.dispose()


def _yaml_size(node: Any, where: str, sizes: dict[int, int], depth: int) -> int:
    """How many values `node` expands to, each alias counted every time it is used."""
    import yaml

    if depth > YAML_MAX_DEPTH:
        raise UserError(f"{where}: nested more than {YAML_MAX_DEPTH} levels deep; not a config file")
    known = sizes.get(id(node))
    if known is not None:
        return known
    if isinstance(node, yaml.SequenceNode):
        children = node.value
    elif isinstance(node, yaml.MappingNode):
        children = [n for pair in node.value for n in pair]
    else:
        children = []
    size = 1 + sum(_yaml_size(c, where, sizes, depth + 1) for c in children)
    if size > YAML_MAX_VALUES:
        raise UserError(
            f"{where}: expands to more than {YAML_MAX_VALUES:,} values (YAML aliases used many "
            "times over?); not a config file"
        )
    sizes[id(node)] = size
    return size
