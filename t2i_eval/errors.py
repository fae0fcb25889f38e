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
