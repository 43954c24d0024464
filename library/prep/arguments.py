"""Argparse value types shared by the dataset tools (tools/prepare_dataset.py, and the caching tools through
`library.data.caching_args`): a value out of range is a usage error naming the flag (exit status 2), not a
number that breaks a run later or is written into a dataset TOML. Imports nothing heavy."""

from __future__ import annotations

import argparse
import math


def whole_number(minimum: int):
    """A type: an int >= minimum."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= {minimum}")
        return value
    parse.__name__ = f"whole number >= {minimum}"
    return parse


def positive_number(text: str) -> float:
    """A type: a finite float > 0."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number")
    return value
