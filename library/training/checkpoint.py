"""What a run leaves on disk, written atomically: LoRA files with musubi-tuner's names, training state
folders that `resume` continues from exactly, and the pruning of old saves.

File names (per expert, the expert's suffix follows the output name):
    {output_name}{_expert}.safetensors                 the final save
    {output_name}{_expert}-{epoch:06d}.safetensors     every N epochs
    {output_name}{_expert}-step{step:08d}.safetensors  every N steps
State folders: the same stems with `-state` (and no expert suffix): one folder holds every expert.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

STATE_FILE = "training_state.pt"
STATE_INFO = "training_state.json"


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


def state_file(rank: int = 0) -> str:
    """The payload file of one process: the main one's is `training_state.pt`, a sharded run adds one per
    further process (`training_state.rank1.pt`, ...)."""
    return STATE_FILE if rank == 0 else f"training_state.rank{rank}.pt"


def save_state(folder: Path, payload: dict, info: dict, rank: int = 0, world: int = 1, barrier=None) -> None:
    """Write `payload` (tensors, optimizer state ...) and a readable JSON summary; atomic as a folder.
    Sharded runs call this on every process (`rank`, `world`, and `barrier` to wait for the others): each
    writes its own payload file, the main process creates and publishes the folder."""
    folder = Path(folder)
    wait = barrier or (lambda: None)
    tmp = folder.with_name(folder.name + ".tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    wait()
    torch.save(payload, tmp / state_file(rank))
    wait()
    if rank == 0:
        (tmp / STATE_INFO).write_text(json.dumps({**info, "processes": world, "sharded": world > 1}, indent=2,
                                                 default=str))
        old = folder.with_name(folder.name + ".old")
        if folder.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(folder, old)
        os.replace(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)
        logger.info("saved training state to %s", folder)
    wait()


def find_latest_state(output_dir: Path, output_name: str) -> Path | None:
    """The newest complete state folder of a run (by step recorded inside), or None."""
    best, best_step = None, -1
    for folder in Path(output_dir).glob(f"{output_name}*-state"):
        info = folder / STATE_INFO
        if (folder / STATE_FILE).is_file() and info.is_file():
            step = json.loads(info.read_text()).get("global_step", -1)
            if step > best_step:
                best, best_step = folder, step
    return best


def load_state(folder: str | os.PathLike, output_dir: Path | None = None, output_name: str | None = None,
               rank: int = 0, world: int = 1) -> dict:
    """Read a state folder (`resume = "latest"` picks the newest in output_dir); from a sharded (fsdp) state
    this process's payload, which needs the process count it was saved with. Clear errors otherwise. The
    payload's `sharded` entry says which kind of state it was, for the caller to check against its run."""
    if str(folder) == "latest":
        found = find_latest_state(output_dir, output_name) if output_dir and output_name else None
        if found is None:
            raise FileNotFoundError(f"resume = 'latest' but {output_dir} holds no {output_name}*-state folder")
        folder = found
    path = Path(folder) / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"resume: {folder} is not a training state folder (no {STATE_FILE}); pass a *-state folder "
            "written with save_state = true, or 'latest'"
        )
    info = Path(folder) / STATE_INFO
    saved_sharded = info.is_file() and json.loads(info.read_text()).get("sharded", False)
    if saved_sharded:
        saved = json.loads(info.read_text()).get("processes", 1)
        if saved != world:
            raise ValueError(f"resume: {folder} holds the shards of {saved} processes but this run has {world}; "
                             f"resume a sharded (fsdp) run with {saved} processes")
        path = Path(folder) / state_file(rank)
    logger.info("resuming from %s", folder)
    payload = torch.load(path, map_location="cpu", weights_only=False)
    payload["sharded"] = saved_sharded
    return payload


def prune(output_dir: Path, output_name: str, kind: str, keep: int | None, suffixes: tuple[str, ...] = ("",)) -> None:
    """Keep only the newest `keep` epoch or step saves (LoRA files per expert suffix, or state folders)."""
    if not keep or keep <= 0:
        return
    pattern = r"-step(\d{8})" if kind.startswith("step") else r"-(\d{6})"
    for suffix in suffixes:
        is_state = kind.endswith("state")
        tail = "-state" if is_state else r"\.safetensors"
        regex = re.compile("^" + re.escape(output_name + ("" if is_state else suffix)) + pattern + tail + "$")
        found = sorted((int(m.group(1)), p) for p in Path(output_dir).iterdir() if (m := regex.match(p.name)))
        for _, path in found[:-keep]:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
            logger.info("removed old save %s", path.name)
