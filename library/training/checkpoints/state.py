"""The training state `resume` continues from exactly: one folder per save (`*-state`), written
atomically as a folder, with the payload (network weights, optimizer, scheduler, run position) and a
readable JSON summary; a sharded (fsdp) run writes one payload file per process.

The payload is tensors and plain data only (dicts, lists, numbers, strings), and it is read with
`torch.load(weights_only=True)`: a planted or edited state file cannot run code, it is refused. Entries
of a learning-rate schedule that are not plain data (functions kept by a custom scheduler) are left out
when saving; the scheduler rebuilt from the config supplies them on resume.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import shutil
from collections import OrderedDict
from pathlib import Path

import torch

from library.errors import UserError

from ..engines.sharding import restore_sharded_optimizer, sharded_optimizer_state
from ..files import disk_full, out_of_space, tensor_bytes
from .names import parse_save_name

logger = logging.getLogger(__name__)

STATE_FILE = "training_state.pt"
STATE_INFO = "training_state.json"
PAYLOAD_KEYS = ("run_state", "networks", "optimizer", "scheduler")
RUN_STATE_INTS = ("seed", "global_step", "epoch", "batch_in_epoch")
_SCALARS = (str, bytes, int, float, complex, bool, type(None), torch.dtype, torch.device, torch.Size)
_CONTAINERS = (dict, OrderedDict, list, tuple, set)


class StateError(UserError, ValueError):
    """A training state that cannot be saved or resumed; the message names the folder and what to do."""


def state_file(rank: int = 0) -> str:
    """The payload file of one process: the main one's is `training_state.pt`, a sharded run adds one per
    further process (`training_state.rank1.pt`, ...)."""
    return STATE_FILE if rank == 0 else f"training_state.rank{rank}.pt"


def non_plain(obj, where: str = "payload") -> str | None:
    """Where in `obj` something other than tensors and plain data sits (what weights_only refuses), or None."""
    if type(obj) in _SCALARS or type(obj) in (torch.Tensor, torch.nn.Parameter):
        return None
    if type(obj) not in _CONTAINERS:
        return f"{where} ({type(obj).__module__}.{type(obj).__qualname__})"
    if isinstance(obj, dict):
        for key, value in obj.items():
            found = non_plain(key, f"{where} key") or non_plain(value, f"{where}[{key!r}]")
            if found:
                return found
        return None
    return next((found for i, v in enumerate(obj) if (found := non_plain(v, f"{where}[{i}]"))), None)


def _write_file(path: Path, write) -> None:
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def newest_state_note(output_dir: Path, output_name: str | None = None) -> str:
    """What a failed save leaves to resume from, for its error message."""
    newest = find_latest_state(output_dir, output_name)
    if newest is None:
        return "Earlier saves are untouched; there is no earlier training state to resume from."
    return f"Earlier saves are untouched; the newest training state is {newest}: resume from it (resume = \"latest\")."


def save_state(folder: Path, payload: dict, info: dict, rank: int = 0, world: int = 1, barrier=None) -> None:
    """Write `payload` (tensors, optimizer state ...) and a readable JSON summary; atomic as a folder.
    Sharded runs call this on every process (`rank`, `world`, and `barrier` to wait for the others): each
    writes its own payload file, the main process creates and publishes the folder. A full disk is a
    `DiskFullError` naming the disk and the space needed; the unfinished folder is removed."""
    folder = Path(folder)
    found = non_plain(payload)
    if found:
        raise StateError(f"{folder}: the training state would hold {found}, which is not plain data and could not "
                         "be resumed safely; use an optimizer and scheduler whose state is tensors and numbers")
    wait = barrier or (lambda: None)
    tmp = folder.with_name(folder.name + ".tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    wait()
    summary = json.dumps({**info, "processes": world, "sharded": world > 1}, indent=2, default=str).encode()
    try:
        _write_file(tmp / state_file(rank), lambda f: torch.save(payload, f))
        wait()
        if rank == 0:
            _write_file(tmp / STATE_INFO, lambda f: f.write(summary))
    except Exception as exc:
        need = tensor_bytes(payload) + len(summary)
        full = out_of_space(exc, tmp, need)  # judged before the partial files go
        shutil.rmtree(tmp, ignore_errors=True)
        if full:
            name = parse_save_name(folder.name)
            raise disk_full(folder.parent, f"the training state {folder.name}", need * world,
                            newest_state_note(folder.parent, name.name if name else None)) from None
        raise
    if rank == 0:
        old = folder.with_name(folder.name + ".old")
        if folder.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(folder, old)
        os.replace(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)
        logger.info("saved training state to %s", folder)
    wait()


def read_info(folder: Path) -> dict:
    """A state folder's JSON summary; a StateError when it is missing or unreadable."""
    path = Path(folder) / STATE_INFO
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise StateError(f"resume: {folder} has no {STATE_INFO}; the save did not finish: resume from another "
                         "*-state folder") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StateError(f"resume: {path} is damaged ({exc}); resume from another *-state folder") from None
    if not isinstance(info, dict) or type(info.get("global_step", 0)) is not int:
        raise StateError(f"resume: {path} is not a training state summary; resume from another *-state folder")
    return info


def find_latest_state(output_dir: Path, output_name: str | None = None) -> Path | None:
    """The newest complete state folder of a run (by the step recorded inside), or None. Folders of other
    output names and unreadable ones are passed over (the latter with a warning)."""
    best, best_step = None, -1
    for folder in sorted(Path(output_dir).glob("*-state")):
        save = parse_save_name(folder.name)
        if save is None or (output_name and save.name != output_name) or not (folder / STATE_FILE).is_file():
            continue
        try:
            step = read_info(folder).get("global_step", -1)
        except StateError as exc:
            logger.warning("%s; passed over", exc)
            continue
        if step > best_step:
            best, best_step = folder, step
    return best


def _read_payload(path: Path) -> dict:
    """torch.load with weights_only: tensors and plain data, never code."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        named = re.search(r"GLOBAL ([\w.]+)", str(exc))
        raise StateError(
            f"resume: refused to load {path}: it holds Python objects, not only tensors and plain data"
            + (f" (it asks for {named[1]})" if named else "") + ", and loading those could run code. A training "
            "state this trainer writes never does: delete that folder and resume from another *-state folder"
        ) from None
    except (RuntimeError, EOFError, ValueError) as exc:
        raise StateError(f"resume: {path} is damaged or not a training state ({str(exc).splitlines()[0]}); "
                         "resume from another *-state folder") from None
    run_state = payload.get("run_state") if isinstance(payload, dict) else None
    if (not isinstance(run_state, dict) or any(k not in payload for k in PAYLOAD_KEYS)
            or any(type(run_state.get(k)) is not int for k in RUN_STATE_INTS)):
        raise StateError(f"resume: {path} is not a training state of this trainer (it needs {', '.join(PAYLOAD_KEYS)} "
                         "and the run's seed and position); resume from another *-state folder")
    return payload


def load_state(folder: str | os.PathLike, output_dir: Path | None = None, output_name: str | None = None,
               rank: int = 0, world: int = 1) -> dict:
    """Read a state folder (`resume = "latest"` picks the newest in output_dir); from a sharded (fsdp) state
    this process's payload, which needs the process count it was saved with. Clear errors otherwise. The
    payload's `sharded` entry says which kind of state it was, for the caller to check against its run."""
    if str(folder) == "latest":
        found = find_latest_state(output_dir, output_name) if output_dir and output_name else None
        if found is None:
            raise StateError(f"resume = 'latest' but {output_dir} holds no complete {output_name}*-state folder; "
                             "start without resume, or pass a *-state folder")
        folder = found
    path = Path(folder) / STATE_FILE
    if not path.is_file():
        raise StateError(
            f"resume: {folder} is not a training state folder (no {STATE_FILE}); pass a *-state folder "
            "written with save_state = true, or 'latest'"
        )
    info = read_info(folder) if (Path(folder) / STATE_INFO).is_file() else {}  # states of old versions may lack it
    saved_sharded = bool(info.get("sharded", False))
    if saved_sharded:
        saved = info.get("processes", 1)
        if saved != world:
            raise StateError(f"resume: {folder} holds the shards of {saved} processes but this run has {world}; "
                             f"resume a sharded (fsdp) run with {saved} processes")
        path = Path(folder) / state_file(rank)
    logger.info("resuming from %s", folder)
    payload = _read_payload(path)
    payload["sharded"], payload["folder"] = saved_sharded, str(folder)
    return payload


def state_payload(experts: list, optimizer, scheduler, run_state: dict, sharded: bool) -> dict:
    """What resuming needs (this process's shards when sharded): every expert's trained weights, the
    optimizer and schedule (its plain entries), and where the run is."""
    schedule = {k: v for k, v in scheduler.state_dict().items() if non_plain(v) is None}
    return {
        "run_state": run_state,
        "networks": {e.name: e.network.state_dict() for e in experts},
        "optimizer": sharded_optimizer_state(optimizer) if sharded else optimizer.state_dict(),
        "scheduler": schedule,
    }


def restore_payload(payload: dict, experts: list, optimizer, scheduler, sharded: bool) -> None:
    """Put a `state_payload` back into this run's networks, optimizer and schedule; a state of another
    run (other experts, rank, trainable set or optimizer) is a StateError naming the folder."""
    folder = payload.get("folder", "the training state")
    configured = list(getattr(scheduler, "base_lrs", []))  # this run's learning rates, before the saved ones
    try:
        for expert in experts:
            if expert.name not in payload["networks"]:
                raise KeyError(f"it has no weights for the {expert.name} expert")
            expert.network.load_state_dict(payload["networks"][expert.name])
        if sharded:
            restore_sharded_optimizer(optimizer, payload["optimizer"])
        else:
            optimizer.load_state_dict(payload["optimizer"])
        scheduler.load_state_dict({**scheduler.state_dict(), **payload["scheduler"]})
    except (KeyError, ValueError, RuntimeError, TypeError) as exc:
        raise StateError(f"resume: {folder} does not fit this run ({str(exc).strip(chr(39))}); resume with the "
                         "settings it was saved with (task, network_dim and network_args, trainable patterns, "
                         "optimizer), or start a new run") from None
    keep_configured_learning_rates(scheduler, configured)


def keep_configured_learning_rates(scheduler, configured: list[float]) -> None:
    """A resumed run trains at the learning rates of its config, not those saved with the state: the saved
    schedule state brings back the old base rates, so a run resumed with a lower `learning_rate` (after a
    divergence) would silently keep the old one. The optimizer's moments and the position in the schedule
    stay as saved; only the base rates change, and the change is logged."""
    saved = list(getattr(scheduler, "base_lrs", []))
    if not isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR) or saved == configured:
        return
    step = scheduler.last_epoch
    groups = scheduler.optimizer.param_groups
    for group, base, factor in zip(groups, configured, scheduler.lr_lambdas):
        group["initial_lr"], group["lr"] = base, base * factor(step)
    scheduler.base_lrs = configured
    scheduler._last_lr = [group["lr"] for group in groups]
    logger.warning("resume: learning rate %s from the config replaces %s saved with the state (optimizer moments and "
                   "the schedule position are kept)", _rates(configured), _rates(saved))


def _rates(values: list[float]) -> str:
    return ", ".join(f"{v:g}" for v in sorted(set(values)))
