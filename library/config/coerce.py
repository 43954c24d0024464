"""Value coercion: any raw value (TOML, CLI string, GUI quirk) -> the type a schema field declares.

Also the one parser of Kohya "key=value" argument lists (`network_args`, `optimizer_args`,
`lr_scheduler_args`) into typed dicts, and its inverse for writing a config back out.
"""

from __future__ import annotations

import ast
import types
import typing
from typing import Any

from library.errors import UserError


class ConfigError(UserError, ValueError):
    """A user-facing config mistake: the message names the file or flag, the key and what to do."""


_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}
_TYPE_NAMES = {bool: "a boolean (true / false)", int: "an integer", float: "a number (e.g. 1e-4)",
               str: "a string", dict: 'a list of "key=value" strings'}


def type_name(tp: Any) -> str:
    """How an annotation reads in an error message."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in args)
    if origin is tuple:
        return f"a list of {type_name(args[0]).removeprefix('a ').removeprefix('an ')}s"
    return _TYPE_NAMES.get(tp, getattr(tp, "__name__", str(tp)))


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise TypeError


def _to_int(value: Any) -> int:
    if isinstance(value, bool):
        raise TypeError
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        value = value.strip()
        try:
            return int(value)
        except ValueError:
            value = float(value)  # "1e3", "16.0"
    if isinstance(value, float) and value.is_integer():
        return int(value)
    raise TypeError


def _to_float(value: Any) -> float:
    if isinstance(value, bool):
        raise TypeError
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        return float(value.strip())
    raise TypeError


def _to_str(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise TypeError
    return str(value)


def _to_int_or_float(value: Any) -> int | float:
    """Steps or a ratio (`lr_warmup_steps`): integral values become int, others stay float."""
    number = _to_float(value)
    return int(number) if number.is_integer() else number


_SCALARS = {bool: _to_bool, int: _to_int, float: _to_float, str: _to_str}


def coerce_value(tp: Any, value: Any) -> Any:
    """Coerce `value` to the annotation `tp`; raises TypeError / ValueError when it cannot."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        if value is None or (isinstance(value, str) and value.strip() in ("", "None", "none")):
            if type(None) in args:
                return None
        if set(inner) == {int, float}:
            return _to_int_or_float(value)
        return coerce_value(inner[0], value)
    if origin is tuple:
        if value is None or value == "":
            return ()
        items = value if isinstance(value, (list, tuple)) else [value]
        return tuple(coerce_value(args[0], v) for v in items)
    if tp is dict:
        return parse_key_value_args(value)
    if value is None:
        raise TypeError
    return _SCALARS[tp](value)


# ---- Kohya "key=value" argument lists --------------------------------------------------------------


def split_args_string(text: str) -> list[str]:
    """Split 'a=1 b=[".*x y.*", "z"] c="q r"' on whitespace outside brackets and quotes."""
    tokens, current, depth, quote = [], "", 0, ""
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "[(":
            depth += 1
        elif ch in "])":
            depth -= 1
        elif ch.isspace() and depth == 0:
            if current:
                tokens.append(current)
            current = ""
            continue
        current += ch
    if current:
        tokens.append(current)
    return tokens


def parse_arg_value(text: str) -> Any:
    """'4' -> 4, '1e-4' -> 1e-4, 'true' -> True, '0.9,0.999' -> (0.9, 0.999), '[".*ffn.*"]' -> list,
    '[.*ffn.*]' (unquoted) -> ['.*ffn.*'], anything else stays a string."""
    text = text.strip()
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        if text.startswith("[") and text.endswith("]"):
            return [item.strip().strip("\"'") for item in text[1:-1].split(",") if item.strip()]
        return text
    return list(value) if isinstance(value, list) else value


def parse_key_value_args(value: Any) -> dict[str, Any]:
    """A list of "key=value" strings (or one space-separated string, or a dict) -> a typed dict."""
    if isinstance(value, dict):
        return {str(k): (parse_arg_value(v) if isinstance(v, str) else v) for k, v in value.items()}
    if value is None:
        return {}
    items = split_args_string(value) if isinstance(value, str) else list(value)
    parsed: dict[str, Any] = {}
    for item in items:
        if not isinstance(item, str) or "=" not in item:
            raise ValueError(f'{item!r} is not a "key=value" string')
        key, _, text = item.partition("=")
        if not key.strip():
            raise ValueError(f'{item!r} has no key before "="')
        parsed[key.strip()] = parse_arg_value(text)
    return parsed


def format_key_value_args(args: dict[str, Any]) -> list[str]:
    """The inverse of `parse_key_value_args`: a dict -> ["key=value", ...] that parses back equal."""
    out = []
    for key, value in args.items():
        text = value if isinstance(value, str) and parse_arg_value(value) == value else repr(value)
        out.append(f"{key}={text}")
    return out


# ---- field-specific normalisers ---------------------------------------------------------------------


def normalise_timestep_boundary(value: int | float | None) -> float | None:
    """musubi's int timestep (0-1000) or a float fraction (0-1) -> a float fraction."""
    if value is None or value == 0:  # GUIs write 0 for "not set"
        return None
    if isinstance(value, int):
        if 0 <= value <= 1000:
            return value / 1000.0
    elif 0.0 <= value <= 1.0:
        return float(value)
    elif 1.0 < value <= 1000.0:
        return value / 1000.0
    raise ValueError("expected a fraction in 0-1 (e.g. 0.875) or a timestep in 0-1000 (e.g. 875)")
