"""VACE generation inputs: a request's control video, mask and reference images -> the VACE context.

`--control_path` (prompt lines: `--cn`) is a video or frame folder whose first F frames are resized and
centre-cropped to the output size; `--mask_path` (`--mk`) a video, frame folder or one image for every frame
(white = generate, black = keep); `--ref_image_path` (`--ri`, several separated by commas) reference images
letterboxed onto a white canvas. Absent inputs take the official defaults (a zero video, an all-ones mask),
so a VACE model without any of them generates from the prompt alone. `--vace_scale` (`--vs`, default 1)
scales every VACE hint. With R reference images the noise has R extra leading latent frames, denoised
along and cut off before decoding (as the official code does).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from library.data.video_io import MediaError, is_image_file, load_image, probe, read_video_frames, resize_and_crop
from library.wan.vace_context import vace_context

from .prompts import PromptError


def _pixels(frames: np.ndarray) -> torch.Tensor:
    """[F, H, W, 3] uint8 -> [3, F, H, W] float32 in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(frames)).permute(3, 0, 1, 2).float() / 127.5 - 1.0


def _video(path: str, what: str, frames: int, size: tuple[int, int], source: str) -> torch.Tensor:
    """The first `frames` frames of a video / frame folder (or an image repeated: masks only) at (W, H)."""
    file = Path(path).expanduser()
    try:
        if file.is_file() and is_image_file(file):
            if what != "mask" and frames != 1:
                raise PromptError(f"{source}: the {what} {file} is an image; give a video of {frames} frames")
            return _pixels(np.repeat(resize_and_crop(load_image(file), size)[None], frames, axis=0))
        if not file.exists():
            raise PromptError(f"{source}: the {what} {file} does not exist")
        count = probe(file).frame_count
        if count < frames:
            raise PromptError(f"{source}: the {what} {file} has {count} frames, the video {frames}; give a longer one "
                              "or ask for fewer frames")
        return _pixels(read_video_frames(file, list(range(frames)), size))
    except MediaError as exc:
        raise PromptError(f"{source}: the {what} cannot be read: {exc}") from None


def reference_paths(value) -> tuple[str, ...]:
    """Reference images from a comma-separated string or a list (both allowed in prompt files)."""
    if value is None:
        return ()
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    return tuple(str(p).strip() for p in items if str(p).strip())


@torch.no_grad()
def vace_inputs(vae, settings: dict, device, source: str) -> tuple[torch.Tensor, int]:
    """The request's VACE context [1, 96, R + T, h, w] on `device` and R, the count of reference frames."""
    frames, size = settings["frames"], (settings["width"], settings["height"])
    control = _video(settings["control"], "control video", frames, size, source) if settings.get("control") else None
    mask = None
    if settings.get("mask"):
        mask = _video(settings["mask"], "mask", frames, size, source)[:1].add(1.0).div(2.0).clamp(0.0, 1.0)
    references = []
    for path in settings.get("references") or ():
        try:
            references.append(_pixels(load_image(Path(path).expanduser())[None])[:, 0])
        except (MediaError, OSError) as exc:
            raise PromptError(f"{source}: the reference image {path} cannot be read: {exc}") from None
    param = next(vae.parameters())
    context, refs = vace_context(vae.encode, control, mask, references, frames=frames, size=(size[1], size[0]),
                                 dtype=param.dtype, device=param.device)
    return context[None].float().to(device), 0 if refs is None else refs.shape[1]
