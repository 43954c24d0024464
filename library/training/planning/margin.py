"""What `auto_memory` learns from a GPU out-of-memory error: the run that ran out records a margin in its
output folder (`auto_memory_margin.json`), and the next start of the same run plans with that much less
memory (`plan_memory(margin_gb=...)`, `plan_full(margin_gb=...)`), so the planner takes a more frugal rung.

Each out-of-memory error adds max(the shortfall, `floor_gib`) to the margin the failed run planned with. The
shortfall is read from the message of PyTorch's CUDA caching allocator (c10/cuda/CUDACachingAllocator.cpp):

    CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.19 GiB of which
    1.02 GiB is free. ...

sizes as c10's `format_size` writes them ("N bytes", or two decimals and KiB / MiB / GiB); the shortfall is
what it tried to allocate less what was free. Older releases wrote "(GPU 0; 7.93 GiB total capacity; ...;
47.06 MiB free; ...)", which parses the same way; a message without "Tried to allocate" (cuBLAS, cuDNN, NCCL)
adds the floor. Every process of a run that runs out writes the file (through its own temp file and a
rename) and the largest margin wins, so several ranks failing on one step count as one error."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

from library.errors import UserError

FILE_NAME = "auto_memory_margin.json"
FLOOR_GIB = 2.0  # the least one error adds; with a card's size known, at least FLOOR_FRACTION of it
FLOOR_FRACTION = 0.03
_UNITS = {"bytes": 1 / 2**30, "KiB": 1 / 2**20, "MiB": 1 / 2**10, "GiB": 1.0}
_SIZE = r"(\d+(?:\.\d+)?) (bytes|KiB|MiB|GiB)"
_TRIED = re.compile(r"Tried to allocate " + _SIZE)
_FREE = re.compile(_SIZE + r" (?:is )?free")


class MarginFileError(UserError, ValueError):
    """`auto_memory_margin.json` cannot be read; the message names it and says to delete it."""


def margin_path(output_dir) -> Path:
    return Path(output_dir).expanduser() / FILE_NAME


def output_dir_of(cfg) -> Path:
    """The run's output folder as the trainer resolves it (`output_dir`, default `output`)."""
    return Path(cfg.saving.output_dir or "output").expanduser()


def shortfall_gib(message: str) -> float | None:
    """GiB the failed allocation lacked (tried to allocate less free; all of it when the free memory is not
    said), None when the message says no size."""
    tried = _TRIED.search(message)
    if tried is None:
        return None
    need = float(tried.group(1)) * _UNITS[tried.group(2)]
    free = _FREE.search(message, tried.end())
    return max(0.0, need - float(free.group(1)) * _UNITS[free.group(2)]) if free else need


def floor_gib(card_gib: float | None) -> float:
    return max(FLOOR_GIB, FLOOR_FRACTION * card_gib) if card_gib else FLOOR_GIB


def next_margin(planned: float, message: str, card_gib: float | None = None) -> float:
    """The margin after an out-of-memory error in a run planned with `planned` GiB held back."""
    return round(planned + max(shortfall_gib(message) or 0.0, floor_gib(card_gib)), 2)


def read_record(output_dir) -> dict | None:
    """The record in `output_dir`, None when there is none."""
    path = margin_path(output_dir)
    try:
        record = json.loads(path.read_text())
        margin = float(record["margin_gib"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise MarginFileError(f"{path} cannot be read ({exc}); it holds what auto_memory learnt from an out-of-memory "
                              "error: delete it to plan without a margin") from None
    if not margin >= 0 or margin == float("inf"):
        raise MarginFileError(f"{path}: margin_gib = {record['margin_gib']} must be a finite number >= 0; delete the "
                              "file to plan without a margin")
    return record


def load_margin(output_dir) -> float:
    """GiB the planner holds back for the run writing to `output_dir` (0 without a record)."""
    record = read_record(output_dir)
    return float(record["margin_gib"]) if record else 0.0


def held_back_note(output_dir, margin: float) -> str:
    """The log line of a plan made with a margin."""
    return (f"{margin:g} GiB held back after an out-of-memory error ({margin_path(output_dir)}; delete it to plan "
            "without)")


def record_out_of_memory(output_dir, planned: float, message: str, card: str | None = None,
                         card_gib: float | None = None, settings: str | None = None) -> float:
    """Record an out-of-memory error of a run that planned with `planned` GiB held back; returns the margin the
    next start plans with (the largest any process of the run wrote)."""
    path = margin_path(output_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    margin = next_margin(planned, message, card_gib)
    first = message.strip().splitlines()[0] if message.strip() else ""
    for _ in range(3):  # another process may replace the file between our read and our rename
        current = _on_disk(path)
        if current >= margin:
            return current
        record = {"margin_gib": margin, "card": card, "card_gib": None if card_gib is None else round(card_gib, 2),
                  "settings": settings, "error": first, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "w") as f:
                json.dump(record, f, indent=1)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    return max(margin, _on_disk(path))


def _on_disk(path: Path) -> float:
    try:
        return float(json.loads(path.read_text())["margin_gib"])
    except (OSError, ValueError, TypeError, KeyError):
        return 0.0
