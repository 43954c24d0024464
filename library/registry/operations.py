"""The registry's operations: the `Registry` class (load and find models, edit the index under the lock and
regenerate the notes; add, record_test, promote, rollback, current_paths, verify, rows) and the checks
behind them (base model, conflicts with earlier versions, rollback target). Argument parsing lives in
`tools/registry.py`.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date as Date
from pathlib import Path
from typing import Iterator, Mapping, Sequence

from .files import (
    LoraInfo, _json, assign_roles, base_tag, client_folder, copy_verified, file_name, model_key, normalize_type,
    read_dataset_count, read_hyperparameters, sha256_file, slug,
)
from .index import (
    FORMAT, GATES, INDEX_NAME, NOTES_NAME, ROLES, TYPES, ModelRef, RegistryError, _check_index, _current, _day,
    _event, _gate_state, _gate_title, _now, _version, path_problem, registry_lock, write_atomic,
)
from .notes import render_notes


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
        if self.root.exists() and not self.root.is_dir():
            raise RegistryError(f"{self.root} is a file, not a registry folder; check --root")
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
                problem = path_problem(dst.relative_to(self.root).as_posix(), self.root)
                if problem is not None:
                    raise RegistryError(f"cannot add {info.path}: the file's place {problem}; remove that link")
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
