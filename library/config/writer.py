"""A resolved TrainConfig -> a flat dict (for metadata) or a flat TOML that loads back equal."""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import fields
from pathlib import Path
from typing import Any

from .coerce import format_key_value_args
from .schema import GROUPS, TrainConfig

# Not written to the TOML: where it came from, and the flag that would make the saved file re-export itself.
_NOT_SAVED = ("config_file", "output_config")


def config_to_dict(cfg: TrainConfig) -> dict[str, Any]:
    """Flat {flag name: value} in schema order; lists instead of tuples, key=value dicts kept as dicts,
    JSON-serialisable (for the LoRA metadata and logs)."""
    flat: dict[str, Any] = {}
    for group in GROUPS:
        args = getattr(cfg, group)
        for f in fields(args):
            value = getattr(args, f.name)
            flat[f.name] = list(value) if isinstance(value, tuple) else value
    return flat


def config_to_json(cfg: TrainConfig) -> str:
    return json.dumps(config_to_dict(cfg), ensure_ascii=False, sort_keys=False, default=str)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # a JSON string is a valid TOML basic string
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} to TOML")


def config_to_toml(cfg: TrainConfig) -> str:
    """Flat keys grouped under comments; None values are left out (absent means default)."""
    lines = [f"# Resolved WAN training config{f' (from {cfg.run.config_file})' if cfg.run.config_file else ''}."]
    for group in GROUPS:
        args = getattr(cfg, group)
        block = []
        for f in fields(args):
            value = getattr(args, f.name)
            if f.name in _NOT_SAVED or value is None:
                continue
            if isinstance(value, dict):
                value = format_key_value_args(value)
            block.append(f"{f.name} = {_toml_value(value)}")
        if block:
            lines += ["", f"# {group}", *block]
    return "\n".join(lines) + "\n"


def save_config(cfg: TrainConfig, path: str | os.PathLike) -> Path:
    """Write the resolved config as TOML atomically (a temp file in the same folder, then os.replace)."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(config_to_toml(cfg))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
