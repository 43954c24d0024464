"""Why a torch `.pth` file could not be read, in words: damaged, truncated, or a pickle that would run code.

`checkpoint_files` loads `.pth` files with `torch.load(weights_only=True)`, which refuses anything but
tensors; when it fails, this module says which of those it was, reading the pickle's opcodes with
`pickletools` (which parses and never unpickles) to name what a hostile file would have imported.
Imports nothing of the project.
"""

from __future__ import annotations

import re
from pathlib import Path

ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default format: a zip archive holding data.pkl and the tensors
PICKLE_PROTO = 0x80  # the PROTO opcode that starts a binary pickle (legacy torch.save files, raw pickles)
_SAFE_MODULES = ("torch", "collections", "_codecs", "numpy")  # what a weights-only torch file may import


def pickle_imports(path: str | Path, max_ops: int = 100_000) -> list[str]:
    """The `module.name` objects the first pickle in a file would import, as far as it can be parsed."""
    import pickletools

    found, strings = [], []
    try:
        with open(path, "rb") as f:
            for count, (op, arg, _) in enumerate(pickletools.genops(f)):
                if op.name in ("GLOBAL", "INST"):
                    found.append(str(arg).replace(" ", "."))
                elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    found.append(f"{strings[-2]}.{strings[-1]}")
                elif isinstance(arg, str):
                    strings.append(arg)
                if count >= max_ops:
                    break
    except Exception:  # noqa: BLE001 - damaged or not a pickle: what was found before the damage
        pass
    return found


def pickle_failure(path: str | Path, exc: Exception, zipped: bool) -> str:
    """What to tell the user when `torch.load(path, weights_only=True)` raised `exc` (without the path)."""
    text = str(exc)
    imports = re.findall(r"GLOBAL ([\w.]+)", text) or ([] if zipped else pickle_imports(path))
    unsafe = [name for name in imports if name.split(".")[0] not in _SAFE_MODULES]
    if unsafe:
        return (f"refused: unpickling it would import {unsafe[0]} (code, not weights), so it was not loaded; a "
                "model file holds tensors only: use the model's .safetensors release, or a file from a source you "
                "trust")
    if isinstance(exc, EOFError):
        reason = "it ends too early: truncated"
    else:
        found = re.search(r"WeightsUnpickler error:\s*(.+)", text) or re.search(r"^(.*?)(?:\. This is|$)", text)
        reason = found[1].strip() if found else ""
    return (f"not a readable torch checkpoint ({reason or type(exc).__name__}); the file is damaged, truncated or "
            "not a model: download it again, or use the .safetensors release")
