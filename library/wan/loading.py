"""Public loaders: one entry per model kind, each detecting the file format by itself.

`load_dit`, `load_vae` and `load_text_encoder` take a file or a folder in any supported format (see
`dit_formats.py` and `checkpoint_files.py`), build the model on the `meta` device and assign each
tensor as it is read and cast, so a 14B expert never sits twice in host RAM.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from .checkpoint_files import Checkpoint, CheckpointError, open_checkpoint
from .dit_formats import FP8_DTYPES, dequantize, detect_variant, plan_dit_layout
from .model import WanModel
from .variants import get_variant

logger = logging.getLogger(__name__)

__all__ = ["CheckpointError", "load_dit", "open_dit_checkpoint"]


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


def _check_keys(ckpt: Checkpoint, expected: dict, present: dict, what: str) -> None:
    missing = [k for k in expected if k not in present]
    unexpected = [k for k in present if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        raise CheckpointError(f"{ckpt.source}: {what} keys do not match: {'; '.join(parts)}")


def _target_dtype(name: str, dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if WanModel.is_fp32_param(name) and dtype != torch.float64 else dtype


def _materialise(ckpt: Checkpoint, layout, name: str, file_key: str, device, dtype) -> torch.Tensor:
    """Read one tensor, dequantise fp8, cast and move; a CPU tensor already in `dtype` stays a zero-copy
    view of the mapped file, anything copied releases its mapped pages."""
    source = ckpt.read(file_key)
    if source.dtype in FP8_DTYPES:
        scale_key = layout.scales.get(name)
        tensor = dequantize(source.to(device), ckpt.read(scale_key) if scale_key else None, dtype)
    else:
        tensor = source.to(device=device, dtype=dtype)
    if tensor.data_ptr() != source.data_ptr():
        ckpt.release(file_key)
    return tensor


def load_dit(
    path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
    task: str | None = None,
) -> WanModel:
    """Load a WAN DiT from an official, ComfyUI, diffusers, fp8 or fp8_scaled checkpoint.

    `path` is a file, a folder with one file, or a folder / index JSON of shards. The variant is detected
    from tensor shapes; with `task` given, a checkpoint of another variant is an error naming both.
    Modulation, norms and the time MLPs are kept in fp32 whatever `dtype` is. The model comes back in
    eval mode with every parameter frozen.
    """
    ckpt, layout, variant = open_dit_checkpoint(path, task)
    with torch.device("meta"):
        model = WanModel(variant)
    expected = model.state_dict()
    _check_keys(ckpt, expected, layout.key_map, f"WAN DiT ({variant.name})")
    device = torch.device(device)
    state = {}
    for name, ref in expected.items():
        file_key = layout.key_map[name]
        if ckpt.shape(file_key) != tuple(ref.shape):
            raise CheckpointError(
                f"{ckpt.file_of(file_key)}: tensor {file_key!r} has shape {list(ckpt.shape(file_key))}, "
                f"expected {list(ref.shape)} for {variant.name}"
            )
        state[name] = _materialise(ckpt, layout, name, file_key, device, _target_dtype(name, dtype))
    model.load_state_dict(state, strict=True, assign=True)
    model.requires_grad_(False).eval()
    fp8 = " (fp8 dequantised)" if layout.scales or any(ckpt.dtype(k) in FP8_DTYPES for k in layout.key_map.values()) else ""
    logger.info("loaded %s from %s%s%s", variant.name, ckpt.source, " [diffusers names]" if layout.diffusers else "", fp8)
    return model
