"""TOML + command line -> a frozen `TrainConfig`, with precedence defaults < TOML < CLI.

`build_parser()` derives every flag from the schema; `load_config(argv)` reads `--config_file`, flattens
one level of TOML sections, maps aliases, skips GUI-only keys, rejects unknown or misplaced keys (naming
the closest valid one) and coerces each value through its field's type, whatever its source.
"""

from __future__ import annotations

import argparse
import difflib
import logging
import os
import typing
from dataclasses import fields
from pathlib import Path
from typing import Any, Sequence

from . import keys as K
from .coerce import ConfigError, coerce_value, type_name
from .presets import apply_preset
from .schema import FIELD_GROUP, GROUPS, TrainConfig

logger = logging.getLogger(__name__)

_HINTS = {name: typing.get_type_hints(cls) for name, cls in GROUPS.items()}
FIELD_TYPES: dict[str, Any] = {name: _HINTS[group][name] for name, group in FIELD_GROUP.items()}
_FIELDS = {f.name: f for cls in GROUPS.values() for f in fields(cls)}
_NO_VALUE = object()


def _is_dict_field(name: str) -> bool:
    return FIELD_TYPES.get(name) is dict


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of every config field, grouped like the schema. Flags absent from the command
    line stay absent from the namespace (no argparse defaults), so a TOML value is only overridden by a
    flag that was really given. Booleans take an optional value: `--fp8_base`, `--fp8_base false`."""
    parser = argparse.ArgumentParser(
        description="LoRA training for WAN 2.1 / 2.2. Every flag can also be a key of --config_file.",
        argument_default=argparse.SUPPRESS, allow_abbrev=False,
    )
    for group_name, cls in GROUPS.items():
        group = parser.add_argument_group(group_name)
        for f in fields(cls):
            tp = FIELD_TYPES[f.name]
            help_text = f.metadata["help"]
            if "choices" in f.metadata:
                help_text += f" (one of: {', '.join(c for c in f.metadata['choices'] if c)})"
            if tp is bool or tp == bool | None:
                group.add_argument(f"--{f.name}", nargs="?", const=True, metavar="BOOL", help=help_text)
            elif tp is dict or typing.get_origin(tp) is tuple:
                group.add_argument(f"--{f.name}", nargs="*", metavar="VALUE", help=help_text)
            else:
                group.add_argument(f"--{f.name}", metavar=f.name.upper(), help=help_text)
    return parser


def _leftover_flags(tokens: list[str]) -> dict[str, Any]:
    """Flags argparse does not know (aliases, GUI-only keys, typos): `--key [values...]` pairs."""
    found: dict[str, Any] = {}
    key = None
    for token in tokens:
        if token.startswith("--"):
            key, _, inline = token[2:].partition("=")
            found[key] = inline if inline else _NO_VALUE
        elif key is None:
            raise ConfigError(f"command line: unexpected argument {token!r}")
        else:
            current = found[key]
            found[key] = token if current is _NO_VALUE else (
                [*current, token] if isinstance(current, list) else [current, token])
    return {k: (True if v is _NO_VALUE else v) for k, v in found.items()}


def find_config_file(path: str | Path) -> Path:
    """The training TOML `--config_file` names; like musubi-tuner, `my_lora` means `my_lora.toml`."""
    path = Path(path).expanduser()
    if path.is_file() or path.suffix.lower() == ".toml":
        return path
    with_suffix = path.with_name(path.name + ".toml")
    if with_suffix.is_file():
        logger.info("config file %s: using %s", path, with_suffix)
        return with_suffix
    raise ConfigError(f"config file {path} not found (nor {with_suffix})")


def read_toml(path: str | Path) -> dict[str, Any]:
    """Parse a training TOML and flatten one level of sections; a clear error for anything else."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"config file {path} not found")
    try:
        data = _parse_toml(path)
    except (ValueError, UnicodeDecodeError) as exc:  # TOMLDecodeError of either parser is a ValueError
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return flatten_sections(data, str(path))


def _parse_toml(path: Path) -> dict[str, Any]:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import toml

        return toml.loads(path.read_text(encoding="utf-8"))
    with open(path, "rb") as fh:
        return tomllib.load(fh)


def flatten_sections(data: dict[str, Any], source: str) -> dict[str, Any]:
    """{"model": {"dit": ...}, "seed": 1} -> {"dit": ..., "seed": 1}; a table named after a key=value
    field (`[network_args]`) is that field's value, not a section."""
    flat: dict[str, Any] = {}
    where: dict[str, str] = {}
    for key, value in data.items():
        if isinstance(value, dict) and not _is_dict_field(key):
            items = value.items()
            section = f"[{key}]"
        else:
            items, section = [(key, value)], "top level"
        for sub_key, sub_value in items:
            if isinstance(sub_value, dict) and not _is_dict_field(sub_key):
                raise ConfigError(f"{source}: [{key}.{sub_key}] is nested too deep; only one level of "
                                  "sections ([model], [training], ...) is flattened")
            if sub_key in flat:
                raise ConfigError(f"{source}: key {sub_key!r} is set twice ({where[sub_key]} and {section})")
            flat[sub_key], where[sub_key] = sub_value, section
    return flat


def _suggest(key: str) -> str:
    valid = list(FIELD_TYPES) + list(K.ALIASES)
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else "; run with --help for the valid keys"


def resolve_keys(raw: dict[str, Any], source: str, warned: set[str]) -> dict[str, Any]:
    """Aliases, GUI-only, other architectures', no-effect, unsupported, misplaced and unknown keys ->
    {field name: raw value}. Skipped keys are logged once per load (`warned`), grouped by reason."""
    out: dict[str, Any] = {}
    skipped: dict[tuple[int, str], list[str]] = {}
    for key, value in raw.items():
        name = K.ALIASES.get(key, key)
        if name != key:
            logger.info("%s: %r is an old name of %r; using it as %r", source, key, name, name)
        if name in FIELD_TYPES:
            if isinstance(value, str) and not value.strip():
                continue  # "" means not set, as when a GUI drops the key
            if name in out:
                raise ConfigError(f"{source}: {name!r} is given twice (once as its alias {key!r})")
            out[name] = value
            continue
        why = _skip_reason(name, value, source)
        if why is None:
            raise ConfigError(f"{source}: unknown key {key!r}{_suggest(key)}")
        skipped.setdefault(why, []).append(name)
    for (level, reason), names in skipped.items():
        fresh = [n for n in names if n not in warned]
        warned.update(fresh)
        if fresh:
            logger.log(level, "%s: skipping %s: %s", source, ", ".join(fresh), reason)
    return out


def _shown(name: str, value: Any) -> str:
    return "<hidden>" if name in K.SECRET_KEYS else repr(value)


def _skip_reason(name: str, value: Any, source: str) -> tuple[int, str] | None:
    """(log level, reason) for a key that is accepted but not a field; raises ConfigError for a key that
    cannot be honoured; None for an unknown key."""
    if K.is_gui_only(name):
        return logging.INFO, "settings of the launcher, the caching tools or the GUI itself, not of training"
    if name in K.OTHER_ARCHITECTURE_KEYS:
        return logging.INFO, "other architectures' settings (musubi-tuner-gui writes them all), no meaning for WAN"
    if name == "architecture":
        if K.is_off(value) or str(value).strip().lower() == "wan":
            return logging.INFO, "the GUI's model family (wan)"
        raise ConfigError(f"{source}: architecture = {value!r}: this config is for another model family; this "
                          'trainer trains WAN (musubi-tuner-gui: architecture "Wan 2.1/2.2")')
    if name in K.NO_EFFECT_KEYS:
        return (logging.INFO if K.is_off(value) else logging.WARNING), f"no effect here: {K.NO_EFFECT_KEYS[name]}"
    if name == "wandb_api_key":
        if K.is_off(value):
            return logging.INFO, "empty"
        if os.environ.get("WANDB_API_KEY"):
            return logging.INFO, "WANDB_API_KEY is set in the environment; wandb logs in with that key"
        os.environ["WANDB_API_KEY"] = str(value)
        return logging.INFO, "used to log in to wandb as WANDB_API_KEY (a secret is never stored in the config)"
    if name in K.UNSUPPORTED_FLAGS:
        if K.is_musubi_default(name, value):
            return logging.INFO, "musubi-tuner options at their default (not implemented here)"
        raise ConfigError(f"{source}: {name} = {_shown(name, value)} is a musubi-tuner option this trainer does not "
                          f"support: {K.UNSUPPORTED_FLAGS[name][1]}; remove it")
    if name in K.MISPLACED_KEYS:
        raise ConfigError(f"{source}: {name!r} {K.MISPLACED_KEYS[name]}")
    return None


def coerce_field(name: str, value: Any, source: str) -> Any:
    """One raw value -> its field's type, choices checked, field normaliser applied."""
    meta = _FIELDS[name].metadata
    try:
        result = coerce_value(FIELD_TYPES[name], value)
        if "coerce" in meta:
            result = meta["coerce"](result)
    except (TypeError, ValueError) as exc:
        detail = f" ({exc})" if str(exc) else ""
        raise ConfigError(f"{source}: {name} = {value!r}: expected {type_name(FIELD_TYPES[name])}{detail}") from None
    choices = meta.get("choices")
    if choices and result is not None:
        lowered = {c.lower(): c for c in choices}
        if str(result).lower() not in lowered:
            valid = ", ".join(repr(c) for c in choices if c)
            raise ConfigError(f"{source}: {name} = {value!r} is not one of {valid}")
        result = lowered[str(result).lower()]
    return result


def config_from_values(values: dict[str, Any]) -> TrainConfig:
    """Already-coerced flat values -> the nested frozen config (absent fields keep their defaults). A
    `preset` fills the keys it covers that are not set explicitly."""
    values = apply_preset(values)
    grouped: dict[str, dict[str, Any]] = {group: {} for group in GROUPS}
    for name, value in values.items():
        grouped[FIELD_GROUP[name]][name] = value
    return TrainConfig(**{group: GROUPS[group](**kwargs) for group, kwargs in grouped.items()})


def config_from_dict(raw: dict[str, Any], source: str = "config") -> TrainConfig:
    """A flat (or one-level sectioned) dict, as a GUI or a test would give it -> TrainConfig."""
    warned: set[str] = set()
    resolved = resolve_keys(flatten_sections(raw, source), source, warned)
    return config_from_values({n: coerce_field(n, v, source) for n, v in resolved.items()})


def load_config(argv: Sequence[str] | None = None) -> TrainConfig:
    """Parse the command line (and the TOML it names) into a TrainConfig; not yet validated."""
    parser = build_parser()
    namespace, leftovers = parser.parse_known_args(argv)
    warned: set[str] = set()
    cli = resolve_keys({**_leftover_flags(leftovers), **vars(namespace)}, "command line", warned)
    values: dict[str, Any] = {}
    config_file = cli.get("config_file")
    if config_file:
        config_file = cli["config_file"] = str(find_config_file(config_file))
        from_toml = resolve_keys(read_toml(config_file), config_file, warned)
        values.update({n: coerce_field(n, v, config_file) for n, v in from_toml.items()})
    values.update({n: coerce_field(n, v, "command line") for n, v in cli.items()})
    return config_from_values(values)
