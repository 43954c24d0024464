"""The one user-error type, and the wrapper every command line runs its `main` under.

A `UserError` is bad input, never a bug of ours: a config value, a model file, a dataset, a path. Its
message names the file, key or item, says what is wrong and what to do. Each package raises its own
subclass (`ConfigError`, `CheckpointError`, `DatasetConfigError`, ...), usually also a `ValueError` or
`RuntimeError` for callers that catch those. `run_cli(main)` turns a UserError, and the operating system
errors a user causes (a missing path, a file where a folder belongs, no permission, a full disk), into one
line on stderr and exit status 2; anything else is our bug and keeps its traceback. `positive_int`,
`positive_float`, `finite_float` and `non_negative_int` are argparse types for the numbers a command line
takes (argparse then names the flag and exits with 2).

Imports nothing from the project: it is the bottom of the floor plan, so every package (`networks`
too) may raise a UserError.
"""

from __future__ import annotations

import argparse
import errno
import math
import sys
from typing import Callable

EXIT_USER_ERROR = 2  # bad input stopped the command (argparse uses 2 for bad arguments too)


class UserError(Exception):
    """Bad input from the user; the message says which file, key or item, what is wrong and what to do."""


_OS_ERRORS = {  # the OS errors a user's paths cause: what to tell them
    FileNotFoundError: "no such file or folder; check the path",
    IsADirectoryError: "is a folder where a file is needed; give the file's path",
    NotADirectoryError: "a part of this path is a file, not a folder; fix the path",
    FileExistsError: "already exists and is not a folder (a folder is needed there); move it away or choose "
                     "another path",
    PermissionError: "permission denied; make it accessible to this user or choose another path",
}
_DISK_ERRORS = {
    errno.ENOSPC: "no space left on the device; free some space or write to another disk, then run again",
    errno.EDQUOT: "disk quota exceeded; free some space or write to another disk, then run again",
    errno.EROFS: "the file system is read-only; write to another folder",
}


def _os_message(exc: OSError) -> str | None:
    advice = next((text for kind, text in _OS_ERRORS.items() if isinstance(exc, kind)), None)
    advice = advice or _DISK_ERRORS.get(exc.errno)
    if advice is None:
        return None
    if exc.errno is None:  # raised by our code with a message of its own
        return str(exc) or advice
    if exc.filename is None:  # a write into an open file that ran out of space
        return advice
    where = str(exc.filename) + (f" -> {exc.filename2}" if exc.filename2 else "")
    return f"{where}: {advice}"


def user_message(exc: BaseException) -> str | None:
    """The message to show for an expected error (a UserError or a user's OS error), else None (a bug)."""
    if isinstance(exc, UserError):
        return str(exc)
    if isinstance(exc, OSError):
        return _os_message(exc)
    return None


def run_cli(main: Callable[..., int | None], *args, **kwargs) -> int:
    """Run a command line's `main(*args, **kwargs)` and return its exit status: bad input (see
    `user_message`) becomes `error: MESSAGE` on stderr and status 2, without a traceback. Every other
    exception propagates: a traceback is for our own bugs."""
    try:
        return main(*args, **kwargs) or 0
    except (UserError, OSError) as exc:
        message = user_message(exc)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR


# ---- argparse types ------------------------------------------------------------------------------------


def finite_float(text: str) -> float:
    """A number that is not nan or inf (a strength, a scale)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number")
    return value


def positive_float(text: str) -> float:
    """A finite number above 0 (GiB of memory, a size)."""
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be greater than 0")
    return value


def _whole_number(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"{text!r} must be {minimum} or more")
    return value


def positive_int(text: str) -> int:
    """A whole number of 1 or more (pixels, frames, a batch size, a count)."""
    return _whole_number(text, 1)


def non_negative_int(text: str) -> int:
    """A whole number of 0 or more (0 meaning off or none)."""
    return _whole_number(text, 0)
