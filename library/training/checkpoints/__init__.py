"""What a run leaves on disk, and the one place that knows its names.

File names (per expert, the expert's suffix follows the output name):
    {output_name}{_expert}.safetensors                 the final save
    {output_name}{_expert}-{epoch:06d}.safetensors     every N epochs
    {output_name}{_expert}-step{step:08d}.safetensors  every N steps
State folders: the same stems with `-state` (and no expert suffix): one folder holds every expert.

This package names the saves (`names`), writes them (`weights`: LoRA or whole-DiT files with their
metadata; `state`: the training state `resume` continues from exactly, plain data only), lists them
(`find_checkpoints`, used by checkpoint picking and comparison), prunes old ones and, at the start of a
run, settles what a killed or failed save left behind (`leftovers`). musubi-tuner's names, so its tools
find them.

May import: `library.config`, `library.wan`, `networks`, and the training modules below it (`dtypes`,
`files`, `engines`); never the loop (`trainer`).
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from .leftovers import clean_leftovers  # noqa: F401 - named here too
from .names import EXPERT_SUFFIXES, SaveName, lora_path, parse_save_name, state_dir, stem  # noqa: F401
from .state import find_latest_state, load_state, save_state  # noqa: F401 - the resume half, named here too

logger = logging.getLogger(__name__)


@dataclass
class Checkpoint:
    name: str
    step: int | None
    epoch: int | None
    final: bool
    files: list[Path] = field(default_factory=list)

    @property
    def label(self) -> str:
        step = f"step {self.step}" if self.step is not None else None
        if self.final:
            return "final" + (f" ({step})" if step else "")
        if self.epoch is not None:
            return f"epoch {self.epoch}" + (f" ({step})" if step else "")
        return step or self.name


def _metadata_step(path: Path) -> int | None:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            value = (fh.metadata() or {}).get("ss_steps")
        return int(value) if value not in (None, "") else None
    except (OSError, ValueError, SafetensorError):  # an unreadable file is reported when it is loaded
        return None


def find_checkpoints(folder: str | Path, name: str | None = None) -> list[Checkpoint]:
    """Every saved weight file of a run (musubi / our names, per-expert pairs grouped), sorted by step; the
    final save last. Step of an epoch or final save comes from its `ss_steps` metadata when present."""
    groups: dict[tuple, Checkpoint] = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        save = parse_save_name(path.name)
        if save is None or (name and save.name != name):
            continue
        key = (save.name, save.step, save.epoch)
        final = save.step is None and save.epoch is None
        groups.setdefault(key, Checkpoint(save.name, save.step, save.epoch, final=final)).files.append(path)
    for ckpt in groups.values():
        if ckpt.step is None:
            ckpt.step = _metadata_step(ckpt.files[0])
    order = lambda c: (c.final, c.step if c.step is not None else float("inf"), c.epoch or 0, c.name)  # noqa: E731
    return sorted(groups.values(), key=order)


def prune(output_dir: Path, output_name: str, kind: str, keep: int | None, suffixes: tuple[str, ...] = ("",)) -> None:
    """Keep only the newest `keep` saves of one kind: `step` / `epoch` (weight files, per expert suffix) or
    `step-state` / `epoch-state` (state folders)."""
    if not keep or keep <= 0:
        return
    by_step, is_state = kind.startswith("step"), kind.endswith("state")
    for suffix in ("",) if is_state else suffixes:
        found = []
        for path in Path(output_dir).iterdir():
            save = parse_save_name(path.name)
            if (save is None or save.name != output_name or save.is_state != is_state
                    or save.expert_suffix != ("" if is_state else suffix)):
                continue
            number = save.step if by_step else save.epoch
            if number is not None:
                found.append((number, path))
        for _, path in sorted(found)[:-keep]:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
            logger.info("removed old save %s", path.name)
