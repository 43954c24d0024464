"""What the loaders share: opening a DiT checkpoint (layout and variant from headers), checking a state
dict's keys, the NaN / infinity screen (`check_finite`, from `finite.py`), and reading one DiT tensor onto
its device and dtype (`materialise`, through the page-locked staging of `staged_load.py` when a stager is
given). Used by `loading.py` and the
fp8 DiT loader `loading_fp8.py`.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .checkpoint_files import Checkpoint, CheckpointError, open_checkpoint
from .dit_formats import FP8_DTYPES, dequantize, detect_variant, plan_dit_layout
from .finite import check_finite
from .model import WanModel
from .vace import build_dit
from .variants import get_variant


def _resolve_dit_path(path: Path) -> Path:
    """Catch the folder layouts that hold two models, and say which subfolder to pass."""
    if path.is_dir():
        if (path / "high_noise_model").is_dir() and (path / "low_noise_model").is_dir():
            raise CheckpointError(
                f"{path}: this is a WAN 2.2 A14B folder with two experts; pass "
                f"{path / 'low_noise_model'} as `dit` and {path / 'high_noise_model'} as `dit_high_noise`"
            )
        if (path / "model_index.json").is_file() and (path / "transformer").is_dir():
            low = path / ("transformer_2" if (path / "transformer_2").is_dir() else "transformer")
            raise CheckpointError(
                f"{path}: this is a diffusers pipeline folder; pass {low} as `dit`"
                + (f" and {path / 'transformer'} as `dit_high_noise`" if low.name == "transformer_2" else "")
            )
    return path


def open_dit_checkpoint(path: str | os.PathLike, task: str | None = None):
    """Open a DiT checkpoint and work out its layout and variant from headers only (no tensor read)."""
    ckpt = open_checkpoint(_resolve_dit_path(Path(path).expanduser()))
    layout = plan_dit_layout(ckpt)
    variant = detect_variant(ckpt, layout, get_variant(task) if task else None)
    return ckpt, layout, variant


def open_dit_model(path: str | os.PathLike, task: str | None = None):
    """Open a DiT checkpoint, build its model on the meta device and check that the file has every key of it,
    with its shape: (checkpoint, layout, variant, meta model, the model's state dict)."""
    ckpt, layout, variant = open_dit_checkpoint(path, task)
    with torch.device("meta"):
        model = build_dit(variant)
    expected = model.state_dict()
    check_keys(ckpt, expected, layout.key_map, f"WAN DiT ({variant.name})")
    for name, ref in expected.items():
        file_key = layout.key_map[name]
        if ckpt.shape(file_key) != tuple(ref.shape):
            raise CheckpointError(f"{ckpt.file_of(file_key)}: tensor {file_key!r} has shape "
                                  f"{list(ckpt.shape(file_key))}, expected {list(ref.shape)} for {variant.name}")
    return ckpt, layout, variant, model, expected


def check_keys(ckpt: Checkpoint, expected: dict, present: dict, what: str) -> None:
    missing = [k for k in expected if k not in present]
    unexpected = [k for k in present if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        raise CheckpointError(f"{ckpt.source}: {what} keys do not match: {'; '.join(parts)}; the file is incomplete "
                              "or holds another model: download it again, or pass the file made for this model")


def target_dtype(name: str, dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if WanModel.is_fp32_param(name) and dtype != torch.float64 else dtype


def materialise(ckpt: Checkpoint, layout, name: str, file_key: str, device, dtype, stager=None) -> torch.Tensor:
    """Read one tensor, dequantise fp8, cast and move (through `stager`, which screens when the load ends),
    check it is finite; a CPU tensor in `dtype` stays a view of the mapped file, a copy releases its pages."""
    source = ckpt.read(file_key)
    staged = stager is not None and source.dtype not in FP8_DTYPES
    if staged:
        tensor = stager.load(file_key, source, dtype)
    elif source.dtype in FP8_DTYPES:
        scale_key = layout.scales.get(name)
        tensor = dequantize(source.to(device), ckpt.read(scale_key) if scale_key else None, dtype)
    else:
        tensor = source.to(device=device, dtype=dtype)
    if not staged:
        check_finite(ckpt, file_key, tensor)
    if tensor.data_ptr() != source.data_ptr():
        ckpt.release(file_key)
    return tensor
