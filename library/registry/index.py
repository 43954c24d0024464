"""The registry.json model: the registry's constants (file names, types, statuses, expert roles, release gates),
its error and reference types, the lock file, atomic writes, and the rules for reading and changing the
index's entries (validation, version lookup, history events, gate states, latest scores). Nothing here
reads LoRA files or renders text; `operations` builds on this.
"""

from __future__ import annotations

import os
import re
import socket
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date as Date
from datetime import datetime
from pathlib import Path
from typing import Any, Iterator

from library.errors import UserError

INDEX_NAME = "registry.json"
LOCK_NAME = ".registry.lock"
NOTES_NAME = "training_notes.md"
FORMAT = 1
TYPES = {"character": "characters", "style": "styles", "motion": "motion", "domain": "domain", "other": "other"}
STATUSES = ("Current", "Testing", "Deprecated")
ROLES = ("high_noise", "low_noise", "single")  # a WAN 2.2 A14B expert pair, or one file
GATES = {  # the guide's release gates, in order
    "technical": "technical validation: 20 outputs at strengths 0.6 / 0.8 / 1.0, varied prompts, no artefacts, "
                 "VRAM and speed acceptable",
    "quality": "quality evaluation: 50-100 outputs compared with the base model and the previous version",
    "trial": "production trial: 10-20% of the workload for 1-2 days",
}
MONITOR_SCORES = ("consistency", "generation_speed", "prompt_flexibility", "user_satisfaction", "error_rate")
HYPER_KEYS = ("lr", "dim", "alpha", "epochs", "steps", "batch", "grad_accum", "optimizer", "scheduler", "warmup",
              "seed", "mixed_precision", "resolution")


class RegistryError(UserError):
    """A user-facing registry error: names the file or model, what is wrong and what to do."""


@dataclass(frozen=True)
class ModelRef:
    """Which model a command is about: its subject, and its type and client where the subject is ambiguous."""
    subject: str
    kind: str | None = None
    client: str | None = None

# ---- atomic writes and the lock ---------------------------------------------------------------------


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextmanager
def registry_lock(root: Path, timeout: float = 10.0) -> Iterator[None]:
    """An exclusive lock file at the root, so two commands never interleave their writes."""
    root.mkdir(parents=True, exist_ok=True)
    lock, deadline = root / LOCK_NAME, time.monotonic() + timeout
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            break
        except FileExistsError:
            if time.monotonic() >= deadline:
                holder = lock.read_text(errors="replace").strip() if lock.exists() else "?"
                raise RegistryError(f"{lock} is held ({holder}): another registry command is running; if none "
                                    "is (a crashed run), delete that lock file and retry") from None
            time.sleep(0.05)
    with os.fdopen(fd, "w") as fh:
        fh.write(f"pid {os.getpid()} on {socket.gethostname()} since {datetime.now():%Y-%m-%d %H:%M:%S}\n")
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


def _now() -> str:
    return datetime.now().strftime("%Y-%m-%d %H:%M:%S")


def _day(value: str | Date | None) -> str:
    """'2025-01-15' from a date, 'YYYY-MM-DD' or 'YYYYMMDD'; today when None."""
    if value is None:
        return Date.today().isoformat()
    if isinstance(value, Date):
        return value.isoformat()
    for fmt in ("%Y-%m-%d", "%Y%m%d"):
        try:
            return datetime.strptime(value, fmt).date().isoformat()
        except ValueError:
            pass
    raise RegistryError(f"date {value!r} is not YYYY-MM-DD or YYYYMMDD")


# ---- the index --------------------------------------------------------------------------------------


_PART = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")  # one folder or file name the registry writes


def path_problem(text: Any, root: Path) -> str | None:
    """Why `text` cannot be a path inside the registry `root` (None when it can): it must be relative, made of
    names the registry writes (no '..', no hidden or absolute parts), and stay inside the root once every
    symbolic link on the way is followed."""
    if not isinstance(text, str) or not text:
        return f"{text!r} is not a path"
    if text.startswith("/") or "\\" in text or re.match(r"[A-Za-z]:", text):
        return f"{text!r} is an absolute path; the index holds paths relative to the registry folder"
    bad = next((part for part in text.split("/") if not _PART.fullmatch(part)), None)
    if bad is not None:
        return (f"{text!r} has the part {bad!r}; the index holds relative paths of letters, digits, '.', '-' "
                "and '_' (no '..', no hidden or empty parts)")
    resolved, base = (root / text).resolve(), root.resolve()
    if resolved != base and base not in resolved.parents:
        return f"{text!r} leads outside the registry folder {base} through a symbolic link (to {resolved})"
    return None


def _is(value: Any, kind: type) -> bool:
    return isinstance(value, kind) and not (kind is int and isinstance(value, bool))


_FILE_FIELDS = {"sha256": str, "size": int, "hyperparameters": dict}
_VERSION_FIELDS = {"date": str, "gates": dict, "tests": list}


def _check_version(key: str, v: Any, root: Path, bad) -> None:
    if not (isinstance(v, dict) and _is(v.get("version"), int) and isinstance(v.get("files"), dict)
            and v.get("status") in STATUSES):
        raise bad(f"model {key!r} has a version entry without a number, files or a valid status: {v!r:.120}")
    where = f"model {key!r} v{v['version']}"
    wrong = [name for name, kind in _VERSION_FIELDS.items() if name in v and not _is(v[name], kind)]
    if wrong:
        raise bad(f"{where}: {wrong[0]!r} is not of type {_VERSION_FIELDS[wrong[0]].__name__}")
    for role, entry in v["files"].items():
        if role not in ROLES or not isinstance(entry, dict):
            raise bad(f"{where}: file entry {role!r} is not one of {', '.join(ROLES)} with a path")
        problem = path_problem(entry.get("path"), root)
        if problem is None and not entry["path"].endswith(".safetensors"):
            problem = f"{entry['path']!r} is not a .safetensors file"
        if problem is not None:
            raise bad(f"{where} file {role!r}: path {problem}")
        wrong = [name for name, kind in _FILE_FIELDS.items() if not _is(entry.get(name), kind)]
        if wrong:
            kind = _FILE_FIELDS[wrong[0]].__name__
            raise bad(f"{where} file {role!r}: {wrong[0]!r} is missing or not of type {kind}")
    for test in v.get("tests", []):
        if not (isinstance(test, dict) and isinstance(test.get("date"), str)
                and isinstance(test.get("scores", {}), dict) and isinstance(test.get("issues", []), list)
                and all(_is(x, int) or isinstance(x, float) for x in test.get("scores", {}).values())
                and (test.get("gate") is None or isinstance(test.get("passed"), bool))):
            raise bad(f"{where}: a test entry is not a date with numeric scores, a list of issues and, with a gate, "
                      f"passed true or false: {test!r:.120}")
    for gate, state in v.get("gates", {}).items():
        if gate not in GATES or not (isinstance(state, dict) and isinstance(state.get("state"), str)
                                     and isinstance(state.get("date"), str)):
            raise bad(f"{where}: gate {gate!r} is not one of {', '.join(GATES)} with a state and a date")


def _check_index(data: Any, path: Path) -> dict:
    """The loaded index, or an error naming the file and the bad entry (never a silent reset). Every model key
    and file path is checked to stay inside the registry folder (`path_problem`), so an edited index can
    neither make a command write outside it nor read files from elsewhere."""
    def bad(what: str):
        return RegistryError(f"{path} is not a valid registry index: {what}. Nothing was changed; fix the "
                             "entry by hand or restore the file from git or a backup")

    if not isinstance(data, dict) or not isinstance(data.get("models"), dict):
        raise bad("no 'models' object at the top level")
    if not _is(data.get("format"), int) or data["format"] > FORMAT:
        raise bad(f"format {data.get('format')!r} (this tool reads format {FORMAT}); update the trainer")
    for key, model in data["models"].items():
        if not isinstance(model, dict) or not isinstance(model.get("versions"), list):
            raise bad(f"model {key!r} has no 'versions' list")
        if model.get("type") not in TYPES or not isinstance(model.get("subject"), str):
            raise bad(f"model {key!r} has no valid 'type' ({', '.join(TYPES)}) or 'subject'")
        problem = path_problem(key, path.parent)
        if problem is not None:
            raise bad(f"model key {problem}")
        if model.setdefault("key", key) != key:
            raise bad(f"model {key!r} says its key is {model['key']!r}; the two must be the same")
        history = model.get("history", [])
        if not isinstance(model.get("client") or "", str) or not isinstance(history, list) or not all(
                isinstance(e, dict) and {"date", "version", "event"} <= e.keys() for e in history):
            raise bad(f"model {key!r}: 'client' is not a name, or 'history' is not a list of events with a date, "
                      "version and event")
        for v in model["versions"]:
            _check_version(key, v, path.parent, bad)
    return data


def _version(model: dict, number: int | None) -> dict:
    """A version of a model; the newest when number is None."""
    if number is None:
        return model["versions"][-1]
    for v in model["versions"]:
        if v["version"] == number:
            return v
    have = ", ".join(f"v{v['version']}" for v in model["versions"])
    raise RegistryError(f"{model['key']} has no v{number} (it has {have})")


def _current(model: dict) -> dict | None:
    return next((v for v in model["versions"] if v["status"] == "Current"), None)


def _event(model: dict, version: int, event: str, by: str | None, **extra) -> None:
    model.setdefault("history", []).append(
        {"date": _now(), "version": version, "event": event, "by": by, **{k: v for k, v in extra.items() if v}})


def _gate_title(gate: str) -> str:
    return GATES[gate].split(":")[0]


def _gate_state(version: dict, gate: str) -> str:
    return version.get("gates", {}).get(gate, {}).get("state", "pending")


def _latest_scores(version: dict) -> dict[str, tuple[float, str]]:
    """{score name: (value, date)} from the version's newest test that recorded each score."""
    latest: dict[str, tuple[float, str]] = {}
    for test in version.get("tests", []):
        for name, value in test.get("scores", {}).items():
            latest[name] = (value, test["date"])
    return latest
