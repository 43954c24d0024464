"""Checked numbers for generation: the rules a size, frame count, seed, step count or scale must follow,
shared by the sample-prompt options (`prompts.py`) and the command line (`checks.py`).

Each `parse_*` takes a string (a prompt line's text) or a number (a TOML / JSON value or a parsed flag) and
returns the value, or raises `ValueError` with a message that says what is wrong and what is allowed; the
caller puts the source (`prompts.txt line 3: --w`, `--width`) in front.
"""

from __future__ import annotations

import math

MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed accepts 0 .. 2**64 - 1


def as_int(value) -> int:
    """An integer from text or a number; floats only when whole (`64.0`), never booleans."""
    if isinstance(value, bool):
        raise ValueError(f"needs an integer, got {value!r}")
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError(f"needs an integer, got {value!r}")
        return int(value)
    if isinstance(value, int):
        return value
    try:
        return int(str(value).strip())
    except ValueError:
        raise ValueError(f"needs an integer, got {value!r}") from None


def as_float(value) -> float:
    """A finite number from text or a number (nan and inf are refused)."""
    if isinstance(value, bool):
        raise ValueError(f"needs a number, got {value!r}")
    try:
        number = float(str(value).strip()) if isinstance(value, str) else float(value)
    except (TypeError, ValueError):
        raise ValueError(f"needs a number, got {value!r}") from None
    if not math.isfinite(number):
        raise ValueError(f"must be a finite number, got {value!r}")
    return number


def parse_size(value) -> int:
    size = as_int(value)
    if size < 1:
        raise ValueError(f"must be a positive number of pixels, got {size}")
    return size


def parse_frames(value) -> int:
    frames = as_int(value)
    if frames < 1 or (frames - 1) % 4:
        low = max(1, 4 * ((frames - 1) // 4) + 1)
        raise ValueError(f"must be 1 + 4k frames (1, 5, 9, ..., 81; the VAE packs 4 frames per latent), got "
                         f"{frames}; use {low}" + (f" or {low + 4}" if frames > 1 else ""))
    return frames


def parse_seed(value) -> int:
    seed = as_int(value)
    if not 0 <= seed <= MAX_SEED:
        raise ValueError(f"must be between 0 and 2**64 - 1, got {seed}")
    return seed


def parse_steps(value) -> int:
    steps = as_int(value)
    if steps < 1:
        raise ValueError(f"must be at least 1 step, got {steps}")
    return steps


def parse_scale(value) -> float:
    """A guidance or LoRA strength: any finite number."""
    return as_float(value)


def parse_positive(value) -> float:
    """A flow shift or fps: a finite number above 0."""
    number = as_float(value)
    if number <= 0:
        raise ValueError(f"must be greater than 0, got {number:g}")
    return number


def parse_ratio(value) -> float:
    """A share of the steps, 0 to 1."""
    number = as_float(value)
    if not 0.0 <= number <= 1.0:
        raise ValueError(f"must be between 0 and 1, got {number:g}")
    return number


def parse_text(value) -> str:
    return str(value).strip()


def parse_path(value) -> str:
    text = str(value).strip()
    if not text:
        raise ValueError("needs a file path")
    return text


def check_multiple(value: int, multiple: int, what: str, variant_name: str) -> str | None:
    """A problem text when `value` is not a positive multiple of `multiple`, else None."""
    if value >= multiple and value % multiple == 0:
        return None
    low = max(multiple, value // multiple * multiple)
    options = f"{low}" + (f" or {low + multiple}" if low < value else "")
    return (f"{what} {value} is not a multiple of {multiple} (the VAE stride x the DiT patch of {variant_name}); "
            f"use {options}")
