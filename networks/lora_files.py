"""LoRA files on disk: read one (any key format; a damaged file is a clear `LoraInputError`, never a
traceback) and write one atomically with Kohya's hashes. `LoraInputError` is the error of every LoRA
file or LoRA tool setting a user gives. Imports nothing of `networks`, so every module here may use it.
"""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path
from typing import Mapping

import torch

from library.errors import UserError


class LoraInputError(UserError, ValueError):
    """A LoRA file, or a LoRA tool's setting, that cannot be used; the message names it and says what to do."""


def write_lora_file(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike,
                    metadata: Mapping[str, str] | None = None, hashes: bool = True) -> Path:
    """Write LoRA tensors as .safetensors atomically (a temp file beside it, then os.replace). With `hashes`,
    Kohya's sshs hashes are recomputed for these tensors (any old ones dropped) when there is metadata."""
    from safetensors.torch import save_file

    from .metadata import safetensors_hashes

    meta = {str(k): str(v) for k, v in (metadata or {}).items() if not (hashes and str(k).startswith("sshs_"))}
    if hashes and meta:
        meta["sshs_model_hash"], meta["sshs_legacy_hash"] = safetensors_hashes(tensors, meta)
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(dict(tensors), tmp, metadata=meta or None)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_lora_file(path_or_sd) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A .safetensors path or a state dict -> (tensors, metadata)."""
    if isinstance(path_or_sd, Mapping):
        return dict(path_or_sd), {}
    from safetensors import SafetensorError, safe_open

    path = Path(path_or_sd).expanduser()
    if not path.is_file():
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), str(path))
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            return {k: fh.get_tensor(k) for k in fh.keys()}, dict(fh.metadata() or {})
    except SafetensorError as exc:
        reason = "empty: 0 bytes" if path.stat().st_size == 0 else str(exc).removeprefix(
            "Error while deserializing header: ")
        raise LoraInputError(f"{path}: not a readable .safetensors LoRA file ({reason}); the file is damaged, "
                             "truncated or not a LoRA: export or download it again") from None
