"""User-facing errors: one line that names the file and the problem, then a non-zero exit."""

from __future__ import annotations

import contextlib
import errno
import math
import numbers
import os
import re
import sys
from typing import Callable, Iterator, NoReturn


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


# The wording of the OS errors a user can act on; others keep the system's own text.
_OS_PROBLEMS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOTDIR: "a part of the path is not a folder",
    errno.ENOENT: "no such file or folder",
    errno.EISDIR: "is a folder",
    errno.EIO: "input/output error (a failing disk or network file system?)",
}
_FULL = (errno.ENOSPC, errno.EDQUOT)


def os_error_code(error: BaseException) -> int | None:
    """The errno of an OS error, also when a library kept only its text (pyarrow writes
    `[Errno 28] No space left on device` with no errno attribute)."""
    code = getattr(error, "errno", None)
    if isinstance(code, int):
        return code
    found = re.search(r"\[Errno (\d+)\]|os error (\d+)", str(error))
    return int(found.group(1) or found.group(2)) if found else None


def os_problem(error: BaseException, *, needed_bytes: int | None = None) -> str:
    """`no space left on device (needed about N MB)`, `read-only file system`, ...: an OS error in words."""
    code = os_error_code(error)
    problem = _OS_PROBLEMS.get(code) or (getattr(error, "strerror", None) or one_line(error)).lower()
    if code in _FULL and needed_bytes:
        problem += f" (needed about {max(1, math.ceil(needed_bytes / 2**20))} MB)"
    return problem


def os_error_line(path: str | os.PathLike, error: BaseException, *, needed_bytes: int | None = None) -> str:
    """`PATH: no space left on device (needed about N MB)`, `PATH: read-only file system`, ...:
    the one line every command prints for an OS error on `path`."""
    return f"{os.fspath(path)}: {os_problem(error, needed_bytes=needed_bytes)}"


@contextlib.contextmanager
def reported_os_errors(path: str | os.PathLike, *, needed_bytes: int | Callable[[], int] | None = None,
                       hidden: str | os.PathLike | None = None) -> Iterator[None]:
    """Turn an OSError raised in the block into a CxrError of `os_error_line`. It names the
    file the error names, or `path` when the error names none (a write on a full disk) or names
    `hidden` (the temporary that stands for `path`). `needed_bytes` (a number or a function
    asked only on a full disk) goes into the no-space line."""
    try:
        yield
    except OSError as error:
        named = getattr(error, "filename", None)
        shown = path if named is None or (hidden is not None and os.fspath(named) == os.fspath(hidden)) else named
        needed = needed_bytes() if callable(needed_bytes) and os_error_code(error) in _FULL else needed_bytes
        raise CxrError(os_error_line(shown, error, needed_bytes=needed if isinstance(needed, int) else None)) from error


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
