"""One-frame training (musubi-tuner's WAN one-frame mode, docs/wan_1f.md there): an image dataset whose items
are a target image plus control images, trained as a few latent frames with chosen RoPE time indices.

Dataset keys (musubi's, shared with its FramePack one-frame mode): `control_directory` (control images named
like the image, `NAME.png`; with several, `NAME_0.png`, `NAME_1.png` or `NAME_0000.png`, ...),
`fp_1f_clean_indices` (the RoPE frame index of each control image) and `fp_1f_target_index` (that of the
target); `fp_1f_no_post` has no effect for WAN. A dataset with the fp_1f keys is a one-frame dataset.

Each item is cached as musubi-tuner caches it: every image (controls, then the target) is encoded by the VAE
on its own as one latent frame; the frames are put in the order of their indices (f_indices = sorted(clean +
[target])). `latents` holds the control latents at their positions and the target latent at its position;
the conditioning y = [4 mask channels | image latents] has the mask 1 (all 4 channels) and the control
latent at each control position, and mask 0 with the latent of a black image at the target position; the
CLIP tokens are those of the control images (WAN 2.1 I2V: one control image; FLF2V: two, the first and last).
The cache stores `image_latents` (y without the mask), `frame_mask` [F] (1 at control positions) and
`frame_positions` [F] (f_indices). The loss covers every latent frame, as in musubi-tuner. Unlike musubi-tuner,
whose training passes no f_indices (positions 0..F-1) while its inference does, training here also runs the
DiT with RoPE frame positions f_indices, as inference does; with the recommended indices (control 0, target
1; or controls 0 and 2, target 1) the two are the same.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch

from . import cache
from .dataset_config import DatasetSpec
from .video_io import MediaError, is_image_file, load_image, resize_and_crop


class OneFrameError(MediaError):
    """An item of a one-frame dataset that cannot be used (a missing control image)."""


def is_one_frame(spec: DatasetSpec) -> bool:
    return spec.kind == "image" and (spec.fp_1f_clean_indices is not None or spec.fp_1f_target_index is not None)


def spec_problems(spec: DatasetSpec, image_frames: int | None = None) -> list[str]:
    """What keeps a one-frame dataset from being used; `image_frames`: the CLIP images the model takes (1 for
    I2V, 2 for FLF2V; None: not checked)."""
    where, problems = spec.where(), []
    if spec.fp_1f_clean_indices is None or spec.fp_1f_target_index is None:
        problems.append(f"{where}: one-frame training needs both fp_1f_clean_indices and fp_1f_target_index")
        return problems
    if spec.control_directory is None:
        problems.append(f"{where}: one-frame training needs control_directory (the control images)")
    if spec.jsonl:
        problems.append(f"{where}: one-frame datasets read control images from control_directory; use "
                        "image_directory rather than a JSONL file")
    if spec.fp_1f_target_index in spec.fp_1f_clean_indices or len(set(spec.fp_1f_clean_indices)) != len(
            spec.fp_1f_clean_indices):
        problems.append(f"{where}: fp_1f_clean_indices {list(spec.fp_1f_clean_indices)} and fp_1f_target_index "
                        f"{spec.fp_1f_target_index} must all differ")
    count = len(spec.fp_1f_clean_indices)
    if image_frames is not None and count != image_frames:
        need = "one control image (the start image)" if image_frames == 1 else \
            "two control images (the first and the last frame)"
        problems.append(f"{where}: {count} control image(s) in fp_1f_clean_indices, but this model takes {need}: "
                        f"use {'i2v-14B with one index' if count == 1 else 'flf2v-14B with two indices'}")
    return problems


def task_problems(specs, task: str, needs_clip: bool, end_frame: bool) -> list[str]:
    """Every problem of the one-frame datasets among `specs` for a task (WAN 2.1 I2V or FLF2V only)."""
    problems = []
    for spec in specs:
        if not is_one_frame(spec):
            continue
        if not needs_clip:
            problems.append(f"{spec.where()}: one-frame training (fp_1f_*) is for the WAN 2.1 I2V and FLF2V models "
                            f"(i2v-14B, flf2v-14B), not {task}")
        else:
            problems += spec_problems(spec, 2 if end_frame else 1)
    return problems


def positions(spec: DatasetSpec) -> list[int]:
    """f_indices: the RoPE frame index of each latent frame, in order."""
    return sorted([*spec.fp_1f_clean_indices, spec.fp_1f_target_index])


@functools.lru_cache(maxsize=8)
def _image_files(folder: Path, mtime_ns: int) -> dict[str, Path]:
    """{stem: path} of the images in a folder, listed once per folder state (not once per item)."""
    return {p.stem: p for p in sorted(folder.iterdir()) if is_image_file(p)}


def control_paths(spec: DatasetSpec, media: Path) -> list[Path]:
    """The control images of one target image, in the order of fp_1f_clean_indices."""
    folder, count = spec.control_directory, len(spec.fp_1f_clean_indices)
    files = _image_files(folder, folder.stat().st_mtime_ns) if folder.is_dir() else {}
    found = []
    for i in range(count):
        names = [media.stem] if count == 1 else []
        names += [f"{media.stem}_{i}", f"{media.stem}_{i:04d}"]
        path = next((files[n] for n in names if n in files), None)
        if path is None:
            raise OneFrameError(f"{media}: no control image {' or '.join(n + '.*' for n in names)} in {folder}")
        found.append(path)
    return found


def settings(spec: DatasetSpec, media: Path) -> dict:
    """What besides the target image decides a one-frame cache: the indices and the control files."""
    try:
        controls = [cache.source_fingerprint(p) for p in control_paths(spec, media)]
    except (OneFrameError, OSError):
        controls = None  # missing: the cache is stale (and caching names the file)
    return {"clean": list(spec.fp_1f_clean_indices), "target": spec.fp_1f_target_index, "controls": controls}


def load_frames(spec: DatasetSpec, item) -> torch.Tensor:
    """The control images then the target, each resized and centre-cropped to the item's bucket ->
    [3, n + 1, H, W] float32 in [-1, 1]."""
    width, height, _ = item.bucket
    paths = [*control_paths(spec, item.media_path), item.media_path]
    frames = np.stack([resize_and_crop(load_image(p), (width, height)) for p in paths])  # [n + 1, H, W, 3]
    return torch.from_numpy(np.ascontiguousarray(frames)).permute(3, 0, 1, 2).float().div_(127.5).sub_(1.0)


@torch.no_grad()
def encode(vae, clip, frames: torch.Tensor, spec: DatasetSpec) -> dict[str, torch.Tensor]:
    """One item's frames [3, n + 1, H, W] -> the cache tensors (latents, image_latents, frame_mask,
    frame_positions, clip_fea when `clip`)."""
    device, dtype = next(vae.parameters()).device, next(vae.parameters()).dtype
    frames = frames.to(device=device, dtype=dtype)
    encoded = [vae.encode(frames[None, :, j:j + 1])[0] for j in range(frames.shape[1])]  # each [z, 1, h, w]
    black = vae.encode(torch.zeros_like(frames[None, :, :1]))[0]
    controls, target = encoded[:-1], encoded[-1]
    order = positions(spec)
    latents, image_latents, mask = [], [], []
    for index in order:
        if index == spec.fp_1f_target_index:
            latents.append(target)
            image_latents.append(black)
            mask.append(0.0)
        else:
            control = controls[spec.fp_1f_clean_indices.index(index)]
            latents.append(control)
            image_latents.append(control)
            mask.append(1.0)
    out = {"latents": torch.cat(latents, dim=1), "image_latents": torch.cat(image_latents, dim=1),
           "frame_mask": torch.tensor(mask), "frame_positions": torch.tensor(order, dtype=torch.int32)}
    if clip is not None:
        tokens = clip.encode(frames[:, :-1].transpose(0, 1))  # the control images -> [n, 257, width]
        out["clip_fea"] = tokens[0] if tokens.shape[0] == 1 else tokens
    return out
