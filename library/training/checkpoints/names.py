"""The names of a run's saves, made and parsed in one place (musubi-tuner's names, so its tools find them)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

EXPERT_SUFFIXES = ("_high_noise", "_low_noise")
# {name}{_expert?}{-stepNNNNNNNN | -NNNNNN}?{_expert?}{.safetensors | -state}: musubi puts the expert suffix
# before the step / epoch; files renamed by hand sometimes carry it after
_SAVE = re.compile(r"^(?P<name>.+?)(?P<e1>_high_noise|_low_noise)?(?:-step(?P<step>\d{8})|-(?P<epoch>\d{6}))?"
                   r"(?P<e2>_high_noise|_low_noise)?(?P<tail>\.safetensors|-state)$")


def stem(output_name: str, epoch: int | None = None, step: int | None = None) -> str:
    if step is not None:
        return f"{output_name}-step{step:08d}"
    if epoch is not None:
        return f"{output_name}-{epoch:06d}"
    return output_name


def lora_path(output_dir: Path, output_name: str, expert_suffix: str = "", epoch: int | None = None,
              step: int | None = None) -> Path:
    return Path(output_dir) / (stem(output_name + expert_suffix, epoch, step) + ".safetensors")


def state_dir(output_dir: Path, output_name: str, epoch: int | None = None, step: int | None = None) -> Path:
    return Path(output_dir) / (stem(output_name, epoch, step) + "-state")


@dataclass(frozen=True)
class SaveName:
    """A save's file or folder name, parsed."""

    name: str  # the output name
    expert_suffix: str  # "_high_noise", "_low_noise" or ""
    step: int | None
    epoch: int | None
    is_state: bool


def parse_save_name(filename: str) -> SaveName | None:
    """The parts of a save's name (a LoRA / DiT file or a state folder), or None for any other name."""
    m = _SAVE.match(filename)
    if not m:
        return None
    return SaveName(m["name"], m["e1"] or m["e2"] or "", int(m["step"]) if m["step"] else None,
                    int(m["epoch"]) if m["epoch"] else None, m["tail"] == "-state")
