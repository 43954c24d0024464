"""The training state `resume` continues from exactly: one folder per save (`*-state`), written
atomically as a folder, with the payload (network weights, optimizer, scheduler, run position) and a
readable JSON summary; a sharded (fsdp) run writes one payload file per process."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch

from ..engines.sharding import restore_sharded_optimizer, sharded_optimizer_state

logger = logging.getLogger(__name__)

STATE_FILE = "training_state.pt"
STATE_INFO = "training_state.json"


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


def state_payload(experts: list, optimizer, scheduler, run_state: dict, sharded: bool) -> dict:
    """What resuming needs (this process's shards when sharded): every expert's trained weights, the
    optimizer and schedule, and where the run is."""
    return {
        "run_state": run_state,
        "networks": {e.name: e.network.state_dict() for e in experts},
        "optimizer": sharded_optimizer_state(optimizer) if sharded else optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
    }


def restore_payload(payload: dict, experts: list, optimizer, scheduler, sharded: bool) -> None:
    """Put a `state_payload` back into this run's networks, optimizer and schedule."""
    for expert in experts:
        expert.network.load_state_dict(payload["networks"][expert.name])
    if sharded:
        restore_sharded_optimizer(optimizer, payload["optimizer"])
    else:
        optimizer.load_state_dict(payload["optimizer"])
    scheduler.load_state_dict(payload["scheduler"])
