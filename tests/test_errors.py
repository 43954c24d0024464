"""library/errors.py: which errors a command line shows as one message with exit status 2 (a UserError, the
operating-system errors a user's paths cause) and which keep their traceback (everything else: our bugs),
and the argparse types for numbers."""

from __future__ import annotations

import argparse
import errno

import pytest

from library.errors import (UserError, finite_float, non_negative_int, positive_float, positive_int, run_cli,
                            user_message)


def _raise(exc: BaseException):
    def main():
        raise exc
    return main


@pytest.mark.parametrize("exc,message", [
    (UserError("dataset.toml: [[datasets]] #0: no usable item; add captioned media"),
     "dataset.toml: [[datasets]] #0: no usable item; add captioned media"),
    (FileNotFoundError(errno.ENOENT, "No such file or directory", "/data/x.toml"),
     "/data/x.toml: no such file or folder; check the path"),
    (FileNotFoundError("prompt file p.txt does not exist"), "prompt file p.txt does not exist"),  # our own words
    (IsADirectoryError(errno.EISDIR, "Is a directory", "/models"),
     "/models: is a folder where a file is needed; give the file's path"),
    (NotADirectoryError(errno.ENOTDIR, "Not a directory", "/out/file/x"),
     "/out/file/x: a part of this path is a file, not a folder; fix the path"),
    (FileExistsError(errno.EEXIST, "File exists", "/out"),
     "/out: already exists and is not a folder (a folder is needed there); move it away or choose another path"),
    (PermissionError(errno.EACCES, "Permission denied", "/root/out"),
     "/root/out: permission denied; make it accessible to this user or choose another path"),
    (OSError(errno.ENOSPC, "No space left on device", "/out/lora.safetensors"),
     "/out/lora.safetensors: no space left on the device; free some space or write to another disk, then run again"),
    (OSError(errno.ENOSPC, "No space left on device"),  # a write into an open file
     "no space left on the device; free some space or write to another disk, then run again"),
    (OSError(errno.EROFS, "Read-only file system", "/mnt/ro/out"),
     "/mnt/ro/out: the file system is read-only; write to another folder"),
    (OSError(errno.EXDEV, "Invalid cross-device link", "/a", None, "/b"), None),
])
def test_expected_errors_are_one_message_and_status_2(exc, message, capsys):
    assert user_message(exc) == message
    if message is None:  # not a mistake a user can fix by a path: a traceback
        with pytest.raises(OSError):
            run_cli(_raise(exc))
        return
    assert run_cli(_raise(exc)) == 2
    assert capsys.readouterr().err == f"error: {message}\n"


@pytest.mark.parametrize("exc", [ValueError("a bug"), KeyError("x"), RuntimeError("CUDA error"),
                                 OSError(errno.EIO, "Input/output error", "/dev/sda")])
def test_everything_else_keeps_its_traceback(exc):
    with pytest.raises(type(exc)):
        run_cli(_raise(exc))


def test_the_status_of_main_passes_through():
    assert run_cli(lambda code: code, 1) == 1
    assert run_cli(lambda: None) == 0
    with pytest.raises(KeyboardInterrupt):
        run_cli(_raise(KeyboardInterrupt()))


@pytest.mark.parametrize("parse,text,value,problem", [
    (finite_float, "0.6", 0.6, None), (finite_float, "nan", None, "'nan' must be a finite number"),
    (finite_float, "-inf", None, "'-inf' must be a finite number"), (finite_float, "x", None, "'x' is not a number"),
    (positive_float, "24", 24.0, None), (positive_float, "-24", None, "'-24' must be greater than 0"),
    (positive_float, "0", None, "'0' must be greater than 0"), (positive_int, "1", 1, None),
    (positive_int, "0", None, "'0' must be 1 or more"), (positive_int, "1.5", None, "'1.5' is not a whole number"),
    (non_negative_int, "0", 0, None), (non_negative_int, "-1", None, "'-1' must be 0 or more"),
])
def test_argparse_types(parse, text, value, problem):
    if problem is None:
        assert parse(text) == value
    else:
        with pytest.raises(argparse.ArgumentTypeError, match=problem):
            parse(text)
