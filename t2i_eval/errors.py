"""The one exception type that the CLI turns into a one-line message and exit code 2."""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user: a file, a flag, a spec.

    The message must say what + where + expected + found + fix, on one line, because the CLI
    prints it without a traceback.
    """


def did_you_mean(word: str, options: list[str] | tuple[str, ...]) -> str:
    """' Did you mean 'x'?' for the closest option, or ''."""
    import difflib

    close = difflib.get_close_matches(word, list(options), n=1)
    return f" Did you mean '{close[0]}'?" if close else ""


class MissingExtra(UserError):
    """An optional dependency is not installed; the message names the extra to install."""

    def __init__(self, what: str, package: str, extra: str) -> None:
        super().__init__(f"{what} needs {package}: pip install 't2i-eval[{extra}]'")


#: Exit code of an unforeseen failure (a bug, not bad input and not an outage): sysexits'
#: EX_SOFTWARE, so scripts can tell it from 1 (outages: rerun) and 2 (bad input: fix it).
INTERNAL_ERROR = 70

#: The longest value an error message echoes; a value read from a hostile file can be megabytes.
ECHO_LIMIT = 80


def shorten(value: object, limit: int = ECHO_LIMIT) -> str:
    """`repr`-like text of a value for an error message, cut to `limit` characters.

    Errors echo what they found so the user can spot it, but a 25 MB value makes a 25 MB line
    that hides the message; the cut keeps the start and says how much was left out.
    """
    if isinstance(value, int) and abs(value) >= 10**limit:  # str() refuses > 4,300 digits
        return f"<an integer of more than {limit} digits>"
    text = " ".join((value if isinstance(value, str) else repr(value)).split())
    if len(text) <= limit:
        return text
    return f"{text[: limit - 1]}… ({len(text)} characters)"
