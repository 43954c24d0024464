"""LoRA files: names in the registry (slugs, types, folders, file names, base-model tags), reading a LoRA's
keys and metadata (hyperparameters, dataset size, expert role, base model), assigning the files of a
version to their roles, and hashing and verified atomic copying of the files themselves.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from .index import ROLES, TYPES, RegistryError


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
