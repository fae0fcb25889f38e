"""What reports write: Markdown and CSV cells that cannot be turned against their reader, and
output folders that are swapped in whole, never left half-written.

Names (systems, suites, categories, guards), prompt text and words found in it come from user
files, so every one of them passes through `md_cell` before it enters Markdown and through
`csv_bytes` before it enters a CSV file; no other module escapes on its own.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import os
import re
import secrets
import shutil
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import UserError

log = logging.getLogger(__name__)

#: Control characters (C0, DEL, C1): a newline ends a table row, an ESC drives a terminal.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
#: Markdown punctuation that starts markup: a table column, a code span, a link, an escape.
_MD_BACKSLASHED = re.compile(r"([\\`|\[\]])")
_MD_ENTITIES = {"&": "&amp;", "<": "&lt;", ">": "&gt;"}
#: OWASP's list of first characters a spreadsheet reads as the start of a formula.
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_SAFE_STEM = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}")


def one_line(x: Any) -> str:
    """`x` as text on one line: whitespace controls become a space, other controls U+FFFD."""
    return _CONTROL.sub(lambda m: " " if m.group() in "\t\n\r\v\f" else "\ufffd", str(x))


def md_cell(x: Any) -> str:
    """`x` as literal Markdown text, safe in a table cell, a heading or a list item.

    `<`, `>` and `&` become entities, so no HTML tag, autolink or entity reaches a renderer
    that passes raw HTML through (CommonMark does); `|`, backticks, `[`, `]` and backslashes
    are backslash-escaped, so a name cannot end a table column, open a code span or form a link
    (GFM splits table rows on unescaped pipes, even inside code spans); a line break would end
    the table row, so every control character is replaced (`one_line`).
    """
    text = _MD_BACKSLASHED.sub(r"\\\1", one_line(x))
    return re.sub("[&<>]", lambda m: _MD_ENTITIES[m.group()], text)


def md_code(x: Any) -> str:
    """`x` as a Markdown code span (outside tables): the fence is one backtick longer than the
    longest run of backticks inside, as CommonMark requires, so nothing in `x` can close it."""
    text = one_line(x)
    fence = "`" * (max((len(r) for r in re.findall("`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def mpl_text(x: Any) -> str:
    """`x` as literal matplotlib text: a pair of `$` would be parsed as mathtext (and a bad
    formula makes the whole figure fail to draw)."""
    return one_line(x).replace("$", r"\$")


def csv_cell(x: Any) -> Any:
    """A text cell a spreadsheet would read as a formula gets a leading `'` (OWASP's advice);
    numbers stay numbers (a negative threshold is not a formula)."""
    if isinstance(x, str) and x.startswith(FORMULA_START):
        return "'" + x
    return x


def csv_bytes(header: Sequence[str], rows: Iterable[Mapping[str, Any] | Sequence[Any]]) -> bytes:
    """UTF-8 CSV of `rows` (dicts keyed by `header`, or sequences in its order), every cell
    passed through `csv_cell`: the one way t2i-eval writes a CSV file."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow([csv_cell(h) for h in header])
    for row in rows:
        values = [row.get(h) for h in header] if isinstance(row, Mapping) else row
        writer.writerow([csv_cell(v) for v in values])
    return buf.getvalue().encode("utf-8")


def file_stem(name: str) -> str:
    """`name` if it is a plain file name (letters, digits, `._-`, not hidden), else a digest:
    names from records or specs never pick a folder or a hidden file."""
    if _SAFE_STEM.fullmatch(name):
        return name
    return "x" + hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _tidy(dest: Path) -> None:
    """Remove what a killed earlier build of `dest` left beside it (only when its process is
    gone, so a build running now keeps its folder); if the kill fell between the two renames
    of the swap, the complete old output is put back first."""
    pattern = re.compile(rf"\.{re.escape(dest.name)}\.(new|old)-(\d+)-")
    stale = sorted(
        (m.group(1), p)
        for p in dest.parent.iterdir()
        if (m := pattern.match(p.name)) and p.is_dir() and not _pid_alive(int(m.group(2)))
    )
    for kind, path in stale:
        if kind == "old" and not dest.exists():
            os.replace(path, dest)
            log.warning("%s: restored the previous output left by an interrupted write", dest)
        else:
            shutil.rmtree(path, ignore_errors=True)


def _check_replaceable(dest: Path, owned: Collection[str] | None, fix: str) -> None:
    if not dest.exists():
        return
    if not dest.is_dir():
        raise UserError(f"{dest}: a file is in the way of the output folder; move it away. {fix}")
    if owned is None:
        return
    foreign = sorted(
        p.name
        for p in dest.iterdir()
        if p.name not in owned and not any(p.name.startswith(f".{o}.") for o in owned)
    )
    if foreign:
        shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        raise UserError(
            f"{dest}: holds files this output does not own ({shown}) and would be replaced "
            f"whole; expected an empty folder or an earlier output (only {', '.join(owned)}). "
            f"{fix}"
        )


def check_output_dir(dest: Path, owned: Collection[str] | None = None, fix: str = "") -> None:
    """Raise, before anything is written anywhere, the UserError `replacing_dir` would raise
    for `dest`: a command that writes several outputs checks the last one first, so a bad
    path never leaves the earlier outputs rewritten."""
    dest = Path(dest)
    nearest = next((p for p in dest.parents if p.exists()), None)
    if nearest is not None and not nearest.is_dir():
        why = f"{nearest} is a file"
    elif nearest is not None and not os.access(nearest, os.W_OK | os.X_OK):
        why = f"{nearest} is not writable"
    else:
        _check_replaceable(dest, owned, fix)
        return
    raise UserError(
        f"{dest}: cannot create the output folder ({why}); expected a path under a folder you "
        f"can write to. {fix}"
    )


def _why(dest: Path, e: OSError) -> str:
    """The reason a folder cannot be made, naming a file that sits where a folder should."""
    blocker = next((p for p in dest.parents if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        return f"{blocker} is a file"
    return e.strerror or str(e)


@contextmanager
def replacing_dir(
    dest: Path, owned: Collection[str] | None = None, fix: str = ""
) -> Iterator[Path]:
    """Build an output folder in a temp folder beside `dest`, then swap it in.

    Yields the temp folder. On success the old `dest` is renamed aside, the new one renamed in
    (`os.replace`) and the old one removed; on any failure the temp folder is removed and `dest`
    is untouched. So a reader, or a kill midway, finds the old complete output or the new
    complete one (a kill between the two renames is repaired by the next build). `owned`:
    the names an existing `dest` may hold for it to be replaced (a folder the user pointed at
    with other files in it is refused, not deleted); None when the whole folder is ours.
    An uncreatable destination is a UserError naming it, with `fix`.
    """
    dest = Path(dest)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        _tidy(dest)
        _check_replaceable(dest, owned, fix)
        tmp = dest.with_name(f".{dest.name}.new-{os.getpid()}-{secrets.token_hex(4)}")
        tmp.mkdir()  # not mkdtemp: its 0o700 would become the output's mode
    except OSError as e:
        raise UserError(
            f"{dest}: cannot create the output folder ({_why(dest, e)}); expected a path under "
            f"a folder you can write to. {fix}"
        ) from None
    old = dest.with_name(f".{dest.name}.old-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        yield tmp
        if dest.exists():
            os.replace(dest, old)
        os.replace(tmp, dest)
    except BaseException:
        if old.exists() and not dest.exists():
            os.replace(old, dest)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
