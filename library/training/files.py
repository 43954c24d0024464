"""The files of a run, written so that a kill or a full disk never leaves a broken one: whole files through a
temp file and a rename, whole lines appended in one write (undone if it fails), and the error a full disk
becomes: which disk, how much a save needs, how much is free (`DiskFullError`)."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import torch

from library.errors import UserError

_NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# how writers that hide the errno say it: safetensors (Rust io::Error), torch.save's zip writer
_NO_SPACE_TEXT = ("no space left", "os error 28", "storagefull", "quota exceeded")
_WRITE_FAILED_TEXT = ("unexpected pos", "file write failed", "failed writing")


class DiskFullError(UserError, RuntimeError):
    """A save did not fit on the disk; the message names the disk, the space needed and what was kept."""


def mount_point(path: Path) -> Path:
    """The mount point of the file system holding `path` (the disk a user must free)."""
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    while not os.path.ismount(path) and path != path.parent:
        path = path.parent
    return path


def free_bytes(path: Path) -> int | None:
    try:
        return shutil.disk_usage(mount_point(path)).free
    except OSError:
        return None


def tensor_bytes(obj) -> int:
    """The bytes of every tensor inside `obj` (nested dicts, lists, tuples): about what saving it takes."""
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def out_of_space(exc: BaseException, folder: Path, need: int) -> bool:
    """Whether a failed write ran out of disk space: the errno or the writer's words say so, or the writer
    only said the write failed and the disk has less free space than the save needs."""
    if isinstance(exc, OSError) and exc.errno in _NO_SPACE_ERRNOS:
        return True
    text = str(exc).lower()
    if any(words in text for words in _NO_SPACE_TEXT):
        return True
    free = free_bytes(folder)
    return any(words in text for words in _WRITE_FAILED_TEXT) and free is not None and free < need


def _megabytes(n: int) -> str:
    if n < 2**20:
        return f"{-(-n // 1024):,} KB"
    return f"{n / 2**20:,.1f} MB" if n < 10 * 2**20 else f"{round(n / 2**20):,} MB"


def disk_full(folder: Path, what: str, need: int, kept: str = "") -> DiskFullError:
    """The error a full disk becomes: `what` (the file being written) needed about `need` bytes."""
    folder, free = Path(os.path.abspath(folder)), free_bytes(folder)
    mount = mount_point(folder)
    return DiskFullError(
        f"no space left on {mount}" + ("" if mount == folder else f" (the disk holding {folder})")
        + f": writing {what} needs about {_megabytes(need)}" + (f", {_megabytes(free)} free" if free is not None
                                                                  else "") + ". "
        + (kept or "Nothing earlier was overwritten.")
        + " Free some space there (or set output_dir on a larger disk), then run again")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write a whole file through `NAME.tmp` and a rename: readers see the old file or the new one."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if out_of_space(exc, path.parent, len(data)):
            raise disk_full(path.parent, path.name, len(data)) from None
        raise


def append_bytes(path: Path, data: bytes) -> None:
    """Append whole lines in one write and sync them; a failed append is cut off again, so the file never
    ends in half a line."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        start = os.fstat(fd).st_size
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        except OSError as exc:
            os.ftruncate(fd, start)
            if out_of_space(exc, path.parent, len(data)):
                raise disk_full(path.parent, path.name, len(data)) from None
            raise
    finally:
        os.close(fd)
