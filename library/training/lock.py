"""One training run per output folder: a lock file (`training.lock`, holding the owner's pid, host and start
time), created atomically (O_CREAT | O_EXCL) when the run starts and removed when it ends, also on Ctrl-C
and on errors. Two trainers writing one folder would interleave their saves, states, config and
loss.csv; the second one stops at once and names the owner.

A lock whose process is gone on this host (a run killed with SIGKILL, or a crashed machine's reboot) is
stale: it is reported and taken over. A lock from another host (a shared disk) is never broken: whether
that run is alive cannot be checked from here, so the error says how to remove it. Only the main process
of a multi-process run takes the lock; the others learn the outcome from it.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from library.errors import UserError

logger = logging.getLogger(__name__)

LOCK_NAME = "training.lock"
UNREADABLE_GRACE_S = 10.0  # a lock file this new and still unreadable is being written by its owner


class OutputLockedError(UserError, RuntimeError):
    """The output folder belongs to another training run; the message names it and what to do."""


def _pid_alive(pid: int) -> bool:
    """Whether process `pid` exists on this host (a process of another user counts as alive)."""
    if os.name == "nt":
        import ctypes

        handle = ctypes.windll.kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
        if not handle:
            return ctypes.windll.kernel32.GetLastError() == 5  # access denied: it exists
        code = ctypes.c_ulong()
        ctypes.windll.kernel32.GetExitCodeProcess(handle, ctypes.byref(code))
        ctypes.windll.kernel32.CloseHandle(handle)
        return code.value == 259  # STILL_ACTIVE
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _describe(owner: dict) -> str:
    return f"pid {owner.get('pid')} on {owner.get('host')}, started {owner.get('started', 'at an unknown time')}"


def _read_owner(path: Path) -> dict | None:
    try:
        owner = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return owner if isinstance(owner, dict) and isinstance(owner.get("pid"), int) else None


@dataclass
class OutputLock:
    """A held lock on an output folder; `release()` removes it (once, and only if it is still ours)."""

    path: Path
    owner: dict

    def release(self) -> None:
        if _read_owner(self.path) == self.owner:
            self.path.unlink(missing_ok=True)


def _stale_reason(path: Path, owner: dict | None) -> str | None:
    """Why an existing lock may be taken over, or None when it must be respected (raises for another host)."""
    folder = path.parent
    if owner is None:
        age = time.time() - path.stat().st_mtime
        if age < UNREADABLE_GRACE_S:
            raise OutputLockedError(f"{folder} is being locked by another training run right now ({path}); two "
                                    "runs in one output_dir would mix their saves: set another output_dir")
        return f"its lock file {path} is unreadable (a run killed while taking it)"
    if owner.get("host") != socket.gethostname():
        raise OutputLockedError(
            f"{folder} is locked by a training run on another machine ({_describe(owner)}; lock file {path}). "
            "Whether it still runs cannot be checked from here. If it is no longer running, delete the lock file "
            "and start again; otherwise set another output_dir")
    if owner["pid"] != os.getpid() and not _pid_alive(owner["pid"]):
        return f"its owner ({_describe(owner)}) is no longer running"
    raise OutputLockedError(
        f"{folder} is in use by another training run ({_describe(owner)}; lock file {path}). Two runs in one "
        "output_dir would mix their saves, states and loss.csv: wait for it to finish, or set another output_dir")


def lock_folder(folder: Path) -> OutputLock:
    """Take the folder's lock for this process, taking over a stale one; OutputLockedError otherwise."""
    path = Path(folder) / LOCK_NAME
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
          "started_at": time.time(), "command": " ".join(sys.argv)[:1000]}
    for _ in range(5):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            owner = _read_owner(path)
            reason = _stale_reason(path, owner)
            logger.warning("%s: taking over a stale lock: %s", Path(folder), reason)
            aside = path.with_name(f"{LOCK_NAME}.stale.{os.getpid()}")
            try:
                os.replace(path, aside)  # one taker wins; a lock made meanwhile by a live run is put back
            except FileNotFoundError:
                continue
            if _read_owner(aside) != owner:
                try:
                    os.link(aside, path)
                except OSError:
                    pass
            aside.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(me, f)
            f.flush()
            os.fsync(f.fileno())
        return OutputLock(path, me)
    raise OutputLockedError(f"{folder}: could not take the lock {path} (other runs keep taking it); "
                            "set another output_dir")


def lock_run_folder(folder: Path, accelerator) -> OutputLock | None:
    """The main process locks `folder`; in a multi-process run every process raises the same error when
    that fails (so none waits for the others forever). Returns the lock on the main process."""
    lock, message = None, None
    if accelerator.is_main_process:
        try:
            lock = lock_folder(folder)
        except OutputLockedError as exc:
            message = str(exc)
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        shared = broadcast_object_list([message], from_process=0)
        message = shared[0]
    if message:
        raise OutputLockedError(message)
    return lock
