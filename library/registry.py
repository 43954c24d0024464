"""A file-based LoRA registry for production, as the guide's "Production" section asks. A studio keeps it
in git or on a shared drive; `tools/registry.py` is its command line.

    lora_registry/
      registry.json                                 the index: machine-readable, the single source of truth
      characters/client_brandX/sarah/               <type folder>/[client_<name>/]<subject>/
        wan2.2_character_sarah_v1_20250115_high_noise.safetensors
        wan2.2_character_sarah_v1_20250115_low_noise.safetensors
        training_notes.md                           regenerated from the index after every change
      styles/watercolor/wan2.1_style_watercolor_v3_20250302.safetensors

A version's life: `add` (Testing) -> test results and the three release gates -> `promote` (Current; the
previous Current becomes Deprecated) -> on trouble `rollback` (Current -> Deprecated and broken, the previous
released version -> Current). Files are copied atomically and checked against their SHA-256; the index and
the notes are written atomically (temp file + os.replace) under a lock file. What belongs here: the index,
its rules and the notes; argument parsing lives in the tool.
"""

from __future__ import annotations

import hashlib
import json
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
from typing import Any, Iterator, Mapping, Sequence

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


class RegistryError(Exception):
    """A user-facing registry error: names the file or model, what is wrong and what to do."""


@dataclass(frozen=True)
class ModelRef:
    """Which model a command is about: its subject, and its type and client where the subject is ambiguous."""
    subject: str
    kind: str | None = None
    client: str | None = None


# ---- names ------------------------------------------------------------------------------------------


def slug(text: str, what: str, lower: bool = True) -> str:
    """A name safe in file names: letters, digits, '.', '-'; other runs become '_'."""
    out = re.sub(r"[^A-Za-z0-9.-]+", "_", text.strip()).strip("_.")
    if not out:
        raise RegistryError(f"{what} {text!r} is empty once reduced to letters, digits, '.', '-' and '_'")
    return out.lower() if lower else out


def normalize_type(kind: str) -> str:
    """'characters' / 'Character' -> 'character'; a clear error for other types."""
    key = kind.strip().lower()
    for singular, folder in TYPES.items():
        if key in (singular, folder):
            return singular
    raise RegistryError(f"unknown type {kind!r}; use one of {', '.join(TYPES)}")


def client_folder(client: str) -> str:
    name = slug(client, "client", lower=False)
    return name if name.startswith("client_") else f"client_{name}"


def model_key(kind: str, subject: str, client: str | None) -> str:
    """The model's folder relative to the root, which is also its key in the index."""
    parts = [TYPES[kind]] + ([client_folder(client)] if client else []) + [subject]
    return "/".join(parts)


def file_name(base_tag: str, kind: str, subject: str, version: int, day: str, role: str) -> str:
    """`wan2.2_character_sarah_v1_20250115.safetensors`, `..._v1_20250115_high_noise.safetensors`."""
    suffix = "" if role == "single" else f"_{role}"
    return f"{base_tag}_{kind}_{subject}_v{version}_{day.replace('-', '')}{suffix}.safetensors"


def base_model_id(meta: Mapping[str, str]) -> str | None:
    """'wan2.2-t2v-a14b' from `modelspec.architecture` ('wan2.2-t2v-a14b/lora') or `ss_base_model_version`
    ('wan2.2_t2v-A14B'); None when the metadata names neither."""
    arch = (meta.get("modelspec.architecture") or "").strip()
    if arch:
        return arch.split("/")[0].lower()
    version = (meta.get("ss_base_model_version") or "").strip()
    return version.lower().replace("_", "-", 1) if version else None


def base_tag(base_id: str) -> str:
    """The file-name tag of a base model: 'wan2.2-t2v-a14b' -> 'wan2.2'."""
    return slug(base_id.split("-")[0], "base model")


# ---- reading LoRA files -----------------------------------------------------------------------------


def _value(text: Any) -> Any:
    """A metadata string as int, float or text; None for empty values."""
    if text is None or (isinstance(text, str) and text.strip() in ("", "None", "null")):
        return None
    if not isinstance(text, str):
        return text
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def _json(text: str | None) -> dict:
    try:
        data = json.loads(text) if text else {}
    except json.JSONDecodeError:
        return {}
    return data if isinstance(data, dict) else {}


def read_hyperparameters(meta: Mapping[str, str]) -> dict[str, Any]:
    """Training settings from Kohya `ss_*` keys, filled in from `ss_training_config` (our trainer's whole
    resolved config) where a key is absent."""
    cfg = _json(meta.get("ss_training_config"))

    def pick(*candidates):
        return next((v for v in (_value(c) for c in candidates) if v is not None and v != 0), None)

    found = {
        "lr": pick(meta.get("ss_learning_rate"), cfg.get("learning_rate")),
        "dim": pick(meta.get("ss_network_dim"), cfg.get("network_dim")),
        "alpha": pick(meta.get("ss_network_alpha"), cfg.get("network_alpha")),
        "epochs": pick(meta.get("ss_num_epochs"), cfg.get("max_train_epochs"), meta.get("ss_epoch")),
        "steps": pick(meta.get("ss_steps"), meta.get("ss_max_train_steps"), cfg.get("max_train_steps")),
        "batch": pick(meta.get("ss_total_batch_size"), meta.get("ss_batch_size_per_device"),
                      cfg.get("train_batch_size")),
        "grad_accum": pick(meta.get("ss_gradient_accumulation_steps"), cfg.get("gradient_accumulation_steps")),
        "optimizer": pick(meta.get("ss_optimizer"), cfg.get("optimizer_type")),
        "scheduler": pick(meta.get("ss_lr_scheduler"), cfg.get("lr_scheduler")),
        "warmup": pick(meta.get("ss_lr_warmup_steps"), cfg.get("lr_warmup_steps")),
        "seed": next((v for v in (_value(meta.get("ss_seed")), cfg.get("seed")) if v is not None), None),
        "mixed_precision": pick(meta.get("ss_mixed_precision"), cfg.get("mixed_precision")),
        "resolution": pick(meta.get("modelspec.resolution")),
    }
    return {k: v for k, v in found.items() if v is not None}


def read_dataset_count(meta: Mapping[str, str]) -> int | None:
    """Training items: `ss_num_train_items` / `ss_num_train_images`, or the sum of `ss_dataset_dirs` counts."""
    count = _value(meta.get("ss_num_train_items")) or _value(meta.get("ss_num_train_images"))
    if isinstance(count, int):
        return count
    dirs = _json(meta.get("ss_dataset_dirs"))
    counts = [d.get("img_count") for d in dirs.values() if isinstance(d, dict)]
    return sum(c for c in counts if isinstance(c, int)) or None


@dataclass
class LoraInfo:
    path: Path
    meta: dict[str, str]
    modules: int
    expert: str | None  # "high_noise" / "low_noise" from `ss_expert` or the file name, else None
    base_model: str | None


def inspect_lora(path: str | Path) -> LoraInfo:
    """Read a LoRA file's keys and metadata (no tensor data); a clear error for anything that is not one."""
    from safetensors import safe_open

    from networks.lora import split_lora_key

    path = Path(path)
    if not path.is_file():
        raise RegistryError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            keys, meta = list(fh.keys()), dict(fh.metadata() or {})
    except Exception as exc:  # safetensors raises its own and OS errors alike
        raise RegistryError(f"{path} is not a readable safetensors file ({exc})") from exc
    modules = {p[0] for p in map(split_lora_key, keys) if p is not None and p[1] in ("down", "up")}
    if not modules:
        raise RegistryError(f"{path} is not a LoRA: none of its {len(keys)} tensors is a LoRA down/up weight "
                            f"(first keys: {', '.join(keys[:3]) or 'none'}); the registry holds LoRA files only")
    expert = meta.get("ss_expert") if meta.get("ss_expert") in ROLES[:2] else None
    expert = expert or next((r for r in ROLES[:2] if path.stem.endswith("_" + r)), None)
    return LoraInfo(path, meta, len(modules), expert, base_model_id(meta))


def assign_roles(files: Sequence[str | Path] | Mapping[str, str | Path]) -> dict[str, LoraInfo]:
    """{role: info}: one file ('single', or its expert when it is one expert alone), or a high/low pair.
    A mapping names the roles itself; they must agree with the files' `ss_expert` metadata."""
    if isinstance(files, Mapping):
        roles = {role: inspect_lora(p) for role, p in files.items()}
        for role, info in roles.items():
            if role not in ROLES:
                raise RegistryError(f"unknown file role {role!r}; use one of {', '.join(ROLES)}")
            if role != "single" and info.meta.get("ss_expert") not in (None, role):
                raise RegistryError(f"{info.path} was given as the {role} file but its metadata says it is the "
                                    f"{info.meta['ss_expert']} expert")
    else:
        infos = [inspect_lora(p) for p in files]
        if len(infos) == 1:
            roles = {infos[0].expert or "single": infos[0]}
        elif len(infos) == 2:
            unknown = [str(i.path) for i in infos if i.expert is None]
            if unknown:
                raise RegistryError(f"cannot tell which expert {', '.join(unknown)} is (no ss_expert metadata, no "
                                    "_high_noise / _low_noise in the name); use --high_noise and --low_noise")
            if infos[0].expert == infos[1].expert:
                raise RegistryError(f"two files must be the high_noise and low_noise experts of one LoRA, but "
                                    f"{infos[0].path} and {infos[1].path} are both {infos[0].expert}")
            roles = {i.expert: i for i in infos}
        else:
            raise RegistryError(f"a version is one LoRA file or a WAN 2.2 A14B expert pair, got {len(infos)} files")
    if len(roles) == 2 and set(roles) != {"high_noise", "low_noise"}:
        names = ", ".join(f"{i.path} ({r})" for r, i in roles.items())
        raise RegistryError(f"two files must be the high_noise and low_noise experts of one LoRA: {names}")
    if not roles:
        raise RegistryError("no LoRA file given")
    return roles


# ---- files ------------------------------------------------------------------------------------------


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def copy_verified(src: Path, dst: Path, expected: str) -> None:
    """Copy src to dst through a temp file in dst's folder, then check the copy's SHA-256 against
    `expected` (the source's) before os.replace puts it in place."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)
    try:
        with os.fdopen(fd, "wb") as out, open(src, "rb") as fh:
            while block := fh.read(1 << 22):
                out.write(block)
            out.flush()
            os.fsync(out.fileno())
        got = sha256_file(Path(tmp))
        if got != expected:
            raise RegistryError(f"copy of {src} to {dst} does not match the source (sha256 {got[:12]}... != "
                                f"{expected[:12]}...); the disk or the source changed during the copy; retry")
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


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


def _check_index(data: Any, path: Path) -> dict:
    """The loaded index, or an error naming the file and the bad entry (never a silent reset)."""
    def bad(what: str):
        return RegistryError(f"{path} is not a valid registry index: {what}. Nothing was changed; fix the "
                             "entry by hand or restore the file from git or a backup")

    if not isinstance(data, dict) or not isinstance(data.get("models"), dict):
        raise bad("no 'models' object at the top level")
    if not isinstance(data.get("format"), int) or data["format"] > FORMAT:
        raise bad(f"format {data.get('format')!r} (this tool reads format {FORMAT}); update the trainer")
    for key, model in data["models"].items():
        if not isinstance(model, dict) or not isinstance(model.get("versions"), list):
            raise bad(f"model {key!r} has no 'versions' list")
        if model.get("type") not in TYPES or not isinstance(model.get("subject"), str):
            raise bad(f"model {key!r} has no valid 'type' ({', '.join(TYPES)}) or 'subject'")
        model.setdefault("key", key)
        for v in model["versions"]:
            if not (isinstance(v, dict) and isinstance(v.get("version"), int) and isinstance(v.get("files"), dict)
                    and v.get("status") in STATUSES):
                raise bad(f"model {key!r} has a version entry without a number, files or a valid status: {v!r:.120}")
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


# ---- the registry -----------------------------------------------------------------------------------


@dataclass
class _Edit:
    index: dict
    touched: set
    created: list  # files to remove again when the edit fails


class Registry:
    """The registry under `root`: read the index, change it under the lock, regenerate the notes."""

    def __init__(self, root: str | Path = "lora_registry", lock_timeout: float = 10.0):
        self.root = Path(root)
        self.index_path = self.root / INDEX_NAME
        self.lock_timeout = lock_timeout

    def load(self) -> dict:
        if not self.index_path.exists():
            stray = next(self.root.rglob("*.safetensors"), None) if self.root.is_dir() else None
            if stray is not None:
                raise RegistryError(f"{self.index_path} is missing but {self.root} holds LoRA files ({stray}); "
                                    "restore the index from git or a backup instead of starting an empty one")
            return {"format": FORMAT, "models": {}}
        try:
            data = json.loads(self.index_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise RegistryError(f"{self.index_path} is corrupted ({exc}). Nothing was changed; restore it from git "
                                "or a backup (the LoRA files and training notes are untouched)") from exc
        return _check_index(data, self.index_path)

    def find(self, ref: ModelRef, index: dict | None = None) -> dict:
        """The one model matching the reference; a clear error when none or several do."""
        index = self.load() if index is None else index
        subject = slug(ref.subject, "subject")
        kind = normalize_type(ref.kind) if ref.kind else None
        client = client_folder(ref.client) if ref.client else None
        found = [m for m in index["models"].values() if m["subject"] == subject
                 and (kind is None or m["type"] == kind)
                 and (client is None or (m.get("client") and client_folder(m["client"]) == client))]
        if not found:
            where = "".join(f", {k} {v}" for k, v in (("type", kind), ("client", ref.client)) if v)
            raise RegistryError(f"no model {subject!r}{where} in {self.index_path}; `list` shows what is there")
        if len(found) > 1:
            keys = ", ".join(sorted(m["key"] for m in found))
            raise RegistryError(f"subject {subject!r} is ambiguous in {self.index_path} ({keys}); "
                                "name it with --type and --client")
        return found[0]

    @contextmanager
    def _editing(self, create: bool = False) -> Iterator[_Edit]:
        if not create and not self.index_path.is_file():
            raise RegistryError(f"no registry at {self.root} (no {INDEX_NAME}); `add` a LoRA first, or check --root")
        with registry_lock(self.root, self.lock_timeout):
            edit = _Edit(self.load(), set(), [])
            try:
                yield edit
                write_atomic(self.index_path, json.dumps(edit.index, indent=2, ensure_ascii=False) + "\n")
            except BaseException:
                for path in edit.created:
                    path.unlink(missing_ok=True)
                raise
            for key in sorted(edit.touched):
                model = edit.index["models"][key]
                write_atomic(self.root / key / NOTES_NAME, render_notes(model))

    # ---- add ----

    def add(self, files: Sequence[str | Path] | Mapping[str, str | Path], ref: ModelRef, *, changes: str = "",
            dataset: str = "", dataset_count: int | None = None, base_model: str | None = None,
            batch: int | None = None, by: str | None = None, day: str | Date | None = None,
            force: bool = False) -> dict:
        """Copy a LoRA file (or expert pair) in as the next version of the model, status Testing. `batch`
        (and `dataset_count`) fill in what the metadata lacks: the batch size lives in the dataset TOML."""
        if not ref.kind:
            raise RegistryError(f"adding needs a type ({', '.join(TYPES)})")
        kind, subject = normalize_type(ref.kind), slug(ref.subject, "subject")
        client = slug(ref.client, "client", lower=False).removeprefix("client_") if ref.client else None
        roles = assign_roles(files)
        base = _resolve_base(roles, base_model, force)
        hashes = {role: sha256_file(info.path) for role, info in roles.items()}
        if len(set(hashes.values())) < len(hashes):
            raise RegistryError(f"{' and '.join(str(i.path) for i in roles.values())} are the same file; "
                                "an expert pair is two different files")
        key, day = model_key(kind, subject, client), _day(day)
        with self._editing(create=True) as edit:
            model = edit.index["models"].setdefault(key, {"key": key, "type": kind, "subject": subject,
                                                          "client": client, "base_model": base, "versions": []})
            forced = _conflicts(model, roles, base, hashes, force)
            number = max((v["version"] for v in model["versions"]), default=0) + 1
            record = {}
            for role in (r for r in ROLES if r in roles):
                info = roles[role]
                dst = self.root / key / file_name(base_tag(base), kind, subject, number, day, role)
                if dst.exists():
                    raise RegistryError(f"{dst} exists but is not in {self.index_path}; move it away and retry")
                edit.created.append(dst)
                copy_verified(info.path, dst, hashes[role])
                record[role] = {"path": dst.relative_to(self.root).as_posix(), "sha256": hashes[role],
                                "size": dst.stat().st_size, "source": str(info.path), "lora_modules": info.modules,
                                "hyperparameters": read_hyperparameters(info.meta)}
                if batch is not None:
                    record[role]["hyperparameters"]["batch"] = batch
            meta = next(iter(roles.values())).meta
            version = {
                "version": number, "date": day, "status": "Testing", "base_model": base, "files": record,
                "dataset": {"count": dataset_count if dataset_count is not None else read_dataset_count(meta),
                            "description": dataset,
                            "config": _json(meta.get("ss_training_config")).get("dataset_config")},
                "changes": changes, "output_name": meta.get("ss_output_name"), "gates": {}, "tests": [],
            }
            model["versions"].append(version)
            model["base_model"] = base
            _event(model, number, "added", by, forced=forced)
            edit.touched.add(key)
        return version

    # ---- tests, gates, promotion, rollback ----

    def record_test(self, ref: ModelRef, *, version: int | None = None, scores: Mapping[str, float] | None = None,
                    issues: Sequence[str] = (), gate: str | None = None, passed: bool | None = None,
                    by: str | None = None, notes: str = "") -> dict:
        """Record test results (scores, known issues) on a version, and a release gate's outcome."""
        scores = {slug(k, "score name"): float(v) for k, v in (scores or {}).items()}
        if gate is not None and gate not in GATES:
            raise RegistryError(f"unknown release gate {gate!r}; use one of {', '.join(GATES)}")
        if (gate is None) != (passed is None):
            raise RegistryError("a gate result needs both the gate (--gate) and its outcome (--passed / --failed)")
        if not (scores or issues or gate or notes):
            raise RegistryError("nothing to record: give scores, issues, notes or a gate result")
        with self._editing() as edit:
            model = self.find(ref, edit.index)
            target = _version(model, version)
            test = {"date": _now(), "by": by, "scores": scores, "issues": [i for i in issues if i.strip()],
                    "notes": notes}
            if gate is not None:
                test.update(gate=gate, passed=passed)
                target["gates"][gate] = {"state": "passed" if passed else "failed", "date": test["date"], "by": by}
            target["tests"].append(test)
            edit.touched.add(model["key"])
        return test

    def promote(self, ref: ModelRef, *, version: int | None = None, by: str | None = None, force: bool = False,
                reason: str = "") -> dict:
        """Make a version Current once its three release gates passed (or with force, recorded in the notes);
        the previous Current becomes Deprecated."""
        with self._editing() as edit:
            model = self.find(ref, edit.index)
            target = _version(model, version)
            label = f"v{target['version']} of {model['key']}"
            if target["status"] == "Current":
                raise RegistryError(f"{label} is already Current")
            problems = [f"{_gate_title(g)} {_gate_state(target, g)}" for g in GATES
                        if _gate_state(target, g) != "passed"]
            if target.get("broken"):
                problems.append(f"it was rolled back as broken ({target.get('broken_reason')})")
            if problems and not force:
                raise RegistryError(f"{label} cannot be promoted: {'; '.join(problems)}. Record the gates with "
                                    "`test --gate technical|quality|trial --passed`, or pass --force (recorded in "
                                    "the notes)")
            previous = _current(model)
            if previous is not None:
                previous.update(status="Deprecated", deprecated=f"replaced by v{target['version']}")
                _event(model, previous["version"], "deprecated", by, reason=f"replaced by v{target['version']}")
            target.update(status="Current", released=_now())
            target.pop("broken", None)
            _event(model, target["version"], "promoted to Current", by, reason=reason,
                   forced=problems if force else None)
            edit.touched.add(model["key"])
        return target

    def rollback(self, ref: ModelRef, *, reason: str, to: int | None = None, by: str | None = None) -> dict:
        """Revert at once: the Current version becomes Deprecated (marked broken, with the reason) and the
        previous released, non-broken version (or `to`) becomes Current. Returns the new Current."""
        if not reason or not reason.strip():
            raise RegistryError("a rollback needs a reason (--reason); it is documented in the training notes")
        with self._editing() as edit:
            model = self.find(ref, edit.index)
            current = _current(model)
            if current is None:
                raise RegistryError(f"{model['key']} has no Current version to roll back")
            target = _rollback_target(model, current, to)
            current.update(status="Deprecated", broken=True, broken_reason=reason.strip())
            target.update(status="Current")
            target.pop("deprecated", None)
            _event(model, current["version"], "rolled back", by, reason=reason.strip(), to=f"v{target['version']}")
            edit.touched.add(model["key"])
        return target

    # ---- reading ----

    def current_paths(self, ref: ModelRef, version: int | None = None) -> list[Path]:
        """The files of the Current version (or of `version`), high-noise expert first."""
        model = self.find(ref)
        target = _version(model, version) if version is not None else _current(model)
        if target is None:
            raise RegistryError(f"{model['key']} has no Current version (production uses approved models only); "
                                "promote one first, or ask for a --version")
        paths = [self.root / target["files"][r]["path"] for r in ROLES if r in target["files"]]
        for path in paths:
            if not path.is_file():
                raise RegistryError(f"{path} (v{target['version']} of {model['key']}) is missing; run `verify`")
        return [p.resolve() for p in paths]

    def verify(self) -> dict:
        """Recompute every file's SHA-256: {'checked': n, 'problems': [...], 'untracked': [...]}."""
        if not self.root.is_dir():
            raise RegistryError(f"no registry at {self.root}; check --root")
        index = self.load()
        problems, known, checked = [], set(), 0
        for key, model in index["models"].items():
            if sum(v["status"] == "Current" for v in model["versions"]) > 1:
                problems.append(f"{key}: more than one Current version")
            for v in model["versions"]:
                for role, f in v["files"].items():
                    path = self.root / f["path"]
                    known.add(path.resolve())
                    if not path.is_file():
                        problems.append(f"missing: {path} ({key} v{v['version']}, {role})")
                        continue
                    checked += 1
                    if sha256_file(path) != f.get("sha256"):
                        problems.append(f"modified: {path} ({key} v{v['version']}, {role}): its SHA-256 is not the "
                                        "one recorded when it was added")
        stray = sorted(p for p in self.root.rglob("*.safetensors") if p.resolve() not in known)
        return {"checked": checked, "problems": problems, "untracked": [str(p) for p in stray]}

    def rows(self, kind: str | None = None) -> list[dict]:
        """One summary row per model, for `list`."""
        kind = normalize_type(kind) if kind else None
        out = []
        for key, m in sorted(self.load()["models"].items()):
            if kind and m["type"] != kind:
                continue
            cur, last = _current(m), m["versions"][-1] if m["versions"] else None
            out.append({"subject": m["subject"], "type": m["type"], "client": m.get("client") or "-",
                        "versions": len(m["versions"]), "current": f"v{cur['version']}" if cur else "-",
                        "status": f"v{last['version']} {last['status']}" if last else "-", "folder": key})
        return out


def _resolve_base(roles: Mapping[str, LoraInfo], option: str | None, force: bool) -> str:
    found = {str(i.path): i.base_model for i in roles.values()}
    bases = sorted({b for b in found.values() if b})
    if len(bases) > 1:
        raise RegistryError("the files are for different base models: "
                            + ", ".join(f"{p} ({b})" for p, b in found.items()))
    meta_base, wanted = (bases[0] if bases else None), (option.strip().lower() if option else None)
    if meta_base and wanted and meta_base != wanted and not force:
        raise RegistryError(f"{', '.join(found)}: the metadata says base model {meta_base}, --base_model says "
                            f"{wanted}; drop --base_model, or pass --force to use it")
    if not (wanted or meta_base):
        raise RegistryError(f"{', '.join(found)} names no base model in its metadata (modelspec.architecture, "
                            "ss_base_model_version); pass --base_model, e.g. wan2.2-t2v-a14b")
    return wanted or meta_base


def _layout(roles) -> str:
    return "WAN 2.2 expert pair" if len(roles) == 2 else f"single file ({next(iter(roles))})"


def _conflicts(model: dict, roles: Mapping[str, LoraInfo], base: str, hashes: Mapping[str, str],
               force: bool) -> list[str]:
    """What makes the new files a doubtful next version; an error unless forced (then the list is recorded)."""
    files, problems = ", ".join(str(i.path) for i in roles.values()), []
    earlier = sorted({v.get("base_model") for v in model["versions"]} - {None, base})
    if earlier:
        problems.append(f"base model {base} of {files} conflicts with {', '.join(earlier)} of the earlier versions "
                        f"of {model['key']}; a LoRA for another base model is another subject")
    if model["versions"] and set(model["versions"][-1]["files"]) != set(roles):
        last = model["versions"][-1]
        problems.append(f"{files}: a {_layout(roles)}, but v{last['version']} of {model['key']} is a "
                        f"{_layout(last['files'])}")
    for v in model["versions"]:
        for f in v["files"].values():
            problems += [f"{roles[r].path} is identical to v{v['version']}'s {f['path']}"
                         for r, h in hashes.items() if h == f.get("sha256")]
    if problems and not force:
        raise RegistryError("; ".join(problems) + ". Pass --force to add it anyway (recorded in the notes)")
    return problems


def _rollback_target(model: dict, current: dict, to: int | None) -> dict:
    if to is not None:
        target = _version(model, to)
        label = f"v{to} of {model['key']}"
        if target is current:
            raise RegistryError(f"{label} is the Current version; roll back to an earlier one")
        if target.get("broken"):
            raise RegistryError(f"{label} was itself rolled back as broken ({target.get('broken_reason')})")
        if not target.get("released"):
            raise RegistryError(f"{label} was never released (status {target['status']}); promote it through "
                                "the release gates instead")
        return target
    earlier = [v for v in model["versions"] if v["version"] < current["version"] and v.get("released")
               and not v.get("broken")]
    if not earlier:
        raise RegistryError(f"{model['key']} has no earlier released, non-broken version to roll back to from "
                            f"v{current['version']}")
    return earlier[-1]


# ---- training notes ---------------------------------------------------------------------------------


def _fmt(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def _hyper_line(hp: Mapping[str, Any]) -> str:
    keys = [k for k in HYPER_KEYS if k in hp] + sorted(k for k in hp if k not in HYPER_KEYS)
    return ", ".join(f"{k} {_fmt(hp[k])}" for k in keys) or "not recorded in the metadata"


def _settings_diff(version: dict, previous: dict) -> str:
    """'lr 0.0001 -> 0.00015, dim 64 -> 96' between the versions' first common file."""
    role = next((r for r in ROLES if r in version["files"] and r in previous["files"]), None)
    if role is None:
        return ""
    new, old = version["files"][role]["hyperparameters"], previous["files"][role]["hyperparameters"]
    changed = [k for k in HYPER_KEYS if k not in ("seed", "steps") and new.get(k) != old.get(k)]
    return ", ".join(f"{k} {_fmt(old.get(k, '-'))} -> {_fmt(new.get(k, '-'))}" for k in changed)


def _scores_line(latest: Mapping[str, tuple[float, str]]) -> str:
    return ", ".join(f"{k} {_fmt(v)}" for k, (v, _) in latest.items())


def _version_lines(v: dict, previous: dict | None) -> list[str]:
    n, files = v["version"], v["files"]
    state = v["status"]
    if v.get("broken"):
        state += f" (rolled back as broken: {v.get('broken_reason')})"
    elif v.get("deprecated"):
        state += f" ({v['deprecated']})"
    lines = [f"## v{n} ({v['date']}): {state}", ""]
    lines += [f"- File{'s' if len(files) > 1 else ''}: " + "; ".join(
        f"`{Path(f['path']).name}` (sha256 `{f['sha256'][:12]}`, {_size(f['size'])})" for f in files.values())]
    if v.get("released"):
        lines.append(f"- Released to production: {v['released']}")
    lines.append(f"- Base model: {v.get('base_model')}")
    data = v.get("dataset", {})
    count = f"{data['count']} items" if data.get("count") else "count not recorded"
    extra = "".join(f"; {x}" for x in (data.get("description"), data.get("config") and f"config `{data['config']}`")
                    if x)
    lines.append(f"- Dataset: {count}{extra}")
    hps = {r: f["hyperparameters"] for r, f in files.items()}
    if len({json.dumps(h, sort_keys=True) for h in hps.values()}) == 1:
        lines.append(f"- Hyperparameters: {_hyper_line(next(iter(hps.values())))}")
    else:
        lines += [f"- Hyperparameters ({r}): {_hyper_line(h)}" for r, h in hps.items()]
    if previous is None:
        lines.append(f"- Changes: first version{'; ' + v['changes'] if v.get('changes') else ''}")
    else:
        diff = _settings_diff(v, previous)
        text = "; ".join(x for x in (v.get("changes"), diff and f"settings: {diff}") if x) or "not described"
        lines.append(f"- Changes from v{previous['version']}: {text}")
    lines.append("- Release gates:")
    for gate in GATES:
        g = v.get("gates", {}).get(gate, {})
        mark = "x" if g.get("state") == "passed" else " "
        when = f" {g['date']}" + (f" by {g['by']}" if g.get("by") else "") if g else ""
        lines.append(f"  - [{mark}] {GATES[gate]}: **{g.get('state', 'pending')}**{when}")
    tests = v.get("tests", [])
    lines.append("- Test results:" + ("" if tests else " none recorded"))
    for t in tests:
        head = t["date"] + (f" by {t['by']}" if t.get("by") else "")
        if t.get("gate"):
            head += f", {_gate_title(t['gate'])} {'passed' if t['passed'] else 'failed'}"
        body = "; ".join(x for x in (", ".join(f"{k} {_fmt(s)}" for k, s in t.get("scores", {}).items()),
                                     "; ".join(f"issue: {i}" for i in t.get("issues", [])), t.get("notes")) if x)
        lines.append(f"  - {head}" + (f": {body}" if body else ""))
    issues = [i for t in tests for i in t.get("issues", [])]
    lines.append("- Known issues: " + ("; ".join(issues) if issues else "none recorded"))
    latest = _latest_scores(v)
    if latest:
        lines.append(f"- Latest scores: {_scores_line(latest)}")
    return lines + [""]


def render_notes(model: dict) -> str:
    """The model's `training_notes.md`: the current version, monitoring, every version newest first, history."""
    cur = _current(model)
    client = f" (client {model['client']})" if model.get("client") else ""
    lines = [f"# {model['type']}: {model['subject']}{client}", "",
             f"Generated from `{INDEX_NAME}` by `tools/registry.py`; edits made here are overwritten.", "",
             f"- Base model: {model['base_model']}",
             "- Current version: " + (f"v{cur['version']} ({cur['date']})" if cur else
                                      "none (nothing approved for production yet)"),
             f"- Versions: {len(model['versions'])}", ""]
    if cur is not None:
        latest = _latest_scores(cur)
        lines += [f"## Monitoring (v{cur['version']}, latest values)", ""]
        names = list(MONITOR_SCORES) + [k for k in latest if k not in MONITOR_SCORES]
        lines += [f"- {k}: " + (f"{_fmt(latest[k][0])} ({latest[k][1]})" if k in latest else "not recorded")
                  for k in names] + [""]
    versions = model["versions"]
    for i in range(len(versions) - 1, -1, -1):
        lines += _version_lines(versions[i], versions[i - 1] if i else None)
    lines += ["## History", ""]
    for e in model.get("history", []):
        line = f"- {e['date']} v{e['version']} {e['event']}" + (f" by {e['by']}" if e.get("by") else "")
        line += f" (to {e['to']})" if e.get("to") else ""
        line += f": {e['reason']}" if e.get("reason") else ""
        line += f" [FORCED: {'; '.join(e['forced'])}]" if e.get("forced") else ""
        lines.append(line)
    return "\n".join(lines) + "\n"


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """A plain-text table with a header row."""
    cells = [list(columns)] + [[_fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells)
