"""What a killed or failed save leaves in the output folder, settled when the next run starts (while it
holds the folder's lock, so no live save is touched):

- `NAME-state.tmp/`: a state being written. Complete (its JSON summary is written last) and its final
  folder missing: the run was killed while publishing it, so it is published; otherwise removed.
- `NAME-state.old/`: the previous copy of a state being replaced. Restored when the new one is missing,
  else removed.
- temp files of atomic writes (`.FILE.XXXX.tmp` of LoRA / DiT / config files, `loss.csv.tmp` ...): removed.

Only this run's names (its output name) are touched: other runs' and other tools' files stay.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path

from .names import parse_save_name
from .state import STATE_INFO

logger = logging.getLogger(__name__)

# `.{name}.{random}.tmp` (write_lora_file, save_config: mkstemp) and `.{name}.{pid}.tmp` (write_safetensors)
_ATOMIC_TEMP = re.compile(r"^\.(?P<target>.+)\.[A-Za-z0-9_]+\.tmp$")
_LOG_TEMPS = ("loss.csv.tmp", "loss.png.tmp", "diagnosis.md.tmp")


def _ours(target: str, output_name: str) -> bool:
    save = parse_save_name(target)
    return target == f"{output_name}_config.toml" or (save is not None and save.name == output_name)


def _settle_state_folder(path: Path) -> str:
    final = path.with_name(path.name[: -len(".tmp")])  # .tmp and .old have the same length
    if path.name.endswith(".old"):
        if final.exists():
            shutil.rmtree(path)
            return f"removed {path.name} (the replaced copy of {final.name})"
        os.replace(path, final)
        return f"restored {final.name} from {path.name} (its replacement was never published)"
    if not final.exists() and (path / STATE_INFO).is_file():
        os.replace(path, final)
        return f"published {final.name} (it was complete; the run was stopped before publishing it)"
    shutil.rmtree(path)
    return f"removed the unfinished state {path.name}"


def clean_leftovers(output_dir: Path, output_name: str) -> list[str]:
    """Settle what killed or failed saves of this run left behind; returns what was done (also logged)."""
    done = []
    folder = Path(output_dir)
    if not folder.is_dir():
        return done
    for path in sorted(folder.iterdir()):
        name = path.name
        if path.is_dir() and not path.is_symlink() and name.endswith(("-state.tmp", "-state.old")):
            save = parse_save_name(name[:-4])
            if save is not None and save.is_state and save.name == output_name:
                done.append(_settle_state_folder(path))
        elif path.is_file() and not path.is_symlink():
            temp = _ATOMIC_TEMP.match(name)
            if name in _LOG_TEMPS or (temp and _ours(temp["target"], output_name)):
                path.unlink()
                done.append(f"removed the temp file {name}")
    if done:
        logger.warning("%s: an earlier run was stopped while saving; cleaned up: %s", folder, "; ".join(done))
    return done
