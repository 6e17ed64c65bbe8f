"""User-facing errors: one line that names the file and the problem, then a non-zero exit."""

from __future__ import annotations

import numbers
import os
import sys
from typing import Callable, NoReturn


class CxrError(Exception):
    """A problem with the user's input or environment that a message can explain.

    Raised anywhere in the library; the command-line entry points turn it into one line on
    stderr and exit status 2, so tracebacks are kept for real bugs.
    """


class SettingError(CxrError):
    """A bad value of one named setting (a parameter name, not a flag).

    Library code speaks of values; a command-line layer may reword `setting` as its own flag.
    """

    def __init__(self, setting: str, problem: str):
        super().__init__(f"{setting} {problem}")
        self.setting = setting
        self.problem = problem


def require_int(setting: str, value: object, *, minimum: int) -> int:
    """`value` as an int if it is an integer >= `minimum` (bool is not), else a SettingError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise SettingError(setting, f"must be an integer >= {minimum}, got {value!r}")
    return int(value)


EXIT_USER_ERROR = 2


def one_line(error: BaseException, limit: int = 200) -> str:
    """An exception's message folded onto one line, for wrapping it into a CxrError."""
    return " ".join(str(error).split())[:limit] or type(error).__name__


def run_cli(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> NoReturn:
    """Run a `main(argv)` and exit with its status; a CxrError becomes `error: <message>`."""
    try:
        status = main(argv)
    except CxrError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    except BrokenPipeError:
        # `... | head` closed the pipe: not an error. Silence the flush at exit too.
        sys.stdout = open(os.devnull, "w")
        sys.exit(0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(status or 0)
